"""Waveform attacks: SNR-bounded and amplitude (L-inf) perturbations of raw audio.

There is no speech-specific attack loop: these are the shared :class:`~robustkd.attacks.pgd.PGD`
with waveform threat models (the task's ``SNRBall``, or an L-inf ball clamped to its domain), plus the
measurement every audio report needs -- the SNR each adversarial example actually achieved
(:func:`robustkd.threat.snr_db`, :class:`SNRMeter`). They require the
:class:`~robustkd.attacks.base.WaveformInputs` capability, which the built-in speech tasks provide.

Specs: ``snr_pgd20:snr_db=30``, ``snr_fgsm:snr_db=40``, ``linf_pgd20:eps=0.002``; the generic
``pgd20:snr_db=30`` works too (PGD passes ``snr_db`` to ``task.threat_model``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..registry import register_attack
from ..task import Adversarial, Batch, Task
from ..threat import ThreatModel, snr_db
from .base import Attack, WaveformInputs, waveform_inputs
from .pgd import PGD


class SNRMeter:
    """Collects the achieved SNR of every adversarial example it sees (an attack wrapper, see
    :class:`MeasuredAttack`); ``summary()`` reports min / mean / max and whether any example fell
    below the bound (beyond float rounding, ``tolerance_db``)."""

    def __init__(self, bound_db: float | None = None, tolerance_db: float = 1e-3):
        self.bound_db, self.tolerance_db = bound_db, tolerance_db
        self.values: list[Tensor] = []
        self.linf: list[Tensor] = []

    def update(self, x: Tensor, delta: Tensor) -> None:
        self.values.append(snr_db(x, delta).cpu())
        self.linf.append(delta.detach().flatten(1).abs().amax(1).float().cpu())

    def reset(self) -> None:
        self.values.clear()
        self.linf.clear()

    def compute(self) -> Tensor:
        return torch.cat(self.values) if self.values else torch.empty(0)

    def summary(self) -> dict[str, Any]:
        v = self.compute()
        if v.numel() == 0:
            return {"num_examples": 0}
        finite = v[torch.isfinite(v)]
        out: dict[str, Any] = {"num_examples": int(v.numel()), "num_unperturbed": int((~torch.isfinite(v)).sum()),
                               "max_abs_delta": float(torch.cat(self.linf).max())}
        if finite.numel():
            out.update(min_snr_db=float(finite.min()), mean_snr_db=float(finite.mean()),
                       max_snr_db=float(finite.max()))
        if self.bound_db is not None:
            out["bound_snr_db"] = self.bound_db
            out["num_below_bound"] = int((v < self.bound_db - self.tolerance_db).sum())
        return out


class MeasuredAttack(Attack):
    """Wraps any continuous attack and records the achieved SNR of every example it returns, so
    reports show the budget actually used (and prove it was respected). The wrapped attack sets the
    victim's mode itself."""

    mode = None

    def __init__(self, attack: Attack, meter: SNRMeter | None = None):
        super().__init__(attack.task)
        self.attack = attack
        threat = getattr(attack, "threat", None)
        self.meter = meter or SNRMeter(getattr(threat, "snr_db", None))

    def perturb(self, model: nn.Module, batch: Batch, targets: Tensor | None = None) -> Adversarial:
        adv = self.attack(model, batch, targets)
        if adv.delta is not None:
            self.meter.update(self.task.perturbation_base(model, batch), adv.delta)
        return adv

    def describe(self) -> dict[str, Any]:
        return self.attack.describe()


def _named(attack: PGD, name: str) -> dict[str, Any]:
    return {**PGD.describe(attack), "attack": name}


def _task_snr(task: Task, snr_db: float | None) -> ThreatModel:
    return waveform_inputs(task).snr_threat(snr_db)


@register_attack("snr_pgd")
class SNRPGD(PGD):
    """PGD in an SNR ball on the waveform (L2 steps, per-example radius ``||x|| 10^(-snr/20)``)."""

    requires = (WaveformInputs,)

    def __init__(self, task: Task, threat: ThreatModel | None = None, *, snr_db: float | None = None,
                 **kwargs: Any):
        Attack.__init__(self, task)  # check the capability before building anything
        super().__init__(task, threat if threat is not None else _task_snr(task, snr_db), **kwargs)

    def describe(self) -> dict[str, Any]:
        return _named(self, "snr_pgd")


@register_attack("snr_fgsm")
class SNRFGM(PGD):
    """Fast gradient method in an SNR ball: one L2-normalised step to the ball's surface."""

    requires = (WaveformInputs,)

    def __init__(self, task: Task, threat: ThreatModel | None = None, *, snr_db: float | None = None,
                 **kwargs: Any):
        Attack.__init__(self, task)
        kwargs.setdefault("rel_step_size", 1.0)
        super().__init__(task, threat if threat is not None else _task_snr(task, snr_db), steps=1,
                         random_start="zero", **kwargs)

    def describe(self) -> dict[str, Any]:
        return _named(self, "snr_fgsm")


@register_attack("linf_pgd")
class LinfPGD(PGD):
    """PGD in an amplitude (L-inf) ball on the waveform, clamped to [-1, 1]."""

    requires = (WaveformInputs,)

    def __init__(self, task: Task, threat: ThreatModel | None = None, *, eps: float | None = None, **kwargs: Any):
        Attack.__init__(self, task)
        super().__init__(task, threat if threat is not None else task.threat_model(eps=eps, norm="linf"), **kwargs)

    def describe(self) -> dict[str, Any]:
        return _named(self, "linf_pgd")


@register_attack("linf_fgsm")
class LinfFGSM(PGD):
    """FGSM in an amplitude (L-inf) ball on the waveform: one sign step of size eps."""

    requires = (WaveformInputs,)

    def __init__(self, task: Task, threat: ThreatModel | None = None, *, eps: float | None = None, **kwargs: Any):
        Attack.__init__(self, task)
        kwargs.setdefault("rel_step_size", 1.0)
        super().__init__(task, threat if threat is not None else task.threat_model(eps=eps, norm="linf"), steps=1,
                         random_start="zero", **kwargs)

    def describe(self) -> dict[str, Any]:
        return _named(self, "linf_fgsm")


__all__ = ["LinfFGSM", "LinfPGD", "MeasuredAttack", "SNRFGM", "SNRMeter", "SNRPGD"]
