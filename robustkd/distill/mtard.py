"""MTARD: Multi-Teacher Adversarial Robustness Distillation (Zhao, Wang & Wei; METHODS.md §2).

A clean teacher guides the student on clean inputs, a robust teacher on adversarial ones::

    x'     = PGD on CE(student(x'), y), student in eval mode, start x + 0.001 * N(0, 1)
    L_adv  = KL(softmax(robust(x') / t_adv) || softmax(student(x')))
    L_nat  = KL(softmax(clean(x)   / t_nat) || softmax(student(x)))
    loss   = w_adv * L_adv + w_nat * L_nat

with the temperatures from Entropy-Based Balance and the weights from Normalization Loss
Balance (:mod:`robustkd.distill.balance`). The robust teacher may be the student's own EMA
(``robust_teacher="ema"``): teacher-free MTARD.

Everything goes through the task, so MTARD works for any task. The balancing statistics are
summed over processes before use, so temperatures and weights are identical on every rank; they
stay on the device (temperatures and weights are buffers of the balance modules, which ``setup``
moves to the student's device; the epoch's log sums are device tensors), so a training step has no
host synchronisation: values reach the host in ``log_values`` (and when a checkpoint is written).
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..attacks.base import Attack
from ..registry import register_method
from ..task import Batch, Task
from ..teachers import EMATeacher, FrozenTeacher, Teacher
from .balance import (
    ENTROPY_MODES,
    EntropyBalance,
    EntropyMode,
    LossBalance,
    all_reduce_sum,
    entropy,
    reference_entropy_stat,
    state_dtype,
)
from .losses import distill_kl
from .methods import Method, Prepared, Progress, TrainingAttack

KLScale = Literal["batchmean", "reference"]

# Layout of the per-step statistics vector summed over processes.
_L_ADV, _L_NAT, _E_ADV, _E_NAT, _H_ADV, _H_NAT, _N = range(7)


def _as_teacher(teacher: Teacher | nn.Module, role: str) -> Teacher:
    """Accept a Teacher or a bare module; a module in train mode is refused (its batch-norm
    statistics would drift with every student batch and its outputs would not be reproducible)."""
    if isinstance(teacher, Teacher):
        model = teacher.model
    elif isinstance(teacher, nn.Module):
        model = teacher
    else:
        raise TypeError(f"the {role} teacher must be a Teacher or an nn.Module, got {type(teacher).__name__}"
                        + (": load it with robustkd.teachers.load_teacher(spec, task)" if isinstance(teacher, str) else ""))
    if model.training:
        raise ValueError(f"the {role} teacher ({type(model).__name__}) is in train mode: call .eval() on it or load it "
                         "with robustkd.teachers.load_teacher, which returns a frozen teacher in eval mode")
    return teacher if isinstance(teacher, Teacher) else FrozenTeacher(teacher, name=role)


def _device_of(model: nn.Module) -> torch.device:
    """The device of the student's weights (where its logits, and so MTARD's statistics, are)."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    raise ValueError(f"the student ({type(model).__name__}) has no parameters or buffers, so MTARD cannot tell "
                     "which device its balance state belongs on")


@register_method("mtard")
class MTARD(Method):
    """Multi-teacher adversarial distillation with entropy and loss balance.

    Args:
        clean_teacher: naturally trained teacher, evaluated on clean inputs.
        robust_teacher: adversarially trained teacher, evaluated on the student's adversarial
            inputs, or ``"ema"`` for the student's EMA self-teacher (teacher-free MTARD).
        entropy_balance: ``reference`` | ``exact`` | ``off`` (see :class:`EntropyBalance`).
        loss_balance: Normalization Loss Balance on (default) or fixed weights 0.5 / 0.5.
        kl_scale: ``reference`` (default: the paper code's mean over batch and classes, i.e.
            KL / num_classes, resnet18_mtard_cifar10.py:56-58,125-126) or ``batchmean`` (textbook KL,
            num_classes times larger against the same weight decay).
        attack: default PGD-10 on CE from ``x + 0.001 * N(0, 1)`` in eval mode (mtard_loss.py:38-49);
            its step size is the task's default (2.5 * eps / 10 = 2/255 at eps 8/255, the reference's).

    The temperatures and weights are buffers of ``self.entropy`` / ``self.balance``
    (:class:`~robustkd.distill.balance.EntropyBalance`, :class:`~robustkd.distill.balance.LossBalance`);
    :meth:`setup` moves them to the student's device (:meth:`to` does it by hand).
    """

    name = "mtard"
    attack_mode = "eval"
    needs_teachers = True
    training_attack = TrainingAttack(loss="ce", random_start="normal", init_std=0.001)
    reference = "MTARD reference mtard/mtard_loss.py:38-40 (student.eval(), x + 0.001 * N(0, 1))"

    def __init__(self, task: Task, attack: Attack | None = None, *, clean_teacher: Teacher | nn.Module,
                 robust_teacher: Teacher | nn.Module | Literal["ema"],
                 entropy_balance: EntropyMode = "reference", loss_balance: bool = True,
                 kl_scale: KLScale = "reference", t_min: float = 1.0, t_max: float = 10.0, temp_lr: float = 0.001,
                 eta: float = 0.025, beta: float = 1.0, decay: float = 0.1, attack_mode: str | None = None):
        super().__init__(task, self.training_attack.build(task) if attack is None else attack, attack_mode=attack_mode)
        if kl_scale not in ("batchmean", "reference"):
            raise ValueError(f"unknown KL scale {kl_scale!r}: use 'batchmean' or 'reference'")
        if entropy_balance not in ENTROPY_MODES:
            raise ValueError(f"unknown entropy balance {entropy_balance!r}: use one of {', '.join(ENTROPY_MODES)}")
        if isinstance(clean_teacher, str):
            raise ValueError(f"clean_teacher={clean_teacher!r}: only the robust teacher may be 'ema' (the clean "
                             "teacher must be a naturally trained model; load one with load_teacher)")
        self.clean: Teacher = _as_teacher(clean_teacher, "clean")
        if isinstance(robust_teacher, str):
            if robust_teacher != "ema":
                raise ValueError(f"robust_teacher={robust_teacher!r}: pass a teacher (see load_teacher) or 'ema' for "
                                 "the student's EMA self-teacher")
            self.robust: Teacher | None = None
            self.needs_ema = True
        else:
            self.robust = _as_teacher(robust_teacher, "robust")
        self.kl_scale: KLScale = kl_scale
        self.entropy = EntropyBalance(entropy_balance, t_min=t_min, t_max=t_max, lr=temp_lr, decay=decay)
        self.balance = LossBalance(loss_balance, eta=eta, beta=beta, decay=decay)
        self._pending: list[dict[str, Any]] = []
        self._sums: Tensor | None = None  # on the device: (l_adv, l_nat, h_adv, h_nat, steps) since the last log

    # -- teachers -------------------------------------------------------------------------
    @property
    def teachers(self) -> list[Teacher]:
        """The frozen teachers (the trainer moves them to the device; the EMA teacher is its own)."""
        return [t for t in (self.clean, self.robust) if t is not None]

    def setup(self, model: nn.Module, ema: EMATeacher | None) -> None:
        super().setup(model, ema)
        for role, teacher in (("clean", self.clean), ("robust", self.robust)):
            if teacher is not None and teacher.model.training:
                raise ValueError(f"the {role} teacher is in train mode: call .eval() on it before training")
        self.to(_device_of(model))

    def to(self, device: torch.device | str) -> MTARD:
        """Move the balance state (temperatures, weights, initial losses, counters) to ``device``, in
        float64 (float32 on MPS); returns ``self``. :meth:`setup` calls it with the student's device."""
        device = torch.device(device)
        for module in (self.entropy, self.balance):
            module.to(device=device, dtype=state_dtype(device))
        return self

    def _robust(self) -> Teacher:
        if self.robust is not None:
            return self.robust
        if self.ema is None:
            raise RuntimeError("MTARD with robust_teacher='ema' needs the trainer's EMA teacher: call setup() first")
        return self.ema

    def _check_logits(self, logits: Tensor, role: str) -> None:
        if logits.dim() != 2 or logits.shape[1] != self.task.num_classes:
            raise ValueError(f"the {role} teacher returns logits of shape {tuple(logits.shape)} but the task "
                             f"{self.task.name!r} has {self.task.num_classes} classes: use a teacher trained on this task")

    # -- the step ---------------------------------------------------------------------------
    def prepare(self, victim: nn.Module, batch: Batch, progress: Progress) -> Prepared:
        """Attack the student, query both teachers, soften their outputs with the temperatures."""
        labels = self.task.labels(batch)
        if self.attack is None:
            raise RuntimeError("MTARD needs a training attack: construct it with attack=None for its own (PGD-10) "
                               "or pass one")
        adv = self.attack(victim, batch, labels)
        z_adv = self._robust().logits(self.task, *adv).float()
        z_nat = self.clean.logits(self.task, batch).float()
        self._check_logits(z_adv, "robust")
        self._check_logits(z_nat, "clean")
        if self.entropy.mode == "exact":
            self.entropy.solve(z_adv, z_nat)
        t = self.entropy.t
        if t.device != z_adv.device:
            raise RuntimeError(f"MTARD's balance state is on {t.device} but the teachers' logits are on "
                               f"{z_adv.device}: call method.setup(model, ema) (the trainer does) or "
                               "method.to(device) before training")
        t_adv, t_nat = t[0], t[1]
        p_adv = torch.softmax(z_adv / t_adv, dim=1)
        p_nat = torch.softmax(z_nat / t_nat, dim=1)
        n = z_adv.shape[0]
        stats = torch.stack([z_adv.new_zeros(()), z_adv.new_zeros(()),
                             reference_entropy_stat(p_adv).sum(), reference_entropy_stat(p_nat).sum(),
                             entropy(z_adv, t_adv).sum(), entropy(z_nat, t_nat).sum(), z_adv.new_tensor(float(n))])
        self._pending.append({"stats": stats, "milestones": progress.milestones_passed, "reduced": None})
        return Prepared(labels, adv, {"p_adv": p_adv, "p_nat": p_nat})

    def loss(self, model: nn.Module, batch: Batch, prepared: Prepared, progress: Progress) -> tuple[Tensor, dict]:
        """``w_adv * L_adv + w_nat * L_nat`` with the weights updated from this step's losses (as the
        reference code does); the update is committed in :meth:`after_step`."""
        if not self._pending:
            raise RuntimeError("MTARD.loss called without MTARD.prepare for this batch")
        slot = self._pending[-1]
        if prepared.adv is None:
            raise RuntimeError("MTARD.loss needs the adversarial batch MTARD.prepare made: pass its Prepared")
        s_adv = self.task.logits(model, *prepared.adv)
        s_nat = self.task.logits(model, batch)
        l_adv = distill_kl(s_adv.float(), prepared.extras["p_adv"], self.kl_scale)
        l_nat = distill_kl(s_nat.float(), prepared.extras["p_nat"], self.kl_scale)
        stats = slot["stats"].clone()
        stats[_L_ADV], stats[_L_NAT] = l_adv.detach() * stats[_N], l_nat.detach() * stats[_N]
        total = all_reduce_sum(stats)  # stays on the device: no host sync
        reduced = total[:_N] / total[_N]  # process-averaged (l_adv, l_nat, e_adv, e_nat, h_adv, h_nat)
        slot["reduced"] = reduced  # a second call (AWP) overwrites: one update per micro-batch
        w = self.balance.propose_t(reduced[_L_ADV:_L_NAT + 1], slot["milestones"]).to(l_adv.dtype)
        loss = w[0] * l_adv + w[1] * l_nat
        return loss, {"loss": loss.detach(), "loss_adv": l_adv.detach(), "loss_nat": l_nat.detach()}

    def after_step(self, model: nn.Module, progress: Progress) -> None:
        """Commit one balance update per optimizer step from the (process-averaged) statistics of
        its micro-batches."""
        slots, self._pending = self._pending, []
        if not slots:
            return
        if any(s["reduced"] is None for s in slots):
            raise RuntimeError("MTARD.after_step: a prepared batch never went through MTARD.loss")
        mean = torch.stack([s["reduced"] for s in slots]).mean(0)  # on the device
        milestones = slots[-1]["milestones"]
        self.balance.commit_t(mean[_L_ADV:_L_NAT + 1], milestones)
        if self.entropy.mode == "reference":
            self.entropy.step(mean[_E_ADV:_E_NAT + 1], milestones)
        row = torch.cat([mean[[_L_ADV, _L_NAT, _H_ADV, _H_NAT]].double(), mean.new_ones(1, dtype=torch.float64)])
        self._sums = row if self._sums is None else self._sums + row

    # -- logging and state ------------------------------------------------------------------
    def log_values(self, progress: Progress) -> dict[str, float]:
        """Temperatures and weights now, and the teachers' mean entropies and the two losses
        averaged over the steps since the previous call (the trainer calls it once per epoch)."""
        (t_adv, t_nat), (w_adv, w_nat) = self.entropy.t.tolist(), self.balance.w.tolist()
        out = {"mtard_t_adv": t_adv, "mtard_t_nat": t_nat, "mtard_w_adv": w_adv, "mtard_w_nat": w_nat}
        if self.balance.enabled:
            out["mtard_balance_nonfinite"] = int(self.balance.nonfinite_count)
        if self._sums is not None:
            l_adv, l_nat, h_adv, h_nat, n = self._sums.tolist()  # the one sync, at logging time
            out.update({"mtard_loss_adv": l_adv / n, "mtard_loss_nat": l_nat / n,
                        "mtard_entropy_adv": h_adv / n, "mtard_entropy_nat": h_nat / n})
        self._sums = None
        return out

    def state_dict(self) -> dict[str, Any]:
        """The balance modules' state dicts (their buffers and settings) and the KL scale; a copy, so a
        later step or load leaves it as it is."""
        def copied(module: torch.nn.Module) -> dict[str, Any]:
            return {k: v.clone() if isinstance(v, Tensor) else v for k, v in module.state_dict().items()}

        return {"entropy": copied(self.entropy), "loss_balance": copied(self.balance),
                "kl_scale": self.kl_scale, "robust_teacher": "ema" if self.robust is None else "frozen"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output, or a checkpoint's written before the balance state became
        buffers (host floats); a different KL scale, entropy mode or loss balance is refused before
        anything changes."""
        if state.get("kl_scale") != self.kl_scale:
            raise ValueError(f"the checkpoint was trained with --kl-scale {state.get('kl_scale')} but this run uses "
                             f"{self.kl_scale}: resume with the same scale or use a new --output-dir")
        self.balance._check_enabled(_setting(state["loss_balance"], "enabled"))
        self.entropy.load_state_dict(state["entropy"])
        self.balance.load_state_dict(state["loss_balance"])

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "robust_teacher": "ema" if self.robust is None else
                getattr(self.robust, "name", type(self.robust.model).__name__),
                "clean_teacher": getattr(self.clean, "name", type(self.clean.model).__name__),
                "entropy_balance": self.entropy.describe(), "loss_balance": self.balance.describe(),
                "kl_scale": self.kl_scale}


def _setting(state: dict[str, Any], key: str) -> Any:
    """A balance module's setting from its state dict (extra state) or from the earlier host-float form."""
    return state[key] if key in state else (state.get("_extra_state") or {}).get(key)
