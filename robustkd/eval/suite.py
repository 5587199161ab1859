"""The whole evaluation in one call: robustness, calibration, consistency, the budget curve and the
sanity checks, with an optional report on disk. ``robustkd eval`` is a thin shell around it.

    from robustkd import create_task, run_evaluation
    ev = run_evaluation(task, model, attacks=["pgd20", "autoattack"], max_samples=1000, output_dir="eval")
    ev.report["metrics"]["worst_case"]["accuracy"], ev.passed
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..attacks.base import Attack, split_attack_specs  # noqa: F401 - split_attack_specs: re-exported for the CLI
from ..attacks.base import build_attacks as _build_attacks
from ..task import Batch, DataNotFoundError, Task
from .curves import DEFAULT_FACTORS, BudgetSweep, budget_sweep
from .metrics import DEFAULT_BINS, compute_metrics
from .robustness import EvalResult, evaluate_predictions, gradient_floor
from .sanity import SanityCheck, announce, changed_tensors, input_gradient_status, run_sanity_checks, snapshot


@dataclass
class Evaluation:
    """What :func:`run_evaluation` returns: the report (see docs/evaluation.md), the per-example
    outcomes, the budget sweep, the sanity checks and the files written."""

    report: dict[str, Any]
    result: EvalResult
    sweep: BudgetSweep | None
    checks: list[SanityCheck]
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """True when no sanity check failed."""
        return not any(c.failed for c in self.checks)


def build_attacks(specs: str | Iterable[str] | Mapping[str, Attack], task: Task, **defaults: Any) -> dict[str, Attack]:
    """Attacks from specs in the one spec language (:mod:`robustkd.attacks.base`: ``pgd20;autoattack``,
    ``pgd:eps=4/255``); ``defaults`` (e.g. the run's ``eps=``/``norm=``) apply unless a spec names them.
    A mapping of built attacks is taken as it is."""
    if isinstance(specs, Mapping):
        return dict(specs)
    attacks = _build_attacks(specs, task, **defaults)
    if not attacks:
        raise ValueError("no attacks given: pass at least one, e.g. pgd20")
    return attacks


class _OnDevice:
    """A loader whose batches are moved to ``device`` (``accelerate.utils.send_to_device``)."""

    def __init__(self, loader: Iterable[Batch], device: torch.device):
        self.loader, self.device = loader, device

    def __iter__(self) -> Iterator[Batch]:
        from accelerate.utils import send_to_device

        for batch in self.loader:
            yield send_to_device(batch, self.device)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]


def eval_loader(task: Task, split: str = "test", batch_size: int = 128, max_samples: int | None = None,
                seed: int = 0) -> Any:
    """The evaluation loader, with a clear error for a split the data does not have."""
    try:
        return task.dataloader(split, batch_size, shuffle=False, max_samples=max_samples, seed=seed)
    except DataNotFoundError:
        raise
    except (KeyError, ValueError) as exc:
        if split in str(exc):
            raise DataNotFoundError(f"the task {task.name!r} has no {split!r} split ({exc})") from exc
        raise


def load_checkpoint(path: str | Path, task: Task, which: str = "auto") -> tuple[nn.Module, str]:
    """The model of a recipe's output directory and which weights were taken (``student`` or ``ema``);
    weights of another architecture or class count give a clear error instead of a size-mismatch trace."""
    from ..checkpoint import WEIGHT_FILES, load_model, read_meta

    path = Path(path).expanduser()
    if which == "auto":
        which = "ema" if (path / WEIGHT_FILES["ema"]).exists() else "student"
    try:
        model = load_model(path, task, which)  # type: ignore[arg-type]
    except RuntimeError as exc:
        meta = read_meta(path)
        raise ValueError(f"the weights in {path} do not fit the model {meta.get('model')!r} of task {task.name!r} "
                         f"({str(exc).strip().splitlines()[-1][:200]}): was it trained with another --model, "
                         f"model options or task?") from exc
    return model, which


def model_info(model: nn.Module, name: str | None = None, **extra: Any) -> dict[str, Any]:
    """What the report says about the model."""
    return {"name": name or type(model).__name__, "class": f"{type(model).__module__}.{type(model).__qualname__}",
            "num_parameters": int(sum(p.numel() for p in model.parameters())), **extra}


def run_evaluation(task: Task, model: nn.Module, attacks: str | Sequence[str] | Mapping[str, Attack] | None = None, *,
                   loader: Iterable[Batch] | None = None, split: str = "test", max_samples: int | None = None,
                   batch_size: int = 128, seed: int = 0, device: str | torch.device | None = None,
                   n_bins: int = DEFAULT_BINS, curve_factors: Sequence[float] = DEFAULT_FACTORS,
                   curve_steps: int = 10, output_dir: str | Path | None = None,
                   model_meta: Mapping[str, Any] | None = None, history: list[dict[str, Any]] | None = None,
                   data_dir: str | None = None, progress: bool = False, verbose: bool = True,
                   sections: Mapping[str, Any] | None = None) -> Evaluation:
    """Evaluate ``model`` on ``task``: clean and robust accuracy (per attack, worst case), calibration,
    consistency, the accuracy-vs-budget curve and the sanity checks; write ``report.json``, PNGs and
    ``report.html`` to ``output_dir`` when given. ``history`` (a run's ``metrics.jsonl`` rows) adds the
    robust-overfitting analysis. ``sections`` are extra top-level report sections (a recipe's run
    configuration, MTARD balance, achieved SNR, ...); a value that is callable is called after the
    attacks ran, so it can report what they measured. Failed sanity checks are printed loudly (``verbose``) and set
    ``Evaluation.passed`` to False; they never raise, so the report is always written."""
    from .. import __version__
    from .report import build_report, write_report

    started = time.perf_counter()
    attacks = build_attacks(attacks if attacks is not None else task.default_eval_attacks, task)
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    model = model.to(device)
    if loader is None:
        loader = eval_loader(task, split, batch_size, max_samples, seed)
    loader = _OnDevice(loader, device)
    first = next(iter(loader), None)
    if first is None:
        raise DataNotFoundError(f"the {split!r} split of {task.name!r} is empty")
    task.check_model(model, first)

    floor = gradient_floor(model) if input_gradient_status(task, model, first)[0] == "none" else None
    before = snapshot(model)
    torch.manual_seed(seed)
    # split over the processes of `accelerate launch` / torchrun (one process: all batches), per-batch seeds
    label = {"ema": "EMA", "student": "student"}.get(str((model_meta or {}).get("which")), (model_meta or {}).get("name"))
    result = evaluate_predictions(task, model, loader, attacks, progress=progress, seed=seed, split_processes=True,
                                  label=label)
    metrics = compute_metrics(result, n_bins)
    summary = result.summary()
    sweep, _ = budget_sweep(task, model, loader, factors=curve_factors, steps=curve_steps, seed=seed,
                            progress=progress, split_processes=True, label=label)
    changed = changed_tensors(model, before)
    checks = run_sanity_checks(task, model, first, sweep, attacks, summary.get("robust_accuracy", {}),
                               int(result.labels.numel()), changed)
    extra = {k: (v() if callable(v) else v) for k, v in (sections or {}).items()}
    report = build_report(
        task=task, model=model_info(model, **dict(model_meta or {})), attacks=attacks, metrics=metrics,
        sweep=sweep, checks=checks, seed=seed, split=split, history=history, data_dir=data_dir,
        seconds=time.perf_counter() - started, device=str(device), version=__version__, sections=extra)
    files: dict[str, Path] = {}
    from ..distributed import process_index

    if output_dir is not None and process_index() == 0:  # the main process writes
        files = write_report(report, output_dir, history=history)
    if floor is not None:
        floor.remove()
    if verbose:
        announce(checks)
    return Evaluation(report, result, sweep, checks, files)
