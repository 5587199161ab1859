"""Per-iteration annealing schedules (ADR anneals per step, not per epoch)."""
from __future__ import annotations

import math
from dataclasses import dataclass


def cosine(start: float, end: float, step: int, total: int) -> float:
    """``end + (start - end) * (1 + cos(pi * step / total)) / 2``: ``start`` at step 0, ``end`` at ``total``."""
    if total <= 0:
        return end
    t = min(max(step, 0), total) / total
    return end + (start - end) * (1 + math.cos(math.pi * t)) / 2


def linear(start: float, end: float, step: int, total: int) -> float:
    if total <= 0:
        return end
    t = min(max(step, 0), total) / total
    return start + (end - start) * t


SCHEDULES = {"cosine": cosine, "linear": linear, "constant": lambda start, end, step, total: start}


@dataclass(frozen=True)
class Schedule:
    """A value that moves from ``start`` to ``end`` over the run's steps."""

    start: float
    end: float
    kind: str = "cosine"

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.kind!r}; choose one of {sorted(SCHEDULES)}")

    def __call__(self, step: int, total: int) -> float:
        return SCHEDULES[self.kind](self.start, self.end, step, total)
