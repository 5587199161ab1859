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


class Method(ABC):
    """Base class. ``attack_mode`` is the mode the victim is in while the attack runs (ADR's
    reference attacks in train mode, MTARD's in eval mode)."""

    name = "method"
    needs_ema = False
    attack_mode = "train"

    def __init__(self, task: Task, attack: Attack | None = None):
        self.task = task
        self.attack = attack
        self.ema: EMATeacher | None = None

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
        return {"method": self.name, "attack": self.attack.describe() if self.attack else None}


def _default_pgd(task: Task, attack: Attack | None) -> Attack:
    return attack if attack is not None else PGD(task)


@register_method("standard")
class Standard(Method):
    """Natural training: cross-entropy on clean inputs (for clean teachers and baselines)."""

    name = "standard"

    def __init__(self, task: Task, attack: Attack | None = None):
        super().__init__(task, None)

    def loss(self, model, batch, prepared, progress):
        loss = soft_cross_entropy(self.task.logits(model, batch), prepared.targets)
        return loss, {"loss": loss.detach()}


@register_method("pgd_at")
class PGDAT(Method):
    """PGD adversarial training (Madry et al.): CE on PGD examples that maximise the same CE."""

    name = "pgd_at"

    def __init__(self, task: Task, attack: Attack | None = None):
        super().__init__(task, _default_pgd(task, attack))

    def loss(self, model, batch, prepared, progress):
        loss = soft_cross_entropy(self.task.logits(model, *prepared.adv), prepared.targets)
        return loss, {"loss": loss.detach()}


@register_method("trades")
class TRADES(Method):
    """TRADES (Zhang et al. 2019): ``CE(f(x), y) + beta * KL(f(x) || f(x'))``, with x' maximising
    the KL from a ``x + 0.001 * N(0, 1)`` start; the attack runs in eval mode as in its reference."""

    name = "trades"
    attack_mode = "eval"

    def __init__(self, task: Task, attack: Attack | None = None, beta: float = 6.0):
        if attack is None:
            attack = PGD(task, loss="kl", random_start="normal")
        elif isinstance(attack, PGD) and attack.loss_name != "kl":
            raise ValueError("TRADES needs an attack that maximises the KL: build it with PGD(..., loss='kl')")
        super().__init__(task, attack)
        self.beta = beta

    def _reference(self, victim: nn.Module, batch: Batch) -> Tensor:
        with torch.no_grad(), victim_mode(victim, self.attack_mode):  # the reference runs in the attack's mode
            return torch.softmax(self.task.logits(victim, batch).float(), dim=1)

    def prepare(self, victim, batch, progress):
        labels = self.task.labels(batch)
        return Prepared(labels, self.attack(victim, batch, self._reference(victim, batch)))

    def loss(self, model, batch, prepared, progress):
        clean = self.task.logits(model, batch)
        adv = self.task.logits(model, *prepared.adv)
        natural = soft_cross_entropy(clean, prepared.targets)
        robust = trades_kl(adv, clean)
        loss = natural + self.beta * robust
        return loss, {"loss": loss.detach(), "loss_natural": natural.detach(), "loss_robust": robust.detach()}

    def describe(self):
        return {**super().describe(), "beta": self.beta}


@register_method("adr")
class ADR(Method):
    """ADR (Wu et al., ICLR 2024): rectified soft labels from the EMA self-teacher (clean input,
    annealed temperature and interpolation); the attack maximises CE against them.
    ``base='trades'`` uses the soft labels in TRADES' natural term and TRADES' KL attack."""

    name = "adr"
    needs_ema = True

    def __init__(self, task: Task, attack: Attack | None = None, *, base: str = "pgd_at",
                 rectifier: ADRRectifier | None = None, beta: float = 6.0):
        if base not in ("pgd_at", "trades"):
            raise ValueError(f"ADR's base must be 'pgd_at' or 'trades', got {base!r}")
        self.base = base
        self.trades = TRADES(task, attack, beta) if base == "trades" else None
        super().__init__(task, self.trades.attack if self.trades else _default_pgd(task, attack))
        self.attack_mode = "eval" if self.trades else "train"
        self.rectifier = rectifier or ADRRectifier()
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
        return {**super().describe(), "base": self.base, "tau": [r.tau.start, r.tau.end],
                "lambda": [r.lam.start, r.lam.end], "schedule": r.tau.kind}


@register_method("adr_trades")
def adr_trades(task: Task, attack: Attack | None = None, **kwargs: Any) -> ADR:
    """ADR over TRADES: rectified soft labels in the natural term, beta * KL robustness term."""
    return ADR(task, attack, base="trades", **kwargs)


def create_method(name: str, task: Task, attack: Attack | None = None, **kwargs: Any) -> Method:
    """A registered method by name (``standard``, ``pgd_at``, ``trades``, ``adr``, ``adr_trades``, ...)."""
    return METHODS.get(name)(task, attack, **kwargs)
