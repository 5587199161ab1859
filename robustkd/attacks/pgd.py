"""One PGD for every continuous modality (pixels, waveforms, token embeddings).

Everything modality-specific comes from the task (where ``delta`` is added, which positions
may move) and the threat model (norm, radius, domain), so this loop is the same for all.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import register_attack
from ..task import Adversarial, Batch, Task
from ..threat import ThreatModel
from .base import Attack

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


@register_attack("pgd")
class PGD(Attack):
    """Projected gradient ascent in the task's threat model (Madry et al. 2018); hard or soft
    targets, CE / KL / margin objective, uniform or normal random start, restarts."""

    def __init__(self, task: Task, threat: ThreatModel | None = None, *, eps: float | None = None,
                 norm: str | None = None, steps: int = 10, step_size: float | None = None,
                 rel_step_size: float | None = None, random_start: str = "uniform",
                 init_std: float = 0.001, restarts: int = 1, loss: str | LossFn = "ce", **threat_kwargs: Any):
        super().__init__(task)
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

    def _keep_worst(self, model: nn.Module, batch: Batch, targets: Tensor, delta: Tensor,
                    best: Tensor | None, best_score: Tensor | None) -> tuple[Tensor, Tensor]:
        """Per example, keep the restart that fools the model, else the one with the higher loss."""
        with torch.no_grad():
            logits = self.task.logits(model, batch, delta)
            score = self.objective(logits, targets).float()
            if targets.dim() == 1:
                score = score + 1e6 * (logits.argmax(1) != targets).float()
        if best is None:
            return delta, score
        better = score > best_score
        shape = (-1,) + (1,) * (delta.dim() - 1)
        return torch.where(better.view(shape), delta, best), torch.maximum(score, best_score)

    def describe(self) -> dict[str, Any]:
        return {"attack": "pgd", **self.threat.describe(), "steps": self.steps,
                "step_size": self.step_size, "rel_step_size": self.rel_step_size,
                "random_start": self.random_start, "restarts": self.restarts, "loss": self.loss_name}


_PGD_OPTIONS = ("steps", "step_size", "rel_step_size", "random_start", "init_std", "restarts", "loss")


def _threat(task: Task, threat: ThreatModel | None, eps: float | None, norm: str | None,
            kwargs: dict[str, Any]) -> ThreatModel:
    """The given threat model, or the task's built from ``eps``/``norm`` and every option that is not
    PGD's own (e.g. ``snr_db``), which are taken out of ``kwargs``."""
    threat_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k not in _PGD_OPTIONS}
    return threat if threat is not None else task.threat_model(eps=eps, norm=norm, **threat_kwargs)


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


@register_attack("pgd_l2")
def pgd_l2(task: Task, threat: ThreatModel | None = None, *, eps: float | None = None, **kwargs: Any) -> PGD:
    """PGD in an L2 ball (eps 0.5 on CIFAR by convention)."""
    return PGD(task, _threat(task, threat, eps, "l2", kwargs), **kwargs)
