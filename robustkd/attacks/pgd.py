"""One PGD for every continuous modality (pixels, waveforms, token embeddings).

Everything modality-specific comes from the task (where ``delta`` is added, which positions
may move) and the threat model (norm, radius, domain), so this loop is the same for all.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import register_attack
from ..task import Adversarial, Batch, Task
from ..threat import ThreatModel
from .base import Attack, UnusedThreatOptionsError

LossFn = Callable[[Tensor, Tensor], Tensor]


def ce_objective(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-example cross-entropy with hard labels or soft target distributions."""
    return F.cross_entropy(logits, targets, reduction="none")


def kl_objective(logits: Tensor, reference: Tensor) -> Tensor:
    """Per-example KL(reference || softmax(logits)): TRADES' inner maximisation."""
    return F.kl_div(F.log_softmax(logits, dim=1), reference, reduction="none").sum(1)


def margin_objective(logits: Tensor, labels: Tensor) -> Tensor:
    """Carlini-Wagner margin: best wrong logit minus the true one (hard labels)."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    wrong = logits.clone()
    wrong.scatter_(1, labels[:, None], float("-inf"))
    return wrong.amax(1) - true


OBJECTIVES: dict[str, LossFn] = {"ce": ce_objective, "kl": kl_objective, "margin": margin_objective}

#: How an attack that keeps the perturbed point ``p`` brings a step ``q = p + alpha * sign(g)`` back:
#: ``offset``: ``clamp(x + clip(q - x, -eps, eps))`` (ADR's PGD, src/util/pgd_attack.py:38-39);
#: ``bounds``: ``clamp(min(max(q, x - eps), x + eps))`` (ADR's TRADES attack, src/util/trades_attack.py:84-87;
#: MTARD's, mtard/mtard_loss.py:47-49). ``off`` hands the task an offset ``delta`` instead of a point.
KEEP_POINT = ("auto", "off", "offset", "bounds")
#: ``keep_point="auto"``: the starts whose reference attacks keep the point, and the projection they use.
AUTO_POINT = {"trades": "bounds", "normal": "bounds"}


@register_attack("pgd")
class PGD(Attack):
    """Projected gradient ascent in the task's threat model (Madry et al. 2018); hard or soft
    targets, CE / KL / margin objective, uniform or normal random start, restarts.

    ``keep_point`` chooses what the attack iterates: ``"off"`` an offset ``delta`` that the task adds to
    the input; ``"offset"`` / ``"bounds"`` the perturbed input itself, as the reference attacks hold it,
    projected as :data:`KEEP_POINT` says (needs a task with :meth:`~robustkd.task.Task.point_batch`, an
    L-inf ball of fixed radius and no mask), returned as ``Adversarial(task.point_batch(batch, point),
    None)``; ``"auto"`` (default) keeps the point with ``bounds`` for the ``trades`` and ``normal`` starts
    (TRADES' and MTARD's reference attacks) where the task and threat model allow it, else ``off``."""

    #: options that are not PGD's own go to ``task.threat_model`` (``snr_db=30``), so a run-wide budget of any
    #: of the task's threat-model options applies (see :func:`~robustkd.attacks.base.create_attack`); the
    #: subclasses with a threat model of their own (``snr_pgd``, ``linf_pgd``) do not inherit this
    passes_threat_options = True

    def __init__(self, task: Task, threat: ThreatModel | None = None, *, eps: float | None = None,
                 norm: str | None = None, steps: int = 10, step_size: float | None = None,
                 rel_step_size: float | None = None, random_start: str = "uniform",
                 init_std: float = 0.001, restarts: int = 1, loss: str | LossFn = "ce", keep_point: str = "auto",
                 **threat_kwargs: Any):
        super().__init__(task)
        if threat is not None:
            unused = {k: v for k, v in {"eps": eps, "norm": norm, **threat_kwargs}.items() if v is not None}
            if unused:  # they would not reach the threat model: refused, not dropped
                raise UnusedThreatOptionsError(unused, threat)
        self.threat = threat if threat is not None else task.threat_model(eps=eps, norm=norm, **threat_kwargs)
        if steps < 1 or restarts < 1:
            raise ValueError(f"PGD needs steps >= 1 and restarts >= 1 (got steps={steps}, restarts={restarts})")
        self.steps, self.restarts = int(steps), int(restarts)
        self.step_size, self.rel_step_size = step_size, rel_step_size
        self.random_start, self.init_std = random_start, init_std
        if isinstance(loss, str) and loss not in OBJECTIVES:
            raise ValueError(f"unknown PGD objective {loss!r}; choose one of {sorted(OBJECTIVES)} or pass a callable")
        self.loss_name = loss if isinstance(loss, str) else getattr(loss, "__name__", "custom")
        self.objective: LossFn = OBJECTIVES[loss] if isinstance(loss, str) else loss
        self.keep_point = self._resolve_keep_point(keep_point)

    def _resolve_keep_point(self, keep_point: str) -> str:
        """``off``, ``offset`` or ``bounds``; an explicit point mode the task or threat model cannot hold is refused."""
        if keep_point not in KEEP_POINT:
            raise ValueError(f"unknown keep_point {keep_point!r}: use one of {', '.join(KEEP_POINT)}")
        if keep_point == "off":
            return "off"
        why = None
        if type(self.task).point_batch is Task.point_batch:
            why = f"the task {self.task.name!r} attacks an offset, not an input it holds (no point_batch)"
        elif self.threat.norm != "linf" or self.threat.relative:
            why = "a kept point is projected into an L-inf ball of fixed radius only"
        if keep_point == "auto":
            return "off" if why else AUTO_POINT.get(self.random_start, "off")
        if why:
            raise ValueError(f"keep_point={keep_point!r}: {why}; use keep_point='off'")
        return keep_point

    def _alpha(self, x: Tensor) -> float | Tensor:
        if self.step_size is not None:
            return self.step_size
        if self.rel_step_size is not None:
            return self.rel_step_size * self.threat.radius(x)
        return self.threat.default_step_size(x, self.steps)

    def perturb(self, model: nn.Module, batch: Batch, targets: Tensor | None = None) -> Adversarial:
        task, threat = self.task, self.threat
        targets = task.labels(batch) if targets is None else targets
        x = task.perturbation_base(model, batch).detach()
        mask = task.perturbation_mask(batch)
        alpha = self._alpha(x)
        if self.keep_point != "off":
            return self._perturb_point(model, batch, targets, x, mask, alpha)
        best, best_score = None, None
        for _ in range(self.restarts):
            delta = threat.init(x, self.random_start, mask, self.init_std)
            for _ in range(self.steps):
                delta.requires_grad_(True)
                # the batch mean, as the reference attacks reduce (the step direction is scale-free,
                # but the rounding of the gradient is not)
                loss = self.objective(task.logits(model, batch, delta), targets).mean()
                (grad,) = torch.autograd.grad(loss, delta)
                # step from the perturbed point itself, as the reference attacks do (x_adv + alpha * sign(g),
                # then back into the ball around x), so their iterates agree to the last bit
                delta = threat.project(x, threat.step(x + delta.detach(), grad, alpha) - x, mask)
            if self.restarts == 1:
                return Adversarial(batch, delta.detach())
            best, best_score = self._keep_worst(model, batch, targets, delta.detach(), best, best_score)
        return Adversarial(batch, best)

    def _start_point(self, x: Tensor) -> Tensor:
        """The first point as the reference attacks draw it: ``clamp(x + U(-eps, eps))`` (ADR's PGD),
        ``x + std * U[0, 1)`` (ADR's TRADES attack) or ``x + std * N(0, 1)`` (MTARD), the small starts not
        clamped; ``zero``: ``x`` itself."""
        threat, mode = self.threat, self.random_start
        if mode == "zero" or threat.eps == 0:
            return x.clone()
        if mode == "uniform":
            point = x + torch.empty_like(x).uniform_(-threat.eps, threat.eps)
            return point if threat.domain is None else torch.clamp(point, *threat.domain)
        if mode in ("normal", "trades"):
            return x + self.init_std * (torch.randn_like(x) if mode == "normal" else torch.rand_like(x))
        raise ValueError(f"unknown random start {mode!r}: use 'uniform', 'normal', 'trades' or 'zero'")

    def _project_point(self, x: Tensor, q: Tensor) -> Tensor:
        eps, domain = self.threat.eps, self.threat.domain
        if self.keep_point == "offset":
            p = x + torch.clamp(q - x, min=-eps, max=eps)
        else:
            p = torch.min(torch.max(q, x - eps), x + eps)
        return p if domain is None else torch.clamp(p, *domain)

    def _perturb_point(self, model: nn.Module, batch: Batch, targets: Tensor, x: Tensor, mask: Tensor | None,
                       alpha: float | Tensor) -> Adversarial:
        """PGD on the perturbed point itself (``keep_point``), with the reference attacks' arithmetic."""
        if mask is not None:
            raise ValueError(f"keep_point={self.keep_point!r} cannot keep positions fixed (the task masks some): "
                             "use keep_point='off'")
        best, best_score = None, None
        for _ in range(self.restarts):
            point = self._start_point(x)
            for _ in range(self.steps):
                point.requires_grad_(True)
                loss = self.objective(self.task.logits(model, self._point(batch, point)), targets).mean()
                (grad,) = torch.autograd.grad(loss, point)
                point = self._project_point(x, point.detach() + alpha * grad.sign()).detach()
            if self.restarts == 1:
                return Adversarial(self._point(batch, point), None)
            best, best_score = self._keep_worst_point(model, batch, targets, point, best, best_score)
        assert best is not None
        return Adversarial(self._point(batch, best), None)

    def _point(self, batch: Batch, point: Tensor) -> Batch:
        out = self.task.point_batch(batch, point)
        if out is None:
            raise ValueError(f"the task {self.task.name!r} holds no perturbed point (point_batch returned None): "
                             "use keep_point='off'")
        return out

    def _keep_worst_point(self, model: nn.Module, batch: Batch, targets: Tensor, point: Tensor,
                          best: Tensor | None, best_score: Tensor | None) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            logits = self.task.logits(model, self._point(batch, point))
        return self._better(logits, targets, point, best, best_score)

    def _better(self, logits: Tensor, targets: Tensor, cand: Tensor, best: Tensor | None,
                best_score: Tensor | None) -> tuple[Tensor, Tensor]:
        """Per example, ``cand`` where it fools the model and ``best`` does not, else the higher loss."""
        with torch.no_grad():
            score = self.objective(logits, targets).float()
            if targets.dim() == 1:
                score = score + 1e6 * (logits.argmax(1) != targets).float()
        if best is None or best_score is None:
            return cand, score
        better = score > best_score
        shape = (-1,) + (1,) * (cand.dim() - 1)
        return torch.where(better.view(shape), cand, best), torch.maximum(score, best_score)

    def _keep_worst(self, model: nn.Module, batch: Batch, targets: Tensor, delta: Tensor,
                    best: Tensor | None, best_score: Tensor | None) -> tuple[Tensor, Tensor]:
        """Per example, keep the restart that fools the model, else the one with the higher loss."""
        with torch.no_grad():
            logits = self.task.logits(model, batch, delta)
        return self._better(logits, targets, delta, best, best_score)

    def describe(self) -> dict[str, Any]:
        return {"attack": "pgd", **self.threat.describe(), "steps": self.steps,
                "step_size": self.step_size, "rel_step_size": self.rel_step_size,
                "random_start": self.random_start, "restarts": self.restarts, "loss": self.loss_name,
                "keep_point": self.keep_point}


_PGD_OPTIONS = ("steps", "step_size", "rel_step_size", "random_start", "init_std", "restarts", "loss", "keep_point")


def _threat(task: Task, threat: ThreatModel | None, eps: float | None, norm: str | None,
            kwargs: dict[str, Any]) -> ThreatModel:
    """The given threat model, or the task's built from ``eps``/``norm`` and every option that is not
    PGD's own (e.g. ``snr_db``), which are taken out of ``kwargs``."""
    threat_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k not in _PGD_OPTIONS}
    if threat is None:
        return task.threat_model(eps=eps, norm=norm, **threat_kwargs)
    unused = {k: v for k, v in {"eps": eps, "norm": norm, **threat_kwargs}.items() if v is not None}
    if unused:  # they would not reach the given threat model: refused, not dropped
        raise UnusedThreatOptionsError(unused, threat)
    return threat


@register_attack("fgsm")
def fgsm(task: Task, threat: ThreatModel | None = None, *, eps: float | None = None, norm: str | None = None,
         **kwargs: Any) -> PGD:
    """Fast gradient sign method (Goodfellow et al.): one step of size eps from the clean input."""
    threat = _threat(task, threat, eps, norm, kwargs)
    kwargs.setdefault("rel_step_size", 1.0)
    return PGD(task, threat, steps=1, random_start="zero", **kwargs)


@register_attack("fgsm_rs")
def fgsm_rs(task: Task, threat: ThreatModel | None = None, *, eps: float | None = None, norm: str | None = None,
            **kwargs: Any) -> PGD:
    """FGSM with a uniform random start and step 1.25 eps (Wong et al. 2020, "fast is better than free")."""
    threat = _threat(task, threat, eps, norm, kwargs)
    kwargs.setdefault("rel_step_size", 1.25)
    return PGD(task, threat, steps=1, random_start="uniform", **kwargs)


fgsm.passes_threat_options = fgsm_rs.passes_threat_options = True  # type: ignore[attr-defined]


@register_attack("pgd_l2")
def pgd_l2(task: Task, threat: ThreatModel | None = None, *, eps: float | None = None, **kwargs: Any) -> PGD:
    """PGD in an L2 ball (eps 0.5 on CIFAR by convention); its norm is L2, so a ``norm`` option is refused."""
    norm = kwargs.pop("norm", None)
    threat = _threat(task, threat, eps, "l2", kwargs)
    if norm is not None:
        raise UnusedThreatOptionsError({"norm": norm}, threat)
    return PGD(task, threat, **kwargs)
