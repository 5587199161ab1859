"""MTARD's two balancing rules (Zhao, Wang & Wei; METHODS.md §2), task-agnostic.

*Entropy-Based Balance* gives each teacher its own temperature so the two teachers' softened
predictions carry a similar amount of information (equal entropies). ``reference`` mode is the
journal code's rule (a fixed-size sign step per optimizer step, clamped to ``[t_min, t_max]``);
``exact`` mode solves for the temperatures on every batch by bisection (entropy is monotone in
temperature); ``off`` keeps the temperatures fixed.

*Normalization Loss Balance* moves the loss weights toward each loss's share of relative
progress ``r_k = L_k / L_k^0`` so the student learns from both teachers at a similar speed.

Both are plain state (Python floats) that :class:`~robustkd.distill.mtard.MTARD` updates from
statistics averaged over all processes, so every rank holds the same values, and that is saved
in checkpoints.
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


def _sign(x: float) -> float:
    return float((x > 0) - (x < 0))


class EntropyBalance:
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
        self.t_adv, self.t_nat = float(init[0]), float(init[1])
        self.steps = 0

    @property
    def temperatures(self) -> tuple[float, float]:
        return self.t_adv, self.t_nat

    def step_size(self, milestones_passed: int) -> float:
        """The sign-step size after ``milestones_passed`` LR decays."""
        return self.lr * self.decay ** milestones_passed

    def step(self, e_adv: float, e_nat: float, milestones_passed: int = 0) -> None:
        """One reference-mode update from the batch statistics ``E_adv``, ``E_nat`` (see class doc)."""
        if self.mode != "reference":
            return
        lr = self.step_size(milestones_passed)
        s = _sign(e_nat - e_adv)  # = sign(E_adv / E_nat - 1) for negative E
        self.t_adv = min(max(self.t_adv - lr * s, self.t_min), self.t_max)
        self.t_nat = min(max(self.t_nat + lr * s, self.t_min), self.t_max)
        self.steps += 1

    def solve(self, adv_logits: Tensor, nat_logits: Tensor,
              reduce: Callable[[Tensor], Tensor] = all_reduce_sum) -> tuple[float, float]:
        """Exact mode: set the temperatures that equalise the teachers' mean entropies on this batch.

        ``reduce`` sums a tensor over processes, so the mean entropies (and hence the solved
        temperatures) are those of the global batch, identical on every rank. All bisection steps
        run on the device without host synchronisation; one ``.tolist()`` at the end.
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
        self.t_adv, self.t_nat = (float(v) for v in t.tolist())
        self.steps += 1
        return self.t_adv, self.t_nat

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "t_adv": self.t_adv, "t_nat": self.t_nat, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mode") != self.mode:
            raise ValueError(f"the checkpoint's entropy balance is {state.get('mode')!r} but this run uses "
                             f"{self.mode!r}: resume with --entropy-balance {state.get('mode')} or use a new "
                             "--output-dir")
        self.t_adv, self.t_nat, self.steps = float(state["t_adv"]), float(state["t_nat"]), int(state["steps"])

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "t_min": self.t_min, "t_max": self.t_max, "lr": self.lr, "decay": self.decay}


class LossBalance:
    """MTARD's Normalization Loss Balance over the robust (``adv``) and clean (``nat``) losses.

    The first update stores ``L_k^0``; then ``r_k = L_k / L_k^0``, ``target_k = r_k^beta /
    (r_adv^beta + r_nat^beta)``, ``w_k <- w_k - eta * (w_k - target_k)``, clip at 0, renormalise
    to sum 1; ``eta`` decays by ``decay`` per LR milestone passed. ``enabled=False`` keeps the
    initial weights. Negative relative losses (possible only with the reference KL's 1e-5
    smoothing) count as 0 so a fractional ``beta`` stays defined.
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
        self.w_adv, self.w_nat = init[0] / total, init[1] / total
        self.init_adv: float | None = None
        self.init_nat: float | None = None
        self.steps = 0

    @property
    def weights(self) -> tuple[float, float]:
        return self.w_adv, self.w_nat

    def propose(self, l_adv: float, l_nat: float, milestones_passed: int = 0) -> tuple[float, float]:
        """The weights after an update with these losses, without changing the state (so a loss
        evaluated twice in one step, as AWP does, cannot update twice)."""
        if not self.enabled:
            return self.weights
        if not (math.isfinite(l_adv) and math.isfinite(l_nat)):
            raise FloatingPointError(f"non-finite MTARD losses (robust {l_adv}, clean {l_nat}): lower the learning "
                                     "rate or check the teachers' outputs")
        init_adv = l_adv if self.init_adv is None else self.init_adv
        init_nat = l_nat if self.init_nat is None else self.init_nat
        r_adv = max(l_adv, 0.0) / max(init_adv, 1e-12)
        r_nat = max(l_nat, 0.0) / max(init_nat, 1e-12)
        r_adv, r_nat = r_adv ** self.beta, r_nat ** self.beta
        total = r_adv + r_nat
        t_adv, t_nat = (r_adv / total, r_nat / total) if total > 0 else (0.5, 0.5)
        eta = self.eta * self.decay ** milestones_passed
        w_adv = max(self.w_adv - eta * (self.w_adv - t_adv), 0.0)
        w_nat = max(self.w_nat - eta * (self.w_nat - t_nat), 0.0)
        s = w_adv + w_nat
        return (w_adv / s, w_nat / s) if s > 0 else (0.5, 0.5)

    def commit(self, l_adv: float, l_nat: float, milestones_passed: int = 0) -> tuple[float, float]:
        """Apply one update (once per optimizer step) and return the new weights."""
        self.w_adv, self.w_nat = self.propose(l_adv, l_nat, milestones_passed)
        if self.enabled and self.init_adv is None:
            self.init_adv, self.init_nat = float(l_adv), float(l_nat)
        self.steps += 1
        return self.weights

    def state_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "w_adv": self.w_adv, "w_nat": self.w_nat, "init_adv": self.init_adv,
                "init_nat": self.init_nat, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if bool(state.get("enabled")) != self.enabled:
            raise ValueError(f"the checkpoint's loss balance is {'on' if state.get('enabled') else 'off'} but this run "
                             f"has it {'on' if self.enabled else 'off'}: resume with the same --loss-balance or use "
                             "a new --output-dir")
        self.w_adv, self.w_nat = float(state["w_adv"]), float(state["w_nat"])
        self.init_adv = None if state["init_adv"] is None else float(state["init_adv"])
        self.init_nat = None if state["init_nat"] is None else float(state["init_nat"])
        self.steps = int(state["steps"])

    def describe(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "eta": self.eta, "beta": self.beta, "decay": self.decay}
