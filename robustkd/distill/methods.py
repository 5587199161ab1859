"""Training methods: the part of the robust-training loop that differs between papers.

The loop is always::

    prepared = method.prepare(victim, batch, progress)   # targets (+ teacher work) and the attack
    loss, logs = method.loss(model, batch, prepared, progress)
    ... optimizer step ...
    method.after_step(model, progress)

A method sees inputs only through the task, so every method works for every task.

Each method class declares its own defaults next to its code, in class attributes that are the one
source of them (the constructors build from them; :func:`robustkd.presets.method_defaults`, and so
the recipes' ``build_method``, reads them): ``training_attack`` (the PGD objective and random start
of its own training attack, :class:`TrainingAttack`, or ``None`` for training on clean inputs),
``attack_mode`` (the model's mode while that attack runs), ``needs_ema`` (the trainer keeps an EMA
teacher for it), ``needs_teachers`` (it takes ``--clean-teacher`` / ``--robust-teacher``) and
``reference`` (where the defaults come from). Keyword settings (``forward=``, ``beta=``, ...) have
their defaults in the constructor's signature only.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

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


@dataclass(frozen=True)
class TrainingAttack:
    """A method's own training attack: PGD maximising ``loss`` from ``random_start`` (``init_std``: the
    scale of the ``normal`` / ``trades`` starts), with PGD's other defaults (10 steps, the task's
    step size). Declared per method class as ``training_attack``; the recipes' ``--attack-*`` flags
    override each field."""

    loss: str = "ce"
    random_start: str = "uniform"
    init_std: float = 0.001

    def build(self, task: Task) -> PGD:
        """The attack in the task's threat model."""
        return PGD(task, random_start=self.random_start, init_std=self.init_std, loss=self.loss)

    def settings(self, mode: str) -> dict[str, Any]:
        """As the recipes' attack settings (:func:`robustkd.presets.method_defaults`), with the attack's ``mode``."""
        return {"loss": self.loss, "random_start": self.random_start, "init_std": self.init_std, "mode": mode}


class Method(ABC):
    """Base class. ``attack_mode`` is the mode the victim is in while the attack runs (ADR's
    reference attacks in train mode, so the attack's forward passes update batch-norm statistics;
    MTARD's in eval mode); the constructor's ``attack_mode=`` overrides the method's default.
    The class attributes below are the method's declared defaults (see the module doc)."""

    name = "method"
    needs_ema = False
    needs_teachers: ClassVar[bool] = False
    attack_mode = "train"
    training_attack: ClassVar[TrainingAttack | None] = TrainingAttack()
    reference: ClassVar[str] = "robustkd's default for a method that declares no training attack of its own"

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
        return None

    def log_values(self, progress: Progress) -> dict[str, float]:
        """Adaptive values worth logging per epoch (schedules, temperatures, weights)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "attack": self.attack.describe() if self.attack else None,
                "attack_mode": self.attack_mode}


def _own_attack(method: type[Method], task: Task, attack: Attack | None) -> Attack:
    """``attack``, or the method's declared training attack."""
    if attack is not None:
        return attack
    if method.training_attack is None:
        raise TypeError(f"{method.__name__} declares no training attack")
    return method.training_attack.build(task)


#: TRADES' KL attack as ADR's reference runs it (src/util/trades_attack.py): start ``x + 0.001 * U[0, 1)``.
TRADES_ATTACK = TrainingAttack(loss="kl", random_start="trades", init_std=0.001)


def _trades_attack(task: Task, attack: Attack | None) -> Attack:
    """``attack`` (refused unless it maximises the KL), or TRADES' declared one."""
    if attack is None:
        return TRADES_ATTACK.build(task)
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
    training_attack = None
    reference = "natural training: no attack"

    def __init__(self, task: Task, attack: Attack | None = None, *, attack_mode: str | None = None):
        super().__init__(task, None, attack_mode=attack_mode)

    def loss(self, model, batch, prepared, progress):
        loss = soft_cross_entropy(self.task.logits(model, batch), prepared.targets)
        return loss, {"loss": loss.detach()}


@register_method("pgd_at")
class PGDAT(Method):
    """PGD adversarial training (Madry et al.): CE on PGD examples that maximise the same CE."""

    name = "pgd_at"
    training_attack = TrainingAttack(loss="ce", random_start="uniform")
    reference = ("Madry et al. 2018; as ADR's reference runs it: src/util/pgd_attack.py:20-24 (uniform start), "
                 "src/advTrainer.py:211,238 (train mode)")

    def __init__(self, task: Task, attack: Attack | None = None, *, attack_mode: str | None = None):
        super().__init__(task, _own_attack(type(self), task, attack), attack_mode=attack_mode)

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
    training_attack = TRADES_ATTACK
    reference = ("as ADR's reference runs TRADES (its TRADES configs): src/util/trades_attack.py:28 (x + 0.001 * "
                 "U[0, 1)), src/advTrainer.py:211,238 (train mode), :317 (one concatenated forward); TRADES' own "
                 "code (github.com/yaodongyu/TRADES) attacks in eval mode from x + 0.001 * N(0, 1): --attack-mode "
                 "eval --attack-random-start normal --method-kwargs '{\"forward\": \"separate\"}'")

    def __init__(self, task: Task, attack: Attack | None = None, beta: float = 6.0, *,
                 forward: str = "concat", attack_mode: str | None = None):
        if forward not in ("concat", "separate"):
            raise ValueError(f"TRADES forward must be 'concat' (one pass over clean + adversarial, the reference) "
                             f"or 'separate', got {forward!r}")
        super().__init__(task, _trades_attack(task, attack), attack_mode=attack_mode)
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
    attack_mode = "train"
    training_attack = TrainingAttack(loss="ce", random_start="uniform")
    reference = "ADR reference src/util/pgd_attack.py:20-24, src/advTrainer.py:211,238"

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
        super().__init__(task, self.trades.attack if self.trades else _own_attack(ADR, task, attack),
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
class ADRTrades(ADR):
    """ADR over TRADES: rectified soft labels in the natural term, beta * KL robustness term.

    ``ADR(task, attack, base="trades", ...)``; takes ADR's keyword settings but ``base``."""

    name = "adr_trades"
    training_attack = TRADES_ATTACK
    reference = ("ADR reference src/util/trades_attack.py:28 (x + 0.001 * U[0, 1)), src/advTrainer.py:211,238 (train "
                 "mode), :288, :303, :317 (one forward of the concatenated clean and adversarial batch)")

    def __init__(self, task: Task, attack: Attack | None = None, **kwargs: Any):
        if "base" in kwargs:
            raise TypeError("adr_trades is ADR with base='trades': drop base= (or use ADR(..., base=...))")
        super().__init__(task, attack, base="trades", **kwargs)


#: The earlier name of :class:`ADRTrades` (a factory function then).
adr_trades = ADRTrades


def create_method(name: str, task: Task, attack: Attack | None = None, **kwargs: Any) -> Method:
    """A registered method by name (``standard``, ``pgd_at``, ``trades``, ``adr``, ``adr_trades``, ...)."""
    return METHODS.get(name)(task, attack, **kwargs)
