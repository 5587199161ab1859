"""The conformance kit's framework: check results, reports, the ``Check`` runner and the helpers the
task and attack checks share."""
from __future__ import annotations

import contextlib
import copy
import time
import traceback
from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from accelerate.utils import send_to_device
from torch import Tensor, nn

from ..task import Batch, Task
from ..threat import ThreatModel

_TOL = 1e-5


class ConformanceError(AssertionError):
    """A plug-in breaks the contract; the message names each failing check and why."""

    def __init__(self, report: ConformanceReport):
        self.report = report
        failed = report.failures()
        lines = [f"{report.subject} fails {len(failed)} of {len(report.results)} conformance check(s):"]
        lines += [f"  - {r.name}: {r.message}" for r in failed]
        super().__init__("\n".join(lines) + "\n\n" + str(report))


@dataclass(frozen=True)
class CheckResult:
    """One check's outcome. ``skipped`` checks were not run (the message says how to run them)."""

    name: str
    passed: bool
    message: str
    skipped: bool = False
    seconds: float = 0.0

    @property
    def status(self) -> str:
        return "SKIP" if self.skipped else ("PASS" if self.passed else "FAIL")


@dataclass
class ConformanceReport:
    """All checks run on one plug-in; ``str(report)`` is a readable table."""

    subject: str
    results: list[CheckResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed or r.skipped for r in self.results)

    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if not r.passed and not r.skipped]

    def __getitem__(self, name: str) -> CheckResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(f"no check named {name!r}; checks: {[r.name for r in self.results]}")

    def raise_for_failures(self) -> ConformanceReport:
        if not self.passed:
            raise ConformanceError(self)
        return self

    def __str__(self) -> str:
        width = max([len(r.name) for r in self.results] + [10])
        lines = [f"robustkd conformance: {self.subject}"]
        for r in self.results:
            lines.append(f"  {r.status}  {r.name:<{width}}  {r.message}")
        n_pass = sum(r.passed and not r.skipped for r in self.results)
        n_skip = sum(r.skipped for r in self.results)
        lines.append(f"{n_pass} passed, {len(self.failures())} failed, {n_skip} skipped")
        return "\n".join(lines)


class _Skip(Exception):
    """Raised inside a check that was not asked for (reported as SKIP with the reason)."""


class _CheckFailed(Exception):
    """Raised inside a check with the reason it fails."""


def _fail(message: str) -> NoReturn:
    raise _CheckFailed(message)


def _split_size(task: Task, split: str, data: Any = None) -> int:
    """The number of examples of ``split`` (``data``: the split, when it is at hand): a task's splits are
    map-style datasets, so they have a length."""
    data = task.dataset(split) if data is None else data
    if not isinstance(data, Sized):
        _fail(f"dataset({split!r}) is a {type(data).__name__} without len(): a split must be a map-style dataset")
    return len(data)


@dataclass
class Check:
    """One named check bound to its plug-in; calling it raises :class:`ConformanceError` on failure."""

    name: str
    fn: Callable[[], str]
    subject: str

    def run(self) -> CheckResult:
        started = time.perf_counter()
        try:
            message = self.fn() or "ok"
            ok, skipped = True, False
        except _Skip as exc:
            message, ok, skipped = str(exc), False, True
        except (_CheckFailed, AssertionError) as exc:
            message, ok, skipped = str(exc) or type(exc).__name__, False, False
        except Exception as exc:  # noqa: BLE001 - any crash of the plug-in is a failed check
            where = traceback.extract_tb(exc.__traceback__)[-1]
            message = f"raised {type(exc).__name__}: {exc} (at {Path(where.filename).name}:{where.lineno})"
            ok, skipped = False, False
        return CheckResult(self.name, ok, message, skipped, time.perf_counter() - started)

    def __call__(self) -> CheckResult:
        result = self.run()
        if not result.passed and not result.skipped:
            raise ConformanceError(ConformanceReport(self.subject, [result]))
        return result

    def __repr__(self) -> str:  # readable pytest ids
        return self.name


# -- helpers ---------------------------------------------------------------------------------
def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _to(batch: Batch, device: torch.device) -> Batch:
    return send_to_device(batch, device)


def _batch_clone(batch: Batch) -> Batch:
    return {k: (v.clone() if isinstance(v, Tensor) else copy.deepcopy(v)) for k, v in batch.items()}


def _same_batch(a: Batch, b: Batch) -> str | None:
    """``None`` when equal, else the first key that differs."""
    if set(a) != set(b):
        return f"keys {sorted(a)} vs {sorted(b)}"
    for k in a:
        va, vb = a[k], b[k]
        if isinstance(va, Tensor):
            if not isinstance(vb, Tensor) or va.shape != vb.shape or not torch.equal(va, vb):
                return k
        elif va != vb:
            return k
    return None


def _in_ball(threat: ThreatModel, x: Tensor, delta: Tensor, mask: Tensor | None) -> str | None:
    """``None`` when ``delta`` lies in the threat model's ball and domain (and off masked positions)."""
    if delta.shape != x.shape:
        return f"delta has shape {tuple(delta.shape)} but the attack space has shape {tuple(x.shape)}"
    if not torch.isfinite(delta).all():
        return "delta holds NaN or inf"
    size = threat.size(delta.detach().float())
    radius = threat.radius(x.detach().float())
    if isinstance(radius, Tensor):
        radius = radius.flatten(1).amax(1) if threat.per_token else radius.flatten()
    limit = radius * (1 + 1e-4) + 1e-6
    over = size > limit
    if over.any():
        i = int(over.nonzero()[0])
        r = float(radius[i]) if isinstance(radius, Tensor) else float(radius)
        return (f"example {i} is perturbed by {float(size[i]):.6g} in {threat.norm} norm but the threat model "
                f"allows {r:.6g} (eps={threat.eps:g}); project delta with threat.project(x, delta)")
    if threat.domain is not None:
        lo, hi = threat.domain
        adv = x + delta
        if float(adv.min()) < lo - 1e-5 or float(adv.max()) > hi + 1e-5:
            return (f"x + delta spans [{float(adv.min()):.4g}, {float(adv.max()):.4g}], outside the domain "
                    f"[{lo:g}, {hi:g}]; clamp with threat.project(x, delta)")
    if mask is not None:
        m = mask.unsqueeze(-1) if mask.dim() < delta.dim() else mask
        moved = (delta * (1 - m.to(delta.dtype))).abs().max()
        if float(moved) > 0:
            return f"delta moves positions the task masks out (max |delta| there {float(moved):.3g})"
    return None


def _ball_fraction(threat: ThreatModel, x: Tensor, delta: Tensor) -> float:
    """The largest size / radius over the batch (1.0: on the ball's surface)."""
    radius = threat.radius(x.detach().float())
    if isinstance(radius, Tensor):
        radius = radius.flatten(1).amax(1) if threat.per_token else radius.flatten()
        return float((threat.size(delta.detach().float()) / radius.clamp_min(1e-12)).max())
    return float(threat.size(delta.detach().float()).max()) / max(radius, 1e-12)


def _check_logits(task: Task, out: Any, n: int, what: str) -> Tensor:
    if not isinstance(out, Tensor):
        _fail(f"{what} returned {type(out).__name__}, not a tensor of logits")
    if out.dim() != 2 or out.shape != (n, task.num_classes):
        _fail(f"{what} returned shape {tuple(out.shape)}, expected ({n}, {task.num_classes}) = (batch, num_classes)")
    if not out.dtype.is_floating_point:
        _fail(f"{what} returned {out.dtype} logits; they must be floating point")
    if not torch.isfinite(out).all():
        _fail(f"{what} returned NaN or inf logits")
    return out


@contextlib.contextmanager
def _mode_kept(model: Any) -> Iterator[None]:
    """The checks switch the caller's model to eval mode; give it back in the mode it came in."""
    training = model.training if isinstance(model, nn.Module) else None
    try:
        yield
    finally:
        if training is not None:
            model.train(training)


def _describe(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"
