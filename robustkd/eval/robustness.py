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
                         accelerator: Any = None, progress: bool = False, *, seed: int | None = None,
                         split_processes: bool = False) -> EvalResult:
    """Run the model clean and under each attack; per-example probabilities in loader order.

    ``accelerator``: the loader is already sharded by Accelerate; outputs are gathered with
    ``gather_for_metrics`` (the trainer's evaluation). ``split_processes``: the loader is the whole
    set on every process; process ``r`` of ``n`` takes batches ``r, r + n, ...`` and the per-example
    results are gathered on every process in loader order. ``seed``: the random state is set to
    ``seed + batch index`` before each batch's attacks, so a batch's random starts do not depend on
    which process runs it or on the batches before it: results are identical to one process.
    """
    from tqdm.auto import tqdm

    if split_processes and accelerator is not None:
        raise ValueError("split_processes splits an unsharded loader; an accelerator-prepared loader is sharded already")
    n_proc, rank = _process_group() if split_processes else (1, 0)
    show = progress and (accelerator is None or accelerator.is_local_main_process) and rank == 0
    with victim_mode(model, "eval"):  # each attack sets (and restores) its own mode on top
        rows = [_evaluate_batch(task, model, i, batch, attacks, accelerator, seed)
                for i, batch in enumerate(tqdm(loader, desc="evaluating", leave=False, disable=not show))
                if i % n_proc == rank]
    if n_proc > 1:
        from accelerate.utils import gather_object

        rows = sorted(gather_object(rows), key=lambda r: r[0])
    if not rows:
        raise ValueError("the evaluation loader gave no batches")
    return EvalResult(torch.cat([r[1] for r in rows]), torch.cat([r[2] for r in rows]),
                      {k: torch.cat([r[3][k] for r in rows]) for k in attacks})


def _process_group() -> tuple[int, int]:
    """(number of processes, this process's index) of the running ``torch.distributed`` group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _evaluate_batch(task: Task, model: nn.Module, index: int, batch: Any, attacks: dict[str, Attack],
                    accelerator: Any, seed: int | None) -> tuple[int, Tensor, Tensor, dict[str, Tensor]]:
    """One batch: labels, clean and per-attack probabilities (gathered across an accelerator's processes)."""
    if seed is not None:
        torch.manual_seed(seed + index)
    y = task.labels(batch)
    with torch.no_grad():
        clean = task.logits(model, batch).float().softmax(1)
    advs: dict[str, Tensor] = {}
    for name, attack in attacks.items():
        result = attack(model, batch, y)
        with torch.no_grad():
            advs[name] = task.logits(model, *result).float().softmax(1)
    if accelerator is not None:
        y, clean = accelerator.gather_for_metrics(y), accelerator.gather_for_metrics(clean)
        advs = {k: accelerator.gather_for_metrics(v) for k, v in advs.items()}
    return index, y.cpu(), clean.cpu(), {k: v.cpu() for k, v in advs.items()}


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
