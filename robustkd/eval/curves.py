"""Accuracy against the perturbation budget, on the axis the threat model names (``threat.axis()``:
eps, SNR, a relative size, ...) and scaled by the threat model itself (``threat.scaled``); the
"whole domain" budget is the threat model's too (``threat.whole_domain()``).

One PGD sweep gives the curve *and* the numbers two sanity checks need (budget 0 must equal
clean accuracy; a budget covering the whole input domain must drive accuracy to about zero),
so the model is attacked once per budget, never twice.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..attacks.pgd import PGD
from ..task import Task
from ..threat import ThreatModel
from .robustness import EvalResult, evaluate_predictions

DEFAULT_FACTORS: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 4.0)
LARGE = "large"


@dataclass
class BudgetPoint:
    """One budget of the sweep: ``factor`` times the task's default budget."""

    factor: float
    threat: ThreatModel
    x: float | None  # the value on the plot's x axis (None: the clean end of an SNR axis)


@dataclass
class BudgetSweep:
    """The sweep's accuracies; ``large_accuracy`` is ``None`` where no "whole domain" budget exists."""

    axis: str
    default_x: float | None
    attack: dict[str, Any]
    points: list[dict[str, Any]] = field(default_factory=list)
    clean_accuracy: float = float("nan")
    large: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"axis": self.axis, "default_x": self.default_x, "attack": self.attack, "points": self.points,
                "clean_accuracy": self.clean_accuracy, "large_budget": self.large}


def axis_of(threat: ThreatModel) -> tuple[str, float]:
    """The x-axis label and the multiplier from eps to x (the threat model's own :meth:`~ThreatModel.axis`)."""
    return threat.axis()


def budget_grid(threat: ThreatModel, factors: Sequence[float] = DEFAULT_FACTORS) -> list[BudgetPoint]:
    """The threat model at ``factor x`` its budget (``threat.scaled``); factor 0 is always budget 0."""
    if any(f < 0 for f in factors):
        raise ValueError(f"budget factors must be >= 0, got {list(factors)}")
    points = []
    for f in sorted(set(float(f) for f in factors)):
        scaled = threat.scaled(f)
        points.append(BudgetPoint(f, scaled, scaled.axis_value()))
    return points


def large_budget(task: Task, threat: ThreatModel) -> ThreatModel | None:
    """A budget that lets the attack reach (almost) any input of the domain; ``None`` where the threat
    model has no bounded domain to fill (e.g. token embeddings)."""
    return threat.whole_domain()


def budget_sweep(task: Task, model: nn.Module, loader, threat: ThreatModel | None = None,
                 factors: Sequence[float] = DEFAULT_FACTORS, steps: int = 10, include_large: bool = True,
                 seed: int = 0, accelerator: Any = None, progress: bool = False,
                 split_processes: bool = False, label: str | None = None) -> tuple[BudgetSweep, EvalResult]:
    """Robust accuracy under PGD (``steps`` steps, random start) at each budget of the grid; ``label``
    names the model on the progress bar."""
    threat = threat if threat is not None else task.threat_model()
    grid = budget_grid(threat, factors)
    attacks: dict[str, PGD] = {f"budget_x{p.factor:g}": PGD(task, p.threat, steps=steps) for p in grid}
    large = large_budget(task, threat) if include_large else None
    if large is not None:  # the large_budget sanity check's own step count, whatever the curve uses
        from .sanity import large_budget_steps

        attacks[LARGE] = PGD(task, large, steps=large_budget_steps(steps))
    torch.manual_seed(seed)
    result = evaluate_predictions(task, model, loader, attacks, accelerator, progress,
                                  seed=seed if split_processes else None, split_processes=split_processes,
                                  label=label)
    axis, _ = axis_of(threat)
    sweep = BudgetSweep(axis=axis, default_x=threat.axis_value(),
                        attack={**PGD(task, threat, steps=steps).describe(), "eps": None},
                        clean_accuracy=float(result.clean_correct().float().mean()))
    for p, name in zip(grid, attacks):
        sweep.points.append({"factor": p.factor, "x": p.x, "threat": p.threat.describe(),
                             "accuracy": float(result.robust_correct(name).float().mean())})
    if large is not None:
        sweep.large = {"threat": large.describe(), "accuracy": float(result.robust_correct(LARGE).float().mean()),
                       "steps": attacks[LARGE].steps}
    return sweep, result
