"""Training methods: the part of the robust-training loop that differs between papers.

The loop is always::

    prepared = method.prepare(victim, batch, progress)   # targets (+ teacher work) and the attack
    loss, logs = method.loss(model, batch, prepared, progress)
    ... optimizer step ...
    method.after_step(model, progress)

A method sees inputs only through the task, so every method works for every task.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..attacks.base import Attack, victim_mode
from ..attacks.pgd import PGD
from ..registry import METHODS, register_method
from ..schedules import Schedule
from ..task import Adversarial, Batch, Task
from ..teachers import EMATeacher
from .losses import soft_cross_entropy, trades_kl
from .targets import ADRRectifier


@dataclass
class Progress:
    """Where training is: optimizer steps done, total steps, epoch, and LR milestones passed."""

    step: int = 0
    total_steps: int = 1
    epoch: int = 0
    milestones_passed: int = 0


@dataclass
class Prepared:
    """What ``prepare`` hands to ``loss``: targets, the adversarial batch, and anything else."""

    targets: Tensor
    adv: Adversarial | None = None
    extras: dict[str, Any] = field(default_factory=dict)


ATTACK_MODES = ("train", "eval")


class Method(ABC):
    """Base class. ``attack_mode`` is the mode the victim is in while the attack runs (ADR's
    reference attacks in train mode, so the attack's forward passes update batch-norm statistics;
    MTARD's in eval mode); the constructor's ``attack_mode=`` overrides the method's default."""

    name = "method"
    needs_ema = False
    attack_mode = "train"

    def __init__(self, task: Task, attack: Attack | None = None, *, attack_mode: str | None = None):
        self.task = task
        self.attack = attack
        self.ema: EMATeacher | None = None
        if attack_mode is not None:
            if attack_mode not in ATTACK_MODES:
                raise ValueError(f"attack_mode must be 'train' or 'eval', got {attack_mode!r}")
            self.attack_mode = attack_mode

    def setup(self, model: nn.Module, ema: EMATeacher | None) -> None:
        """Called once by the trainer before training (teachers exist, devices are set)."""
        if self.needs_ema and ema is None:
            raise ValueError(f"the method {self.name!r} needs an EMA teacher; the trainer creates one "
                             "when method.needs_ema is set")
        self.ema = ema
        if self.attack is not None:  # Attack.__call__ puts the victim in this mode and restores it
            self.attack.set_mode(self.attack_mode)

    def prepare(self, victim: nn.Module, batch: Batch, progress: Progress) -> Prepared:
        labels = self.task.labels(batch)
        return Prepared(labels, self.attack(victim, batch, labels) if self.attack else None)

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch, prepared: Prepared, progress: Progress) -> tuple[Tensor, dict]:
        """The training loss (a scalar to minimise) and detached values to log."""

    def after_step(self, model: nn.Module, progress: Progress) -> None:
        """After each optimizer step (the EMA teacher is updated by the trainer before this)."""

    def log_values(self, progress: Progress) -> dict[str, float]:
        """Adaptive values worth logging per epoch (schedules, temperatures, weights)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "attack": self.attack.describe() if self.attack else None,
                "attack_mode": self.attack_mode}


def _default_pgd(task: Task, attack: Attack | None) -> Attack:
    return attack if attack is not None else PGD(task)


def _default_trades_attack(task: Task, attack: Attack | None) -> Attack:
    """TRADES' KL attack as ADR's reference runs it (src/util/trades_attack.py): start
    ``x + 0.001 * U[0, 1)``, 10 steps."""
    if attack is None:
        return PGD(task, loss="kl", random_start="trades", init_std=0.001)
    if isinstance(attack, PGD) and attack.loss_name != "kl":
        raise ValueError("TRADES needs an attack that maximises the KL: build it with PGD(..., loss='kl')")
    return attack


def _concat_clean_adv(task: Task, batch: Batch, adv: Adversarial) -> Adversarial:
    """One batch holding the clean examples, then the adversarial ones (a zero perturbation for
    the clean half), so that a single forward pass sees both as TRADES' reference does."""
    n = task.batch_size(batch)

    def cat(a: Any, b: Any) -> Any:
        if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == n:
            return torch.cat([a, b])
        if isinstance(a, (list, tuple)) and len(a) == n:
            return type(a)(list(a) + list(b))
        return a

    both = {k: cat(v, adv.batch[k]) for k, v in batch.items()}
    delta = None if adv.delta is None else torch.cat([torch.zeros_like(adv.delta), adv.delta])
    return Adversarial(both, delta)


@register_method("standard")
class Standard(Method):
    """Natural training: cross-entropy on clean inputs (for clean teachers and baselines)."""

    name = "standard"

    def __init__(self, task: Task, attack: Attack | None = None, *, attack_mode: str | None = None):
        super().__init__(task, None, attack_mode=attack_mode)

    def loss(self, model, batch, prepared, progress):
        loss = soft_cross_entropy(self.task.logits(model, batch), prepared.targets)
        return loss, {"loss": loss.detach()}


@register_method("pgd_at")
class PGDAT(Method):
    """PGD adversarial training (Madry et al.): CE on PGD examples that maximise the same CE."""

    name = "pgd_at"

    def __init__(self, task: Task, attack: Attack | None = None, *, attack_mode: str | None = None):
        super().__init__(task, _default_pgd(task, attack), attack_mode=attack_mode)

    def loss(self, model, batch, prepared, progress):
        loss = soft_cross_entropy(self.task.logits(model, *prepared.adv), prepared.targets)
        return loss, {"loss": loss.detach()}


@register_method("trades")
class TRADES(Method):
    """TRADES (Zhang et al. 2019): ``CE(f(x), y) + beta * KL(f(x) || f(x'))``, with x' maximising
    the KL. Defaults are ADR's reference (its TRADES configs): the attack runs in train mode from
    ``x + 0.001 * U[0, 1)`` and ``forward="concat"`` puts clean and adversarial inputs through one
    forward pass, so batch norm normalises them together. TRADES' own code differs: build it with
    ``attack_mode="eval"``, ``forward="separate"`` and ``PGD(..., random_start="normal")``."""

    name = "trades"
    attack_mode = "train"

    def __init__(self, task: Task, attack: Attack | None = None, beta: float = 6.0, *,
                 forward: str = "concat", attack_mode: str | None = None):
        if forward not in ("concat", "separate"):
            raise ValueError(f"TRADES forward must be 'concat' (one pass over clean + adversarial, the reference) "
                             f"or 'separate', got {forward!r}")
        super().__init__(task, _default_trades_attack(task, attack), attack_mode=attack_mode)
        self.beta = beta
        self.forward = forward

    def _reference(self, victim: nn.Module, batch: Batch) -> Tensor:
        # exp(log_softmax): the reference hands the KL log-probabilities (log_target=True); the
        # natural prediction runs in the attack's mode, as the reference's
        with torch.no_grad(), victim_mode(victim, self.attack_mode):
            return torch.log_softmax(self.task.logits(victim, batch).float(), dim=1).exp()

    def prepare(self, victim, batch, progress):
        labels = self.task.labels(batch)
        return Prepared(labels, self.attack(victim, batch, self._reference(victim, batch)))

    def logits(self, model: nn.Module, batch: Batch, adv: Adversarial) -> tuple[Tensor, Tensor]:
        """Clean and adversarial logits: one pass over both (``concat``) or clean, then adversarial."""
        if self.forward == "concat":
            both = self.task.logits(model, *_concat_clean_adv(self.task, batch, adv))
            n = self.task.batch_size(batch)
            return both[:n], both[n:]
        return self.task.logits(model, batch), self.task.logits(model, *adv)

    def loss(self, model, batch, prepared, progress):
        clean, adv = self.logits(model, batch, prepared.adv)
        natural = soft_cross_entropy(clean, prepared.targets)
        robust = trades_kl(adv, clean)
        loss = natural + self.beta * robust
        return loss, {"loss": loss.detach(), "loss_natural": natural.detach(), "loss_robust": robust.detach()}

    def describe(self):
        return {**super().describe(), "beta": self.beta, "forward": self.forward}


@register_method("adr")
class ADR(Method):
    """ADR (Wu et al., ICLR 2024): rectified soft labels from the EMA self-teacher (clean input,
    annealed temperature and interpolation); the attack maximises CE against them.
    ``base='trades'`` uses the soft labels in TRADES' natural term and TRADES' KL attack.

    ``tau=(start, end)`` and ``lam=(start, end)`` are the cosine schedules over all training
    iterations (the reference's ``temperature_high -> temperature_low`` and ``interpolation_low ->
    interpolation_high``); the defaults are its CIFAR-10 ResNet-18 SGD values (2.5 -> 2.0,
    0.7 -> 0.95); other configurations differ (see robustkd.presets and docs/fidelity.md). As in
    the reference, the attack runs in train mode for both bases (``attack_mode="eval"`` to change
    it) and ``trades_forward="concat"`` puts clean and adversarial inputs through one pass."""

    name = "adr"
    needs_ema = True

    def __init__(self, task: Task, attack: Attack | None = None, *, base: str = "pgd_at",
                 tau: tuple[float, float] | None = None, lam: tuple[float, float] | None = None,
                 rectifier: ADRRectifier | None = None, beta: float = 6.0, trades_forward: str = "concat",
                 attack_mode: str | None = None):
        if base not in ("pgd_at", "trades"):
            raise ValueError(f"ADR's base must be 'pgd_at' or 'trades', got {base!r}")
        if rectifier is not None and (tau is not None or lam is not None):
            raise ValueError("give ADR either rectifier= or tau=/lam=, not both")
        self.base = base
        self.trades = TRADES(task, attack, beta, forward=trades_forward, attack_mode=attack_mode) \
            if base == "trades" else None
        super().__init__(task, self.trades.attack if self.trades else _default_pgd(task, attack),
                         attack_mode=attack_mode)
        if rectifier is None:
            default = ADRRectifier()
            rectifier = ADRRectifier(tau=_schedule(tau, "tau", default.tau), lam=_schedule(lam, "lam", default.lam))
        self.rectifier = rectifier
        if base == "trades":
            self.name = "adr_trades"

    def prepare(self, victim, batch, progress):
        labels = self.task.labels(batch)
        teacher_logits = self.ema.logits(self.task, batch)
        targets = self.rectifier(teacher_logits, labels, progress.step, progress.total_steps)
        if self.trades:
            adv = self.attack(victim, batch, self.trades._reference(victim, batch))
        else:
            adv = self.attack(victim, batch, targets)
        return Prepared(targets, adv)

    def loss(self, model, batch, prepared, progress):
        if self.trades:
            return self.trades.loss(model, batch, prepared, progress)
        loss = soft_cross_entropy(self.task.logits(model, *prepared.adv), prepared.targets)
        return loss, {"loss": loss.detach()}

    def log_values(self, progress):
        return self.rectifier.values(progress.step, progress.total_steps)

    def schedule_curve(self, steps: list[int], total: int) -> dict[str, list[float]]:
        """ADR's temperature and interpolation factor over the run (for the schedule plot)."""
        return {"temperature tau": [self.rectifier.tau(s, total) for s in steps],
                "interpolation lambda": [self.rectifier.lam(s, total) for s in steps]}

    def describe(self):
        r = self.rectifier
        out = {**super().describe(), "base": self.base, "tau": [r.tau.start, r.tau.end],
               "lambda": [r.lam.start, r.lam.end], "schedule": r.tau.kind}
        if self.trades:
            out.update(beta=self.trades.beta, forward=self.trades.forward)
        return out


def _schedule(value: tuple[float, float] | list[float] | None, name: str, default: Schedule) -> Schedule:
    """A ``(start, end)`` pair as a cosine :class:`Schedule` (``None``: the default)."""
    if value is None:
        return default
    try:
        start, end = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"ADR {name} must be a pair (start, end), got {value!r}") from None
    if name == "tau" and (start <= 0 or end <= 0):
        raise ValueError(f"ADR's temperature must be > 0, got tau={value!r}")
    if name == "lam" and not (0 <= start <= 1 and 0 <= end <= 1):
        raise ValueError(f"ADR's interpolation factor must lie in [0, 1], got lam={value!r}")
    return Schedule(start, end, default.kind)


@register_method("adr_trades")
def adr_trades(task: Task, attack: Attack | None = None, **kwargs: Any) -> ADR:
    """ADR over TRADES: rectified soft labels in the natural term, beta * KL robustness term."""
    return ADR(task, attack, base="trades", **kwargs)


def create_method(name: str, task: Task, attack: Attack | None = None, **kwargs: Any) -> Method:
    """A registered method by name (``standard``, ``pgd_at``, ``trades``, ``adr``, ``adr_trades``, ...)."""
    return METHODS.get(name)(task, attack, **kwargs)
