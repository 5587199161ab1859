"""MTARD's two balancing rules (Zhao, Wang & Wei; METHODS.md §2), task-agnostic.

*Entropy-Based Balance* gives each teacher its own temperature so the two teachers' softened
predictions carry a similar amount of information (equal entropies). ``reference`` mode is the
journal code's rule (a fixed-size sign step per optimizer step, clamped to ``[t_min, t_max]``);
``exact`` mode solves for the temperatures on every batch by bisection (entropy is monotone in
temperature); ``off`` keeps the temperatures fixed.

*Normalization Loss Balance* moves the loss weights toward each loss's share of relative
progress ``r_k = L_k / L_k^0`` so the student learns from both teachers at a similar speed.

Both are :class:`torch.nn.Module` s whose state lives in registered buffers (float64, as the
reference's Python floats; float32 on MPS, which has no float64: see :func:`state_dtype`), so
``.to(device)`` moves it and ``state_dict()`` / ``load_state_dict()`` save and restore it; the
settings that must match on resume (the entropy mode, whether loss balance is on) travel as the
module's extra state and a mismatch is refused. They update the state with tensor operations, so
a training step never waits for the device (no host synchronisation per step; the values reach
the host only when logged or checkpointed). :class:`~robustkd.distill.mtard.MTARD` moves them to
the student's device in ``setup`` and updates them from statistics summed over all processes, so
every rank holds the same values. A state dict written before the state became buffers (host
floats: ``t_adv``/``t_nat``, ``w_adv``/``w_nat``/``init_adv``/``init_nat``) still loads.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import reduce_

EntropyMode = Literal["reference", "exact", "off"]
ENTROPY_MODES = ("reference", "exact", "off")

#: The reference code's smoothing inside ``log(p + 1e-5)``.
REFERENCE_LOG_EPS = 1e-5


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over all processes (in place, returned); a no-op without torch.distributed.

    Why: temperatures and weights are derived from these sums, so every rank computes the same values.
    """
    reduce_(t, "sum")
    return t


def entropy(logits: Tensor, temperature: float | Tensor = 1.0) -> Tensor:
    """Per-example Shannon entropy (nats) of ``softmax(logits / temperature)``."""
    log_p = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def reference_entropy_stat(probs: Tensor) -> Tensor:
    """Per-example mean over classes of ``p * log(p + 1e-5)``: the reference code's statistic
    (a negative number, minus the mean entropy per class up to the 1e-5); its batch mean is ``E_k``."""
    return (probs * torch.log(probs + REFERENCE_LOG_EPS)).mean(-1)


def state_dtype(device: torch.device | str) -> torch.dtype:
    """The balance state's dtype on ``device``: float64 (as the reference's Python floats) wherever the
    device has it, float32 on MPS."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def _check_device(state: Tensor, device: torch.device, what: str) -> None:
    if state.device != device:
        raise RuntimeError(f"MTARD's balance state is on {state.device} but the {what} are on {device}: move it "
                           "with method.setup(model, ema) (the trainer calls it) or method.to(device)")


class EntropyBalance(nn.Module):
    """Per-teacher temperatures for the robust (``adv``) and clean (``nat``) teacher.

    ``reference``: ``t_adv <- t_adv - lr * sign(E_adv / E_nat - 1)`` and
    ``t_nat <- t_nat - lr * sign(E_nat / E_adv - 1)``, clamped, ``lr`` decayed by ``decay`` per
    LR milestone passed. With ``E_k < 0`` the sign equals ``sign(E_nat - E_adv)``, which is what is
    computed (no division, so a degenerate ``E_k = 0`` cannot blow up).

    ``exact``: the higher-entropy teacher stays at ``t_min`` and the other teacher's temperature
    is solved by bisection so that both mean entropies are equal on the current batch (the fixed
    point the reference dynamics move toward); it stops at ``t_max`` when even that is not enough.

    Buffers: ``t`` = ``(t_adv, t_nat)`` and ``steps`` (updates so far); extra state: the mode.
    """

    t: Tensor
    steps: Tensor

    def __init__(self, mode: EntropyMode = "reference", *, t_min: float = 1.0, t_max: float = 10.0,
                 lr: float = 0.001, decay: float = 0.1, init: tuple[float, float] = (1.0, 1.0),
                 bisection_steps: int = 40):
        super().__init__()
        if mode not in ENTROPY_MODES:
            raise ValueError(f"unknown entropy balance {mode!r}: use one of {', '.join(ENTROPY_MODES)}")
        if not 0 < t_min <= t_max:
            raise ValueError(f"temperature bounds need 0 < t_min <= t_max, got t_min={t_min}, t_max={t_max}")
        if lr < 0 or not 0 < decay <= 1:
            raise ValueError(f"the temperature step needs lr >= 0 and 0 < decay <= 1 (got lr={lr}, decay={decay})")
        if bisection_steps < 1:
            raise ValueError(f"bisection_steps must be >= 1, got {bisection_steps}")
        if mode != "off" and not all(t_min <= t <= t_max for t in init):
            raise ValueError(f"initial temperatures {init} lie outside [t_min, t_max] = [{t_min}, {t_max}]")
        self.mode: EntropyMode = mode
        self.t_min, self.t_max, self.lr, self.decay = float(t_min), float(t_max), float(lr), float(decay)
        self.bisection_steps = int(bisection_steps)
        self.register_buffer("t", torch.tensor([float(init[0]), float(init[1])], dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def step_size(self, milestones_passed: int) -> float:
        """The sign-step size after ``milestones_passed`` LR decays."""
        return self.lr * self.decay ** milestones_passed

    def step(self, e: Tensor, milestones_passed: int = 0) -> Tensor:
        """One reference-mode update from the batch statistics ``e = (E_adv, E_nat)`` (see the class
        doc), on the state's device (no host sync); returns the temperatures. Other modes: no change."""
        if self.mode != "reference":
            return self.t
        _check_device(self.t, e.device, "entropy statistics")
        e = e.to(self.t.dtype)
        s = torch.sign(e[1] - e[0])  # = sign(E_adv / E_nat - 1) for negative E
        lr = self.step_size(milestones_passed)
        direction = torch.tensor([-1.0, 1.0], dtype=self.t.dtype, device=self.t.device)
        self.t = (self.t + lr * s * direction).clamp(self.t_min, self.t_max)
        self.steps = self.steps + 1
        return self.t

    def solve(self, adv_logits: Tensor, nat_logits: Tensor,
              reduce: Callable[[Tensor], Tensor] = all_reduce_sum) -> Tensor:
        """Exact mode: set the temperatures that equalise the teachers' mean entropies on this batch
        and return them (the (2,) state, no host synchronisation).

        ``reduce`` sums a tensor over processes, so the mean entropies (and hence the solved
        temperatures) are those of the global batch, identical on every rank.
        """
        if adv_logits.shape != nat_logits.shape:
            raise ValueError(f"the teachers' logits differ in shape: robust {tuple(adv_logits.shape)} vs clean "
                             f"{tuple(nat_logits.shape)}")
        _check_device(self.t, adv_logits.device, "teachers' logits")
        z = torch.stack([adv_logits.detach().float(), nat_logits.detach().float()])  # (2, B, C)
        n = torch.tensor([float(z.shape[1])], device=z.device)
        count = reduce(n.clone())

        def mean_entropy(t: Tensor) -> Tensor:  # t: (2,) -> (2,) global mean entropies
            return reduce(entropy(z, t.view(2, 1, 1)).sum(1)) / count

        lo = torch.full((2,), self.t_min, device=z.device)
        hi = torch.full((2,), self.t_max, device=z.device)
        h_min, h_max = mean_entropy(lo), mean_entropy(hi)
        target = h_min.max()
        for _ in range(self.bisection_steps):
            mid = (lo + hi) / 2
            below = mean_entropy(mid) < target
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        t = (lo + hi) / 2
        # A teacher already at or above the target stays at t_min; one that cannot reach it stops at t_max.
        t = torch.where(h_min >= target, torch.full_like(t, self.t_min), t)
        t = torch.where(h_max < target, torch.full_like(t, self.t_max), t)
        self.t = t.to(self.t.dtype)
        self.steps = self.steps + 1
        return self.t

    # -- state: buffers plus the mode ---------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {"mode": self.mode}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._check_mode(state.get("mode"))

    def _check_mode(self, mode: Any) -> None:
        if mode != self.mode:
            raise ValueError(f"the checkpoint's entropy balance is {mode!r} but this run uses {self.mode!r}: resume "
                             f"with --entropy-balance {mode} or use a new --output-dir")

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load a state dict of this module, or one written before the state became buffers
        (``{"mode", "t_adv", "t_nat", "steps"}``); a different mode is refused before anything changes."""
        if "t_adv" in state_dict:  # the earlier host-float form
            state_dict = {"t": torch.tensor([float(state_dict["t_adv"]), float(state_dict["t_nat"])],
                                            dtype=torch.float64),
                          "steps": torch.tensor(int(state_dict["steps"])),
                          "_extra_state": {"mode": state_dict.get("mode")}}
        self._check_mode((state_dict.get("_extra_state") or {}).get("mode"))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "t_min": self.t_min, "t_max": self.t_max, "lr": self.lr, "decay": self.decay}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.describe().items())


class LossBalance(nn.Module):
    """MTARD's Normalization Loss Balance over the robust (``adv``) and clean (``nat``) losses.

    The first update stores ``L_k^0``; then ``r_k = L_k / L_k^0``, ``target_k = r_k^beta /
    (r_adv^beta + r_nat^beta)``, ``w_k <- w_k - eta * (w_k - target_k)``, clip at 0, renormalise
    to sum 1; ``eta`` decays by ``decay`` per LR milestone passed. ``enabled=False`` keeps the
    initial weights. Negative relative losses (possible only with the reference KL's 1e-5
    smoothing) count as 0 so a fractional ``beta`` stays defined.

    Non-finite losses cannot raise without a host sync, so an update with one leaves the weights
    (and ``L^0``) unchanged and counts it in ``nonfinite_count`` (logged by MTARD as
    ``mtard_balance_nonfinite``; the step's loss is non-finite too, which the trainer reports).

    Buffers: ``w`` = ``(w_adv, w_nat)``, ``l0`` = ``(L_adv^0, L_nat^0)`` (valid once ``l0_set``),
    ``l0_set``, ``nonfinite_count`` and ``steps``; extra state: ``enabled``.
    """

    w: Tensor
    l0: Tensor
    l0_set: Tensor
    nonfinite_count: Tensor
    steps: Tensor

    def __init__(self, enabled: bool = True, *, eta: float = 0.025, beta: float = 1.0, decay: float = 0.1,
                 init: tuple[float, float] = (0.5, 0.5)):
        super().__init__()
        if eta < 0 or beta <= 0 or not 0 < decay <= 1:
            raise ValueError(f"loss balance needs eta >= 0, beta > 0 and 0 < decay <= 1 "
                             f"(got eta={eta}, beta={beta}, decay={decay})")
        if min(init) < 0 or sum(init) <= 0:
            raise ValueError(f"initial loss weights must be >= 0 and not both 0, got {init}")
        self.enabled = bool(enabled)
        self.eta, self.beta, self.decay = float(eta), float(beta), float(decay)
        total = float(sum(init))
        self.register_buffer("w", torch.tensor([init[0] / total, init[1] / total], dtype=torch.float64))
        self.register_buffer("l0", torch.zeros(2, dtype=torch.float64))
        self.register_buffer("l0_set", torch.zeros((), dtype=torch.bool))  # set by the first finite update
        self.register_buffer("nonfinite_count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def propose_t(self, losses: Tensor, milestones_passed: int = 0) -> Tensor:
        """The (2,) weights after an update with ``losses = (L_adv, L_nat)`` (a tensor on the state's
        device), without changing the state (so a loss evaluated twice in one step, as AWP does,
        cannot update twice)."""
        w = self.w
        if not self.enabled:
            return w
        _check_device(w, losses.device, "losses")
        losses = losses.to(w.dtype)
        l0 = torch.where(self.l0_set, self.l0, losses)
        r = (losses.clamp(min=0.0) / l0.clamp(min=1e-12)) ** self.beta
        total = r.sum()
        half = torch.full_like(w, 0.5)
        target = torch.where(total > 0, r / torch.where(total > 0, total, torch.ones_like(total)), half)
        eta = self.eta * self.decay ** milestones_passed
        new = (w - eta * (w - target)).clamp(min=0.0)
        s = new.sum()
        new = torch.where(s > 0, new / torch.where(s > 0, s, torch.ones_like(s)), half)
        return torch.where(torch.isfinite(losses).all() & torch.isfinite(new).all(), new, w)

    def commit_t(self, losses: Tensor, milestones_passed: int = 0) -> Tensor:
        """Apply one update (once per optimizer step) on the device and return the new weights."""
        new = self.propose_t(losses, milestones_passed)
        if self.enabled:
            losses = losses.to(self.w.dtype).detach()
            finite = torch.isfinite(losses).all()
            self.nonfinite_count = self.nonfinite_count + (~finite).to(self.nonfinite_count.dtype)
            first = finite & ~self.l0_set
            self.l0 = torch.where(first, losses, self.l0)
            self.l0_set = self.l0_set | finite
            self.w = new
        self.steps = self.steps + 1
        return new

    # -- state: buffers plus enabled ------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {"enabled": self.enabled}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._check_enabled(state.get("enabled"))

    def _check_enabled(self, enabled: Any) -> None:
        if bool(enabled) != self.enabled:
            raise ValueError(f"the checkpoint's loss balance is {'on' if enabled else 'off'} but this run has it "
                             f"{'on' if self.enabled else 'off'}: resume with the same --loss-balance or use a new "
                             "--output-dir")

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load a state dict of this module, or one written before the state became buffers
        (``{"enabled", "w_adv", "w_nat", "init_adv", "init_nat", "steps"}``: it kept no count of
        non-finite updates, which restarts at 0); a different ``enabled`` is refused before anything
        changes."""
        if "w_adv" in state_dict:  # the earlier host-float form
            has_init = state_dict["init_adv"] is not None
            l0 = [float(state_dict["init_adv"]), float(state_dict["init_nat"])] if has_init else [0.0, 0.0]
            state_dict = {"w": torch.tensor([float(state_dict["w_adv"]), float(state_dict["w_nat"])],
                                            dtype=torch.float64),
                          "l0": torch.tensor(l0, dtype=torch.float64), "l0_set": torch.tensor(has_init),
                          "nonfinite_count": torch.zeros((), dtype=torch.float64),
                          "steps": torch.tensor(int(state_dict["steps"])),
                          "_extra_state": {"enabled": state_dict.get("enabled")}}
        self._check_enabled((state_dict.get("_extra_state") or {}).get("enabled"))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def describe(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "eta": self.eta, "beta": self.beta, "decay": self.decay}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.describe().items())
