"""A gradient-free attack: the worst of N random points in the threat ball, per example.

Declared as an object entry point (``random_search = "robustkd_tabular.attacks:RandomSearch"``),
so it needs no decorator. If it finds adversarial examples that PGD misses, the model masks
its gradients and PGD numbers are not to be trusted.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkd.attacks.base import Attack
from robustkd.task import Adversarial, Batch, ContinuousTask, Task
from robustkd.threat import ThreatModel


class RandomSearch(Attack):
    """Random search: the highest-loss of ``samples`` uniform draws in the threat ball (gradient-free)."""

    requires = (ContinuousTask,)  # any task whose inputs are one continuous tensor

    def __init__(self, task: Task, threat: ThreatModel | None = None, *, eps: float | None = None,
                 norm: str | None = None, samples: int = 32, steps: int | None = None):
        super().__init__(task)
        self.threat = threat if threat is not None else task.threat_model(eps=eps, norm=norm)
        self.samples = int(steps if steps is not None else samples)  # "random_search64" means 64 draws
        if self.samples < 1:
            raise ValueError(f"random_search needs samples >= 1, got {self.samples}")

    @torch.no_grad()
    def perturb(self, model: nn.Module, batch: Batch, targets: Tensor | None = None) -> Adversarial:
        task, threat = self.task, self.threat
        targets = task.labels(batch) if targets is None else targets
        x = task.perturbation_base(model, batch).detach()
        mask = task.perturbation_mask(batch)
        best = torch.zeros_like(x)
        best_score = F.cross_entropy(task.logits(model, batch, best), targets, reduction="none")
        shape = (-1,) + (1,) * (x.dim() - 1)
        for _ in range(self.samples):
            delta = threat.init(x, "uniform", mask)
            score = F.cross_entropy(task.logits(model, batch, delta), targets, reduction="none")
            better = score > best_score
            best = torch.where(better.view(shape), delta, best)
            best_score = torch.where(better, score, best_score)
        return Adversarial(batch, best)

    def describe(self) -> dict[str, Any]:
        return {"attack": "random_search", **self.threat.describe(), "samples": self.samples}
