"""Clean and robust accuracy over a loader, for any task, model and set of attacks.

Robust accuracy under several attacks is the per-example worst case (an example counts as
robust only if every attack fails on it), as AutoAttack reports it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..attacks.base import Attack, build_attacks, victim_mode
from ..task import Task


@dataclass
class EvalResult:
    """Per-example outcomes; ``summary()`` gives accuracies as fractions in [0, 1]."""

    labels: Tensor
    clean_probs: Tensor
    adv_probs: dict[str, Tensor] = field(default_factory=dict)

    def clean_correct(self) -> Tensor:
        return self.clean_probs.argmax(1) == self.labels

    def robust_correct(self, name: str) -> Tensor:
        return self.adv_probs[name].argmax(1) == self.labels

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_examples": int(self.labels.numel()),
                               "clean_accuracy": self.clean_correct().float().mean().item()}
        if self.adv_probs:
            out["robust_accuracy"] = {n: self.robust_correct(n).float().mean().item() for n in self.adv_probs}
            if len(self.adv_probs) > 1:
                worst = torch.stack([self.robust_correct(n) for n in self.adv_probs]).all(0)
                out["worst_case_accuracy"] = worst.float().mean().item()
        return out


def evaluate_predictions(task: Task, model: nn.Module, loader, attacks: dict[str, Attack],
                         accelerator: Any = None, progress: bool = False) -> EvalResult:
    """Run the model clean and under each attack; gather per-example probabilities (all ranks)."""
    from tqdm.auto import tqdm

    labels, clean, adv = [], [], {name: [] for name in attacks}
    show = progress and (accelerator is None or accelerator.is_local_main_process)
    with victim_mode(model, "eval"):  # each attack sets (and restores) its own mode on top
        for batch in tqdm(loader, desc="evaluating", leave=False, disable=not show):
            _evaluate_batch(task, model, batch, attacks, accelerator, labels, clean, adv)
    return EvalResult(torch.cat(labels).cpu(), torch.cat(clean).cpu(),
                      {k: torch.cat(v).cpu() for k, v in adv.items()})


def _evaluate_batch(task: Task, model: nn.Module, batch: Any, attacks: dict[str, Attack], accelerator: Any,
                    labels: list, clean: list, adv: dict[str, list]) -> None:
    """One batch: clean and per-attack probabilities, gathered across processes."""
    y = task.labels(batch)
    with torch.no_grad():
        clean_logits = task.logits(model, batch)
    ys, cs = [y], [clean_logits.float().softmax(1)]
    advs: dict[str, Tensor] = {}
    for name, attack in attacks.items():
        result = attack(model, batch, y)
        with torch.no_grad():
            advs[name] = task.logits(model, *result).float().softmax(1)
    if accelerator is not None:
        ys = [accelerator.gather_for_metrics(y)]
        cs = [accelerator.gather_for_metrics(cs[0])]
        advs = {k: accelerator.gather_for_metrics(v) for k, v in advs.items()}
    labels += ys
    clean += cs
    for k, v in advs.items():
        adv[k].append(v)


def evaluate(task: Task, model: nn.Module, loader=None, attacks: dict[str, Attack] | list[str] | None = None,
             accelerator: Any = None, progress: bool = False) -> dict[str, Any]:
    """Clean accuracy, robust accuracy per attack and their worst case, as fractions in [0, 1].
    Without ``loader``: the task's whole test split. The full suite with calibration, sanity checks
    and a report is :func:`robustkd.eval.run_evaluation`."""
    if loader is None:
        loader = task.dataloader("test", 128, shuffle=False)
    if attacks is None:
        attacks = list(task.default_eval_attacks)
    if not isinstance(attacks, dict):
        attacks = build_attacks(attacks, task)
    return evaluate_predictions(task, model, loader, attacks, accelerator, progress).summary()
