"""MTARD's two balancing rules (Zhao, Wang & Wei; METHODS.md §2), task-agnostic.

*Entropy-Based Balance* gives each teacher its own temperature so the two teachers' softened
predictions carry a similar amount of information (equal entropies). ``reference`` mode is the
journal code's rule (a fixed-size sign step per optimizer step, clamped to ``[t_min, t_max]``);
``exact`` mode solves for the temperatures on every batch by bisection (entropy is monotone in
temperature); ``off`` keeps the temperatures fixed.

*Normalization Loss Balance* moves the loss weights toward each loss's share of relative
progress ``r_k = L_k / L_k^0`` so the student learns from both teachers at a similar speed.

Both keep their state in small tensors on the training device and update it with tensor
operations, so a training step never waits for the device (no host synchronisation per step;
the values reach the host only when logged or checkpointed). :class:`~robustkd.distill.mtard.MTARD`
updates them from statistics summed over all processes, so every rank holds the same values.
The float methods (``step``, ``propose``, ``commit``, ``solve``) are the same rules for host
values (hand computation, tests); ``*_t`` methods are their device forms.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

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


def _state_dtype(device: torch.device) -> torch.dtype:
    """float64 (as the reference's Python floats) wherever the device has it."""
    return torch.float32 if device.type == "mps" else torch.float64


def _pair(a: float | Tensor, b: float | Tensor, like: Tensor) -> Tensor:
    """``[a, b]`` as a (2,) tensor with ``like``'s device and dtype, without a host round trip."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return torch.stack([torch.as_tensor(a).to(like), torch.as_tensor(b).to(like)])
    return torch.tensor([float(a), float(b)], dtype=like.dtype, device=like.device)


class _DeviceState:
    """A named (2,) state tensor that follows the tensors it is used with to their device."""

    def _follow(self, name: str, device: torch.device) -> Tensor:
        t = getattr(self, name)
        if t.device != device:
            t = t.to(device=device, dtype=_state_dtype(device))
            setattr(self, name, t)
        return t


class EntropyBalance(_DeviceState):
    """Per-teacher temperatures for the robust (``adv``) and clean (``nat``) teacher.

    ``reference``: ``t_adv <- t_adv - lr * sign(E_adv / E_nat - 1)`` and
    ``t_nat <- t_nat - lr * sign(E_nat / E_adv - 1)``, clamped, ``lr`` decayed by ``decay`` per
    LR milestone passed. With ``E_k < 0`` the sign equals ``sign(E_nat - E_adv)``, which is what is
    computed (no division, so a degenerate ``E_k = 0`` cannot blow up).

    ``exact``: the higher-entropy teacher stays at ``t_min`` and the other teacher's temperature
    is solved by bisection so that both mean entropies are equal on the current batch (the fixed
    point the reference dynamics move toward); it stops at ``t_max`` when even that is not enough.
    """

    def __init__(self, mode: EntropyMode = "reference", *, t_min: float = 1.0, t_max: float = 10.0,
                 lr: float = 0.001, decay: float = 0.1, init: tuple[float, float] = (1.0, 1.0),
                 bisection_steps: int = 40):
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
        self.t = torch.tensor([float(init[0]), float(init[1])], dtype=torch.float64)  # (t_adv, t_nat)
        self.steps = 0

    def tensors(self, device: torch.device) -> Tensor:
        """The temperatures ``(t_adv, t_nat)`` as a (2,) tensor on ``device`` (no host sync)."""
        return self._follow("t", device)

    @property
    def t_adv(self) -> float:
        return float(self.t[0])

    @t_adv.setter
    def t_adv(self, value: float) -> None:
        self.t = self.t.clone()
        self.t[0] = float(value)

    @property
    def t_nat(self) -> float:
        return float(self.t[1])

    @t_nat.setter
    def t_nat(self, value: float) -> None:
        self.t = self.t.clone()
        self.t[1] = float(value)

    @property
    def temperatures(self) -> tuple[float, float]:
        """As host floats (a device sync: for logging and tests, not the training step)."""
        t_adv, t_nat = self.t.tolist()
        return t_adv, t_nat

    def step_size(self, milestones_passed: int) -> float:
        """The sign-step size after ``milestones_passed`` LR decays."""
        return self.lr * self.decay ** milestones_passed

    def step(self, e_adv: float | Tensor, e_nat: float | Tensor, milestones_passed: int = 0) -> None:
        """One reference-mode update from the batch statistics ``E_adv``, ``E_nat`` (see class doc);
        tensors stay on their device (no host sync)."""
        if self.mode != "reference":
            return
        device = e_adv.device if isinstance(e_adv, Tensor) else self.t.device
        t = self.tensors(device)
        e = _pair(e_adv, e_nat, t)
        s = torch.sign(e[1] - e[0])  # = sign(E_adv / E_nat - 1) for negative E
        lr = self.step_size(milestones_passed)
        direction = torch.tensor([-1.0, 1.0], dtype=t.dtype, device=device)
        self.t = (t + lr * s * direction).clamp(self.t_min, self.t_max)
        self.steps += 1

    def solve(self, adv_logits: Tensor, nat_logits: Tensor,
              reduce: Callable[[Tensor], Tensor] = all_reduce_sum) -> tuple[float, float]:
        """Exact mode: set the temperatures that equalise the teachers' mean entropies on this
        batch and return them as host floats (:meth:`solve_t` is the same without the sync)."""
        self.solve_t(adv_logits, nat_logits, reduce)
        return self.temperatures

    def solve_t(self, adv_logits: Tensor, nat_logits: Tensor,
                reduce: Callable[[Tensor], Tensor] = all_reduce_sum) -> Tensor:
        """:meth:`solve` on the device: the (2,) temperatures, with no host synchronisation.

        ``reduce`` sums a tensor over processes, so the mean entropies (and hence the solved
        temperatures) are those of the global batch, identical on every rank.
        """
        if adv_logits.shape != nat_logits.shape:
            raise ValueError(f"the teachers' logits differ in shape: robust {tuple(adv_logits.shape)} vs clean "
                             f"{tuple(nat_logits.shape)}")
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
        self.t = t.to(_state_dtype(t.device))
        self.steps += 1
        return self.t

    def state_dict(self) -> dict[str, Any]:
        t_adv, t_nat = self.temperatures
        return {"mode": self.mode, "t_adv": t_adv, "t_nat": t_nat, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mode") != self.mode:
            raise ValueError(f"the checkpoint's entropy balance is {state.get('mode')!r} but this run uses "
                             f"{self.mode!r}: resume with --entropy-balance {state.get('mode')} or use a new "
                             "--output-dir")
        self.t = torch.tensor([float(state["t_adv"]), float(state["t_nat"])], dtype=self.t.dtype, device=self.t.device)
        self.steps = int(state["steps"])

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "t_min": self.t_min, "t_max": self.t_max, "lr": self.lr, "decay": self.decay}


class LossBalance(_DeviceState):
    """MTARD's Normalization Loss Balance over the robust (``adv``) and clean (``nat``) losses.

    The first update stores ``L_k^0``; then ``r_k = L_k / L_k^0``, ``target_k = r_k^beta /
    (r_adv^beta + r_nat^beta)``, ``w_k <- w_k - eta * (w_k - target_k)``, clip at 0, renormalise
    to sum 1; ``eta`` decays by ``decay`` per LR milestone passed. ``enabled=False`` keeps the
    initial weights. Negative relative losses (possible only with the reference KL's 1e-5
    smoothing) count as 0 so a fractional ``beta`` stays defined.

    Non-finite losses: the host form (``propose``/``commit`` with floats) raises
    :class:`FloatingPointError`; the device form (``propose_t``/``commit_t``, used in training)
    cannot raise without a host sync, so it leaves the weights (and ``L^0``) unchanged for that
    update and counts it in ``nonfinite`` (logged by MTARD as ``mtard_balance_nonfinite``; the
    step's loss is non-finite too, which the trainer reports).
    """

    def __init__(self, enabled: bool = True, *, eta: float = 0.025, beta: float = 1.0, decay: float = 0.1,
                 init: tuple[float, float] = (0.5, 0.5)):
        if eta < 0 or beta <= 0 or not 0 < decay <= 1:
            raise ValueError(f"loss balance needs eta >= 0, beta > 0 and 0 < decay <= 1 "
                             f"(got eta={eta}, beta={beta}, decay={decay})")
        if min(init) < 0 or sum(init) <= 0:
            raise ValueError(f"initial loss weights must be >= 0 and not both 0, got {init}")
        self.enabled = bool(enabled)
        self.eta, self.beta, self.decay = float(eta), float(beta), float(decay)
        total = float(sum(init))
        self.w = torch.tensor([init[0] / total, init[1] / total], dtype=torch.float64)  # (w_adv, w_nat)
        self.l0 = torch.zeros(2, dtype=torch.float64)  # (L_adv^0, L_nat^0), valid once l0_set
        self.l0_set = torch.zeros((), dtype=torch.bool)  # on the device: set by the first finite update
        self.nonfinite_count = torch.zeros((), dtype=torch.float64)
        self.steps = 0

    # -- host views (each a device sync: logging, checkpoints, tests) ------------------------
    @property
    def weights(self) -> tuple[float, float]:
        w_adv, w_nat = self.w.tolist()
        return w_adv, w_nat

    @property
    def w_adv(self) -> float:
        return self.weights[0]

    @property
    def w_nat(self) -> float:
        return self.weights[1]

    @property
    def init_adv(self) -> float | None:
        return float(self.l0[0]) if bool(self.l0_set) else None

    @property
    def init_nat(self) -> float | None:
        return float(self.l0[1]) if bool(self.l0_set) else None

    @property
    def nonfinite(self) -> int:
        return int(self.nonfinite_count)

    # -- the rule on the device -----------------------------------------------------------------
    def tensors(self, device: torch.device) -> Tensor:
        """The weights ``(w_adv, w_nat)`` as a (2,) tensor on ``device`` (no host sync)."""
        self._follow("l0", device)
        self._follow("nonfinite_count", device)
        if self.l0_set.device != device:
            self.l0_set = self.l0_set.to(device)
        return self._follow("w", device)

    def propose_t(self, losses: Tensor, milestones_passed: int = 0) -> Tensor:
        """The (2,) weights after an update with ``losses = (L_adv, L_nat)`` (a device tensor),
        without changing the state (so a loss evaluated twice in one step, as AWP does, cannot
        update twice)."""
        w = self.tensors(losses.device)
        if not self.enabled:
            return w
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
        self.steps += 1
        return new

    # -- the rule on host floats ------------------------------------------------------------------
    def _host_losses(self, l_adv: float, l_nat: float) -> Tensor:
        if self.enabled and not (math.isfinite(l_adv) and math.isfinite(l_nat)):
            raise FloatingPointError(f"non-finite MTARD losses (robust {l_adv}, clean {l_nat}): lower the learning "
                                     "rate or check the teachers' outputs")
        return torch.tensor([float(l_adv), float(l_nat)], dtype=torch.float64, device=self.w.device)

    def propose(self, l_adv: float, l_nat: float, milestones_passed: int = 0) -> tuple[float, float]:
        """:meth:`propose_t` for host floats; returns host floats."""
        w_adv, w_nat = self.propose_t(self._host_losses(l_adv, l_nat), milestones_passed).tolist()
        return w_adv, w_nat

    def commit(self, l_adv: float, l_nat: float, milestones_passed: int = 0) -> tuple[float, float]:
        """:meth:`commit_t` for host floats; returns host floats."""
        self.commit_t(self._host_losses(l_adv, l_nat), milestones_passed)
        return self.weights

    def state_dict(self) -> dict[str, Any]:
        w_adv, w_nat = self.weights
        return {"enabled": self.enabled, "w_adv": w_adv, "w_nat": w_nat, "init_adv": self.init_adv,
                "init_nat": self.init_nat, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if bool(state.get("enabled")) != self.enabled:
            raise ValueError(f"the checkpoint's loss balance is {'on' if state.get('enabled') else 'off'} but this run "
                             f"has it {'on' if self.enabled else 'off'}: resume with the same --loss-balance or use "
                             "a new --output-dir")
        device = self.w.device
        self.w = torch.tensor([float(state["w_adv"]), float(state["w_nat"])], dtype=self.w.dtype, device=device)
        has_init = state["init_adv"] is not None
        self.l0_set = torch.tensor(has_init, device=device)
        if has_init:
            self.l0 = torch.tensor([float(state["init_adv"]), float(state["init_nat"])], dtype=self.w.dtype,
                                   device=device)
        self.steps = int(state["steps"])

    def describe(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "eta": self.eta, "beta": self.beta, "decay": self.decay}
