"""The trainer's divergence guard: a non-finite loss, or weights that are non-finite or have exploded.

The step records a non-finite loss on the device (no host synchronisation); :meth:`DivergenceGuard.check`
reads it back once every :data:`CHECK_EVERY` micro-steps and before every evaluation and checkpoint,
together with the largest absolute weight (one fused ``torch._foreach_norm`` and the same single host
read). A run stops with one :class:`DivergenceError` line naming the step, the likely cause and the
flags that fix it; the last good checkpoint is kept because the check runs before each is written.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

#: micro-steps between host reads of the on-device non-finite flag (no per-step synchronisation)
CHECK_EVERY = 10
#: the largest absolute weight a healthy network has, with a wide margin (trained image, text and speech
#: models keep every weight far below 100): beyond it the run has diverged even while its weights are finite
MAX_ABS_WEIGHT = 1e6


class DivergenceError(ValueError):
    """Training produced a non-finite loss or parameter; the last good checkpoint is kept, nothing final written."""


class DivergenceGuard:
    """Non-finite losses and exploded weights of one run.

    ``max_nonfinite_steps`` > 0 lets the loop skip that many steps of non-finite loss (normal with
    fp16); ``reduce`` sums a tensor over the processes (all stop together, or none does); ``hint`` is
    the error's advice (the flags that fix it); ``latest`` the last good checkpoint, or None."""

    def __init__(self, device: torch.device, *, max_nonfinite_steps: int, reduce: Callable | None,
                 hint: str, latest: Callable[[], Path | None]):
        self.device, self.max_nonfinite_steps, self.reduce = device, max_nonfinite_steps, reduce
        self.hint, self.latest = hint, latest
        self.reset()

    def reset(self) -> None:
        self.nonfinite = torch.zeros((), dtype=torch.long, device=self.device)  # non-finite losses since the start
        self.first_bad = torch.full((), -1, dtype=torch.long, device=self.device)  # 1-based step of the first
        self.skipped = 0  # steps skipped under max_nonfinite_steps

    def loss_ok(self, loss: torch.Tensor, step: int) -> bool:
        """Record a non-finite loss of optimizer step ``step + 1`` on the device (no host sync); with
        ``max_nonfinite_steps`` > 0 sync once per step to skip such a step, and stop after more than that many."""
        bad = ~torch.isfinite(loss.detach()).all()
        self.nonfinite += bad
        self.first_bad = torch.where(bad & (self.first_bad < 0), step + 1, self.first_bad)
        if self.max_nonfinite_steps <= 0:
            return True
        if self.reduce is not None:  # every process must skip the same steps (DDP's all-reduce)
            bad = self.reduce(bad.float()) > 0
        if not bool(bad):
            return True
        self.skipped += 1
        if self.skipped > self.max_nonfinite_steps:
            raise self.error(f"the loss was non-finite in {self.skipped} steps (more than --max-nonfinite-steps "
                             f"{self.max_nonfinite_steps}), the last at step {step + 1}")
        return False

    def check(self, parameters: Sequence[torch.Tensor], *, step: int, epoch: int) -> None:
        """Raise :class:`DivergenceError` when a loss since the start was non-finite (unless skipped steps
        are allowed), or a weight is non-finite or larger than :data:`MAX_ABS_WEIGHT`. One host read."""
        params = [p.detach() for p in parameters if p.numel()]
        largest = torch.stack(torch._foreach_norm(params, float("inf"))).max().float() if params else \
            torch.zeros((), device=self.device)
        values = torch.stack([self.nonfinite.float(), largest.to(self.nonfinite.device)])
        if self.reduce is not None:  # the sum of the counts; a weight's size only matters on its own process
            values = torch.stack([self.reduce(values[0].clone()), values[1]])
        count, largest_now = values.tolist()  # the one host sync
        if self.max_nonfinite_steps <= 0 and count > 0:
            raise self.error(f"the loss became non-finite at step {int(self.first_bad)} (epoch {epoch + 1})")
        if largest_now != largest_now or largest_now in (float("inf"), -float("inf")):
            raise self.error(f"the weights became non-finite by step {step} (epoch {epoch + 1})")
        if largest_now > MAX_ABS_WEIGHT:
            raise self.error(f"the weights exploded by step {step} (epoch {epoch + 1}): the largest is "
                             f"{largest_now:.1e} in absolute value, where a healthy network's stay far below "
                             f"{MAX_ABS_WEIGHT:.0e}")

    def error(self, what: str) -> DivergenceError:
        latest = self.latest()
        kept = f"The last good checkpoint {latest} is kept" if latest else "No checkpoint had been written yet"
        return DivergenceError(f"training diverged: {what}. {self.hint} {kept}; no final weights or report were "
                               "written.")


def divergence_hint(config: Any) -> str:
    """The advice of a divergence error, naming the run's own flags (each a :class:`TrainConfig` field)."""
    clip = (f"clip gradients harder (--max-grad-norm {config.max_grad_norm / 10:g})" if config.max_grad_norm
            else "clip gradients (--max-grad-norm 1)")
    return (f"Likely cause: the learning rate is too high (--lr {config.lr:g}); lower it, {clip}, or with mixed "
            "precision allow skipped steps (--max-nonfinite-steps N).")


__all__ = ["CHECK_EVERY", "MAX_ABS_WEIGHT", "DivergenceError", "DivergenceGuard", "divergence_hint"]
