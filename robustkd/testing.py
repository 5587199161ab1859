"""Conformance kit for task and attack plug-ins, in the spirit of scikit-learn's ``check_estimator``.

A plug-in author runs it in their own test suite to learn, check by check, whether the plug-in
honours the contracts the rest of robustkd relies on::

    from robustkd.testing import check_task, check_attack

    def test_my_task():
        check_task(MyTask(), model="my_mlp")            # raises ConformanceError naming the failing check

    def test_my_attack():
        task = MyTask()
        check_attack(MyAttack, task, task.build_model("my_mlp"))

Each check reports ``(name, passed, message)``; :func:`check_task` / :func:`check_attack` return a
:class:`ConformanceReport` and, by default, raise :class:`ConformanceError` (an ``AssertionError``, so
pytest shows it as a plain failure) when any check fails. :func:`task_checks` / :func:`attack_checks`
return the checks one by one for ``pytest.mark.parametrize``. The slow 2-process check (a real
``torchrun`` run of the trainer on gloo) runs only with ``distributed=True``.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .task import Adversarial, Batch, Task
from .threat import ThreatModel

__all__ = ["CheckResult", "ConformanceError", "ConformanceReport", "Check", "attack_checks", "check_attack",
           "check_task", "task_checks"]

_TOL = 1e-5


class ConformanceError(AssertionError):
    """A plug-in breaks the contract; the message names each failing check and why."""

    def __init__(self, report: "ConformanceReport"):
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

    def raise_for_failures(self) -> "ConformanceReport":
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


def _fail(message: str) -> None:
    raise _CheckFailed(message)


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
    return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}


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


# -- tasks -----------------------------------------------------------------------------------
class _TaskContext:
    """What the task checks share, built lazily (a failing prerequisite fails the checks that need it)."""

    def __init__(self, task: Task, model: nn.Module | str | None, models: Sequence[str | nn.Module] | None,
                 batch_size: int, max_samples: int, seed: int):
        self.task, self.batch_size, self.max_samples, self.seed = task, batch_size, max_samples, seed
        self._model_arg, self._models_arg = model, models
        self._cache: dict[str, Any] = {}

    def _cached(self, key: str, build: Callable[[], Any]) -> Any:
        if key not in self._cache:
            try:
                self._cache[key] = ("ok", build())
            except Exception as exc:  # noqa: BLE001
                self._cache[key] = ("error", f"{type(exc).__name__}: {exc}")
        status, value = self._cache[key]
        if status == "error":
            _fail(f"could not get the {key}: {value}")
        return value

    @property
    def model_name(self) -> str:
        if isinstance(self._model_arg, str):
            return self._model_arg
        if isinstance(self._model_arg, nn.Module):
            return type(self._model_arg).__name__
        return getattr(self.task, "default_model", None) or (self.task.model_names() or ["?"])[0]

    def model(self) -> nn.Module:
        def build() -> nn.Module:
            if isinstance(self._model_arg, nn.Module):
                return self._model_arg
            name = self._model_arg if isinstance(self._model_arg, str) else (
                getattr(self.task, "default_model", None) or next(iter(self.task.model_names()), None))
            if name is None:
                raise ValueError("the task lists no models (model_names() is empty): pass model=... to check_task")
            torch.manual_seed(self.seed)  # the same weights, and so the same report, on every run
            return self.task.build_model(name)

        return self._cached("model", build)

    def models(self) -> dict[str, nn.Module]:
        """The models teachers and students are drawn from: ``models`` or every name the task lists."""

        def build() -> dict[str, nn.Module]:
            out = {self.model_name: self.model()}
            wanted = self._models_arg if self._models_arg is not None else self.task.model_names()
            for m in wanted:
                if isinstance(m, nn.Module):
                    out.setdefault(type(m).__name__, m)
                elif m not in out:
                    torch.manual_seed(self.seed)
                    out[m] = self.task.build_model(m)
            return out

        return self._cached("models", build)

    def batch(self, split: str = "test") -> Batch:
        def build() -> Batch:
            loader = self.task.dataloader(split, self.batch_size, shuffle=False, max_samples=self.max_samples,
                                          seed=self.seed)
            batch = next(iter(loader))
            return _to(batch, _device_of(self.model()))

        return self._cached(f"{split} batch", build)


def _task_check_fns(ctx: _TaskContext, distributed: bool) -> list[tuple[str, Callable[[], str]]]:
    task = ctx.task

    def num_classes() -> str:
        n = getattr(task, "num_classes", None)
        if not isinstance(n, int) or isinstance(n, bool) or n < 2:
            _fail(f"num_classes must be an int >= 2, got {n!r}")
        return f"{n} classes"

    def datasets() -> str:
        sizes = {}
        for split in ("train", "test"):
            data = task.dataset(split)
            n = len(data)
            if n == 0:
                _fail(f"the {split!r} split is empty")
            item = data[0]
            if not isinstance(item, dict) or "labels" not in item:
                _fail(f"dataset({split!r})[0] is {type(item).__name__} with keys "
                      f"{sorted(item) if isinstance(item, dict) else '-'}; an example must be a dict with 'labels'")
            sizes[split] = n
        return ", ".join(f"{k}: {v} examples" for k, v in sizes.items())

    def batch_structure() -> str:
        batch = ctx.batch("test")
        if not isinstance(batch, dict):
            _fail(f"a batch is a {type(batch).__name__}; it must be a dict of tensors")
        labels = task.labels(batch)
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.dtype.is_floating_point:
            _fail(f"labels must be a 1-D integer tensor, got {getattr(labels, 'dtype', type(labels))} of shape "
                  f"{tuple(getattr(labels, 'shape', ()))}")
        expected = min(ctx.batch_size, len(task.dataset("test")))
        if labels.shape[0] != expected or task.batch_size(batch) != expected:
            _fail(f"a batch of {ctx.batch_size} from dataloader() has {labels.shape[0]} labels and batch_size()="
                  f"{task.batch_size(batch)}; expected {expected}")
        base = task.perturbation_base(ctx.model(), batch)
        if base.shape[0] != expected:
            _fail(f"perturbation_base has leading dimension {base.shape[0]}, expected the batch size {expected}")
        task.validate_batch(batch)
        return f"keys {sorted(batch)}; attack space {tuple(base.shape)} {base.dtype}"

    def labels_in_range() -> str:
        seen = 0
        for split in ("train", "test"):
            loader = task.dataloader(split, 64, shuffle=False, max_samples=ctx.max_samples, seed=ctx.seed)
            for batch in loader:
                y = task.labels(batch)
                bad = (y < 0) | (y >= task.num_classes)
                if bad.any():
                    _fail(f"label {int(y[bad][0])} in the {split!r} split is outside 0..{task.num_classes - 1} "
                          f"(num_classes={task.num_classes}): fix the label column or num_classes")
                seen += y.numel()
        return f"{seen} labels in 0..{task.num_classes - 1}"

    def input_domain() -> str:
        model, batch = ctx.model(), ctx.batch("test")
        base = task.perturbation_base(model, batch).detach()
        threat = task.threat_model()
        if task.input_domain is None:
            if threat.domain is not None:
                _fail(f"the threat model clamps to {threat.domain} but the task declares no input_domain")
            return "no input domain declared: the attack space is bounded only by the threat model"
        lo, hi = task.input_domain
        if float(base.min()) < lo - _TOL or float(base.max()) > hi + _TOL:
            _fail(f"inputs span [{float(base.min()):.4g}, {float(base.max()):.4g}] but input_domain is [{lo:g}, {hi:g}]: "
                  f"keep normalisation inside the model so attacks work in the raw domain")
        if threat.domain is None:
            _fail(f"the task's inputs live in [{lo:g}, {hi:g}] but its threat model does not clamp to a domain: "
                  f"adversarial inputs could leave it (pass domain=task.input_domain)")
        if threat.domain[0] < lo - _TOL or threat.domain[1] > hi + _TOL:
            _fail(f"the threat model's domain {threat.domain} is wider than input_domain ({lo:g}, {hi:g})")
        return f"inputs in [{float(base.min()):.3g}, {float(base.max()):.3g}] within [{lo:g}, {hi:g}]; threat clamps to {threat.domain}"

    def models() -> str:
        batch = ctx.batch("test")
        n = task.batch_size(batch)
        shapes = []
        for name, model in ctx.models().items():
            if not isinstance(model, nn.Module):
                _fail(f"build_model({name!r}) returned {type(model).__name__}, not an nn.Module")
            model.eval()
            with torch.no_grad():
                _check_logits(task, task.logits(model, _to(batch, _device_of(model))), n, f"logits({name})")
            task.check_model(model, _to(batch, _device_of(model)))
            shapes.append(name)
        return f"{len(shapes)} model(s) give ({n}, {task.num_classes}) logits: {', '.join(shapes)}"

    def zero_delta() -> str:
        model, batch = ctx.model().eval(), ctx.batch("test")
        base = task.perturbation_base(model, batch).detach()
        with torch.no_grad():
            clean = task.logits(model, batch)
            zero = task.logits(model, batch, torch.zeros_like(base))
        diff = float((clean - zero).abs().max())
        if diff > 1e-4 * (1 + float(clean.abs().max())):
            _fail(f"logits(model, batch, zeros) differs from logits(model, batch) by {diff:.3g}: a zero "
                  f"perturbation must leave the output unchanged")
        return f"max difference {diff:.2g}"

    def differentiable() -> str:
        model, batch = ctx.model().eval(), ctx.batch("test")
        base = task.perturbation_base(model, batch).detach()
        delta = torch.zeros_like(base, requires_grad=True)
        out = task.logits(model, batch, delta)
        if not out.requires_grad:
            _fail("logits(model, batch, delta) does not depend on delta through autograd (no graph: detached, "
                  "computed under no_grad, or delta is converted to non-tensor values); attacks need its gradient")
        loss = out.float().square().sum()  # independent of the labels, which another check covers
        (grad,) = torch.autograd.grad(loss, delta, allow_unused=True)
        if grad is None:
            _fail("logits(model, batch, delta) is not differentiable in delta: the gradient is None (delta is "
                  "detached or unused)")
        if not torch.isfinite(grad).all():
            _fail("the gradient of the loss with respect to delta holds NaN or inf")
        if float(grad.abs().max()) == 0.0:
            _fail("the gradient with respect to delta is zero everywhere (a rounding, argmax or straight "
                  "quantisation step masks it): gradient-based attacks would do nothing")
        return f"d loss / d delta has shape {tuple(grad.shape)}, max |grad| {float(grad.abs().max()):.3g}"

    def threat_model() -> str:
        threat = task.threat_model()
        if not isinstance(threat, ThreatModel):
            _fail(f"threat_model() returned {type(threat).__name__}, not a robustkd.threat.ThreatModel")
        model, batch = ctx.model(), ctx.batch("test")
        x = task.perturbation_base(model, batch).detach()
        mask = task.perturbation_mask(batch)
        torch.manual_seed(ctx.seed)
        if (err := _in_ball(threat, x, threat.init(x, "uniform", mask), mask)) is not None:
            _fail(f"threat.init: {err}")
        big = torch.randn_like(x) * 10 * (float(threat.eps) + 1.0) * (1 + x.abs().max())
        if (err := _in_ball(threat, x, threat.project(x, big, mask), mask)) is not None:
            _fail(f"threat.project of a large step: {err}")
        smaller = task.threat_model(eps=threat.eps / 2, norm=threat.norm)
        if abs(smaller.eps - threat.eps / 2) > 1e-12:
            _fail(f"threat_model(eps={threat.eps / 2:g}) ignores eps (got {smaller.eps:g})")
        return repr(threat)

    def teachers() -> str:
        from .teachers import EMATeacher, FrozenTeacher

        batch = ctx.batch("test")
        n = task.batch_size(batch)
        threat = task.threat_model()
        student = copy.deepcopy(ctx.model()).train()
        x = task.perturbation_base(student, batch).detach()
        torch.manual_seed(ctx.seed)
        delta = threat.init(x, "uniform", task.perturbation_mask(batch))
        ema = EMATeacher(student, decay=0.5)
        t_out = _check_logits(task, ema.logits(task, batch, delta), n, "EMATeacher.logits")
        student.eval()
        with torch.no_grad():
            s_out = task.logits(student, batch, delta)
        student.train()
        if not torch.allclose(t_out, s_out, atol=1e-4, rtol=1e-4):
            _fail(f"a fresh EMATeacher disagrees with its student by {float((t_out - s_out).abs().max()):.3g}: "
                  "the task's logits must depend only on the model it is given")
        ema.update(student)
        names = []
        for name, other in ctx.models().items():
            net = copy.deepcopy(other).train()
            fb = _to(batch, _device_of(net))
            xo = task.perturbation_base(net, fb).detach()
            d = delta if xo.shape == delta.shape else threat.init(xo, "uniform", task.perturbation_mask(fb))
            # each architecture as a student: gradients reach its parameters through task.logits ...
            F.cross_entropy(task.logits(net, fb, d), task.labels(fb)).backward()
            if not any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in net.parameters()):
                _fail(f"training {name} as a student through task.logits gives no parameter gradients")
            # ... and as a frozen teacher
            _check_logits(task, FrozenTeacher(net).logits(task, fb, d), n, f"FrozenTeacher({name}).logits")
            names.append(name)
        return f"EMATeacher matches its student; {', '.join(names)} work as frozen teachers and as students"

    def default_attacks() -> str:
        from .attacks.base import attacks_for, create_attack

        specs = [task.default_train_attack, *task.default_eval_attacks]
        for spec in specs:
            atk = create_attack(spec, task)
            if not callable(atk):
                _fail(f"create_attack({spec!r}) built {type(atk).__name__}, which is not callable")
        available = attacks_for(task)
        if not available:
            _fail(f"no registered attack accepts the modality {task.modality!r}")
        return f"defaults {specs} build; attacks for {task.modality}: {', '.join(available)}"

    def train_step() -> str:
        from .config import build_method
        from .distill.methods import Progress

        batch = ctx.batch("train")
        student = copy.deepcopy(ctx.model()).train()
        method = build_method({"method": "pgd_at", "attack_steps": 2}, task, threat=task.threat_model())
        method.setup(student, None)
        progress = Progress(0, 1, 0, 0)
        torch.manual_seed(ctx.seed)
        prepared = method.prepare(student, batch, progress)
        before = [p.detach().clone() for p in student.parameters()]
        opt = torch.optim.SGD(student.parameters(), lr=0.01)
        loss, _ = method.loss(student, batch, prepared, progress)
        if loss.dim() != 0 or not torch.isfinite(loss):
            _fail(f"the PGD-AT loss is {loss!r}; expected a finite scalar")
        loss.backward()
        grads = [p.grad for p in student.parameters() if p.requires_grad]
        if not grads or any(g is None for g in grads) or not all(torch.isfinite(g).all() for g in grads):
            _fail("after one PGD-AT step some trainable parameters have no (or non-finite) gradients")
        opt.step()
        if all(torch.equal(a, p) for a, p in zip(before, student.parameters())):
            _fail("one optimizer step on the PGD-AT loss left every parameter unchanged")
        return f"PGD-AT loss {loss.item():.4f}; gradients reach all {len(grads)} parameter tensors"

    def dataloader_deterministic() -> str:
        bs = ctx.batch_size

        def first_batches(split: str, seed: int) -> list[Batch]:
            torch.manual_seed(seed)  # as the trainer's set_seed does: augmentation may draw from it
            loader = task.dataloader(split, bs, shuffle=(split == "train"), max_samples=ctx.max_samples, seed=seed)
            it = iter(loader)
            return [next(it) for _ in range(min(2, len(loader)))]

        for split in ("train", "test"):
            a, b = first_batches(split, ctx.seed), first_batches(split, ctx.seed)
            for i, (ba, bb) in enumerate(zip(a, b)):
                if (key := _same_batch(ba, bb)) is not None:
                    _fail(f"two {split!r} dataloaders with seed={ctx.seed} differ in batch {i} ({key!r}): seed every "
                          f"random choice (shuffling, subsets, augmentation) from the seed / torch's RNG")
        n = min(len(task.dataset("train")), ctx.max_samples)
        if n >= 4 * bs:
            a, b = first_batches("train", ctx.seed), first_batches("train", ctx.seed + 1)
            if all(_same_batch(x, y) is None for x, y in zip(a, b)):
                _fail("the train dataloader gives the same batches for seed=0 and seed=1: the seed is ignored")
        return "same seed -> same batches (train and test); another seed -> another order"

    def distributed_run() -> str:
        if not distributed:
            raise _Skip("not run: pass distributed=True to train for one epoch in 2 processes (torchrun, gloo; ~20 s)")
        return _run_two_processes(task, ctx.model(), ctx.batch_size, ctx.seed)

    return [("num_classes", num_classes), ("datasets", datasets), ("batch_structure", batch_structure),
            ("labels_in_range", labels_in_range), ("input_domain", input_domain), ("models", models),
            ("zero_delta", zero_delta), ("logits_differentiable", differentiable), ("threat_model", threat_model),
            ("teachers_and_students", teachers), ("default_attacks", default_attacks), ("train_step", train_step),
            ("dataloader_deterministic", dataloader_deterministic), ("distributed", distributed_run)]


def task_checks(task: Task, model: nn.Module | str | None = None, *, models: Sequence[str | nn.Module] | None = None,
                distributed: bool = False, batch_size: int = 4, max_samples: int = 256, seed: int = 0) -> list[Check]:
    """The task checks one by one (for ``pytest.mark.parametrize``); see :func:`check_task`."""
    ctx = _TaskContext(task, model, models, batch_size, max_samples, seed)
    subject = f"task {getattr(task, 'name', '?')!r} ({_describe(task)})"
    return [Check(name, fn, subject) for name, fn in _task_check_fns(ctx, distributed)]


def check_task(task: Task, model: nn.Module | str | None = None, *, models: Sequence[str | nn.Module] | None = None,
               distributed: bool = False, batch_size: int = 4, max_samples: int = 256, seed: int = 0,
               raise_on_failure: bool = True) -> ConformanceReport:
    """Run every task check and report each; raise :class:`ConformanceError` if any fails.

    ``model``: the model (or a name for ``task.build_model``) the checks run; by default the task's
    ``default_model`` attribute or its first ``model_names()``. ``models``: the models that must work as
    teachers and students (default: every name in ``model_names()``). ``distributed=True`` adds a real
    2-process training run (slow). ``max_samples`` bounds how much data the checks read.
    """
    checks = task_checks(task, model, models=models, distributed=distributed, batch_size=batch_size,
                         max_samples=max_samples, seed=seed)
    subject = checks[0].subject if checks else f"task {task!r}"
    ctx_model = model if isinstance(model, str) else (type(model).__name__ if model is not None else None)
    with _mode_kept(model):
        report = ConformanceReport(subject + (f" with model {ctx_model}" if ctx_model else ""),
                                   [c.run() for c in checks])
    return report.raise_for_failures() if raise_on_failure else report


# -- attacks ---------------------------------------------------------------------------------
def _attack_check_fns(get_attack: Callable[[], Any], task: Task, model: nn.Module, batch: Batch,
                      seed: int) -> list[tuple[str, Callable[[], str]]]:
    labels = task.labels(batch)

    def threat_of(attack: Any) -> ThreatModel:
        threat = getattr(attack, "threat", None)
        return threat if isinstance(threat, ThreatModel) else task.threat_model()

    def run(attack: Any, targets: Tensor | None = None, victim: nn.Module | None = None) -> Adversarial:
        torch.manual_seed(seed)
        out = attack(victim if victim is not None else model, batch, labels if targets is None else targets)
        if not isinstance(out, tuple) or len(out) != 2:
            _fail(f"the attack returned {type(out).__name__}; it must return Adversarial(batch, delta)")
        adv_batch, delta = out
        if not isinstance(adv_batch, dict):
            _fail(f"the attack's batch is {type(adv_batch).__name__}, not a dict")
        return Adversarial(adv_batch, delta)

    def construct() -> str:
        attack = get_attack()
        if not callable(attack):
            _fail(f"the factory built {type(attack).__name__}, which is not callable")
        describe = getattr(attack, "describe", None)
        if describe is None:
            _fail("the attack has no describe() (reports record every attack's parameters)")
        desc = describe()
        if not isinstance(desc, dict):
            _fail(f"describe() returned {type(desc).__name__}, not a dict")
        json.dumps(desc)
        return f"{_describe(attack)}: {json.dumps(desc)[:160]}"

    def returns_adversarial() -> str:
        adv = run(get_attack())
        n = task.batch_size(batch)
        if adv.delta is None:
            if adv.batch is batch:
                _fail("the attack returned the input batch itself and no delta: return a new batch")
            task.validate_batch(adv.batch)
            if task.batch_size(adv.batch) != n:
                _fail(f"the adversarial batch holds {task.batch_size(adv.batch)} examples, the clean one {n}")
            _check_logits(task, task.logits(model, adv.batch), n, "task.logits(model, adversarial batch)")
            return "a new, valid batch (discrete attack)"
        x = task.perturbation_base(model, batch)
        if not isinstance(adv.delta, Tensor) or adv.delta.shape != x.shape:
            _fail(f"delta has shape {tuple(getattr(adv.delta, 'shape', ()))}; it must match the attack space "
                  f"task.perturbation_base(model, batch) of shape {tuple(x.shape)}")
        if adv.delta.requires_grad:
            _fail("the returned delta still requires grad: detach it (it would keep the attack's graph alive)")
        _check_logits(task, task.logits(model, *adv), n, "task.logits(model, *adversarial)")
        return f"Adversarial(batch, delta) with delta {tuple(adv.delta.shape)}"

    def labels_unchanged() -> str:
        adv = run(get_attack())
        if not torch.equal(task.labels(adv.batch), labels):
            _fail("the adversarial batch has other labels than the clean one: an attack may change inputs only")
        return "labels kept"

    def in_threat_model() -> str:
        attack = get_attack()
        adv = run(attack)
        if adv.delta is None:
            return "discrete attack: no delta to measure"
        threat = threat_of(attack)
        x = task.perturbation_base(model, adv.batch).detach()
        if (err := _in_ball(threat, x, adv.delta, task.perturbation_mask(adv.batch))) is not None:
            _fail(err)
        if task.input_domain is not None:
            lo, hi = task.input_domain
            z = x + adv.delta
            if float(z.min()) < lo - 1e-5 or float(z.max()) > hi + 1e-5:
                _fail(f"x + delta spans [{float(z.min()):.4g}, {float(z.max()):.4g}], outside the task's input "
                      f"domain [{lo:g}, {hi:g}]")
        return (f"uses {_ball_fraction(threat, x, adv.delta):.3f} of the {threat.norm} ball (eps={threat.eps:g}"
                f"{', relative' if threat.relative else ''}), inside domain {threat.domain}")

    def no_side_effects() -> str:
        attack = get_attack()
        clean = _batch_clone(batch)
        params = [p.detach().clone() for p in model.parameters()]
        grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        buffers = [b.detach().clone() for b in model.buffers()]
        for training in (True, False):
            model.train(training)
            run(attack)
            if model.training != training:
                _fail(f"the attack left the model in {'train' if model.training else 'eval'} mode; restore the "
                      f"mode it was given")
        model.eval()
        if (key := _same_batch(batch, clean)) is not None:
            _fail(f"the attack modified the input batch in place ({key!r}); return a new batch or a delta")
        if not all(torch.equal(a, p) for a, p in zip(params, model.parameters())):
            _fail("the attack changed the model's parameters")
        for g0, p in zip(grads, model.parameters()):
            if (g0 is None) != (p.grad is None) or (g0 is not None and not torch.equal(g0, p.grad)):
                _fail("the attack left gradients in the model's parameters (use torch.autograd.grad on delta, "
                      "or zero them): they would leak into the training step")
        del buffers  # batch-norm statistics may move in train mode, as they do in PGD-AT
        return "batch, parameters, gradients and train/eval mode untouched"

    def beats_random_noise() -> str:
        attack = get_attack()
        adv = run(attack)
        with torch.no_grad():
            clean_loss = F.cross_entropy(task.logits(model, batch), labels, reduction="none")
            adv_loss = F.cross_entropy(task.logits(model, *adv), labels, reduction="none")
        if adv.delta is None:  # discrete: no ball to sample from, compare with the clean input
            moved = (adv_loss - clean_loss).abs() > 0
            reference, what = clean_loss, "the clean input"
        else:
            # A few steps on a non-linear model may end below the clean loss (a random start can lower
            # it); what any ascent must beat is random noise of the same budget. A sign error does not.
            moved = adv.delta.flatten(1).abs().amax(1) > 0
            threat, x = threat_of(attack), task.perturbation_base(model, batch).detach()
            mask = task.perturbation_mask(batch)
            torch.manual_seed(seed + 1)
            with torch.no_grad():
                reference = torch.stack([F.cross_entropy(task.logits(model, batch, threat.init(x, "uniform", mask)),
                                                         labels, reduction="none") for _ in range(4)]).mean(0)
            what = "4 random points of its ball"
        n = int(moved.sum())
        if n == 0:
            return "moved no example (the model is fooled everywhere already, or the attack gave up): nothing to compare"
        rose = int((adv_loss[moved] >= reference[moved] - 1e-6).sum())
        summary = (f"loss above {what} on {rose} of the {n} examples moved; mean cross-entropy clean "
                   f"{clean_loss.mean().item():.4f}, reference {reference.mean().item():.4f}, attack "
                   f"{adv_loss.mean().item():.4f}")
        if rose < n / 2:
            _fail(f"{summary}: the attack is not maximising the loss (wrong sign, or the wrong targets)")
        return summary

    def soft_targets() -> str:
        attack = get_attack()
        soft = torch.full((len(labels), task.num_classes), 0.1 / max(task.num_classes - 1, 1), device=labels.device)
        soft.scatter_(1, labels[:, None], 0.9)
        try:
            adv = run(attack, targets=soft)
        except (ValueError, TypeError) as exc:
            return f"refuses soft targets clearly ({type(exc).__name__}: {str(exc)[:80]}); not usable as ADR's training attack"
        if adv.delta is not None:
            x = task.perturbation_base(model, adv.batch).detach()
            if (err := _in_ball(threat_of(attack), x, adv.delta, task.perturbation_mask(adv.batch))) is not None:
                _fail(f"with soft targets: {err}")
        return "accepts soft target distributions (usable by ADR)"

    def reproducible() -> str:
        attack = get_attack()
        a, b = run(attack), run(attack)
        if (a.delta is None) != (b.delta is None):
            _fail("two runs under the same seed return different kinds of result")
        if a.delta is not None and not torch.allclose(a.delta, b.delta, atol=1e-6):
            _fail(f"two runs after torch.manual_seed({seed}) differ by {float((a.delta - b.delta).abs().max()):.3g}: "
                  f"draw randomness from torch's RNG (or a seed the attack is given)")
        if a.delta is None and _same_batch(a.batch, b.batch) is not None:
            _fail(f"two runs after torch.manual_seed({seed}) return different batches")
        return f"same result under torch.manual_seed({seed})"

    def frozen_victim() -> str:
        from .teachers import FrozenTeacher

        teacher = FrozenTeacher(copy.deepcopy(model))
        adv = run(get_attack(), victim=teacher.model)
        if adv.delta is not None:
            x = task.perturbation_base(teacher.model, adv.batch).detach()
            if (err := _in_ball(threat_of(get_attack()), x, adv.delta, task.perturbation_mask(adv.batch))) is not None:
                _fail(f"against a frozen teacher: {err}")
        if teacher.model.training:
            _fail("the attack switched a frozen (eval-mode) teacher into train mode")
        return "attacks a frozen teacher (no parameter gradients) as well as a student"

    return [("construct", construct), ("returns_adversarial", returns_adversarial),
            ("labels_unchanged", labels_unchanged), ("in_threat_model", in_threat_model),
            ("no_side_effects", no_side_effects), ("beats_random_noise", beats_random_noise),
            ("soft_targets", soft_targets), ("reproducible", reproducible), ("frozen_victim", frozen_victim)]


def attack_checks(attack: Any, task: Task, model: nn.Module, *, batch: Batch | None = None, batch_size: int = 8,
                  seed: int = 0) -> list[Check]:
    """The attack checks one by one (for ``pytest.mark.parametrize``); see :func:`check_attack`."""
    from .attacks.base import create_attack

    if isinstance(attack, str):
        spec = attack
        factory: Callable[[], Any] = lambda: create_attack(spec, task)  # noqa: E731
        label = f"attack {spec!r}"
    elif isinstance(attack, type) or (callable(attack) and not hasattr(attack, "describe")
                                      and not isinstance(attack, nn.Module)):
        factory = lambda: attack(task)  # noqa: E731 - a class or factory function taking the task
        label = f"attack {getattr(attack, '__qualname__', repr(attack))}"
    else:
        factory = lambda: attack  # noqa: E731 - an instance
        label = f"attack {_describe(attack)}"
    if batch is None:
        loader = task.dataloader("test", batch_size, shuffle=False, seed=seed)
        batch = next(iter(loader))
    batch = _to(batch, _device_of(model))
    model.eval()
    subject = f"{label} on task {getattr(task, 'name', '?')!r}"
    return [Check(name, fn, subject) for name, fn in _attack_check_fns(factory, task, model, batch, seed)]


def check_attack(attack: Any, task: Task, model: nn.Module, *, batch: Batch | None = None, batch_size: int = 8,
                 seed: int = 0, raise_on_failure: bool = True) -> ConformanceReport:
    """Run every attack check and report each; raise :class:`ConformanceError` if any fails.

    ``attack``: an attack instance, a class or factory called as ``factory(task)``, or a registered spec
    string (``"pgd:steps=5"``). Checks: it returns ``Adversarial(batch, delta)``, keeps labels, stays in
    the threat model and input domain, has no side effects, raises the loss more than random noise of its budget, handles soft targets (or
    refuses them clearly), is reproducible under a seed, and attacks a frozen teacher.
    """
    with _mode_kept(model):
        checks = attack_checks(attack, task, model, batch=batch, batch_size=batch_size, seed=seed)
        report = ConformanceReport(checks[0].subject, [c.run() for c in checks])
    return report.raise_for_failures() if raise_on_failure else report


# -- two processes -----------------------------------------------------------------------------
def _digest(tensors: Iterable[Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _run_two_processes(task: Task, model: nn.Module, batch_size: int, seed: int, timeout: float = 300) -> str:
    """Train ADR (EMA teacher, PGD-2) for one epoch with torchrun on 2 CPU processes and compare ranks."""
    n_train = min(len(task.dataset("train")), 16 * batch_size)
    n_train -= n_train % (2 * batch_size)
    if n_train == 0:
        _fail(f"the train split has fewer than {2 * batch_size} examples: too few for 2 processes")
    with tempfile.TemporaryDirectory(prefix="robustkd-conformance-") as tmp:
        payload = Path(tmp) / "payload.pt"
        try:
            torch.save({"task": task, "model": copy.deepcopy(model).cpu(), "batch_size": batch_size, "seed": seed,
                        "n_train": n_train}, payload)
        except Exception as exc:  # noqa: BLE001
            _fail(f"the task or model cannot be pickled for the worker processes ({type(exc).__name__}: {exc}); "
                  f"multi-process training needs a picklable task")
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([p for p in sys.path if p] + [os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "robustkd.testing", str(payload), tmp]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            _fail(f"the 2-process run did not finish within {timeout:.0f} s")
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
            _fail(f"the 2-process run failed (exit {proc.returncode}): " + " | ".join(tail))
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in (0, 1)]
    expected_steps = n_train // (2 * batch_size)
    for r in ranks:
        if r["world_size"] != 2:
            _fail(f"rank {r['rank']} saw world_size {r['world_size']}, not 2")
        if r["steps"] != expected_steps:
            _fail(f"rank {r['rank']} took {r['steps']} optimizer steps on {n_train} examples; 2 processes should "
                  f"each take {expected_steps} (the data is not sharded)")
        if not math.isfinite(r["loss"]):
            _fail(f"rank {r['rank']} has a non-finite training loss")
    if ranks[0]["params"] != ranks[1]["params"]:
        _fail("after one epoch the two processes hold different student weights (gradients not synchronised)")
    if ranks[0]["ema"] != ranks[1]["ema"]:
        _fail("after one epoch the two processes hold different EMA teachers")
    return (f"1 epoch of ADR on 2 processes: {expected_steps} steps each, identical student and EMA teacher, "
            f"loss {ranks[0]['loss']:.4f}")


def _worker(payload_path: str, out_dir: str) -> None:
    from .config import build_method
    from .teachers import unwrap
    from .trainer import TrainConfig, Trainer

    payload = torch.load(payload_path, weights_only=False)  # written by the parent process just before
    task, model = payload["task"], payload["model"]
    config = TrainConfig(epochs=1, batch_size=payload["batch_size"], eval_batch_size=payload["batch_size"],
                         lr=0.01, max_train_samples=payload["n_train"], max_eval_samples=2 * payload["batch_size"],
                         eval_attacks=[], seed=payload["seed"], output_dir=str(Path(out_dir) / "run"), cpu=True,
                         progress=False)
    method = build_method({"method": "adr", "attack_steps": 2}, task, threat=task.threat_model())
    trainer = Trainer(task, model, method, config)
    history = trainer.fit()
    acc = trainer.accelerator
    result = {"rank": acc.process_index, "world_size": acc.num_processes, "steps": trainer.state.step,
              "loss": history[-1]["train_loss"],
              "params": _digest(p for p in unwrap(trainer.model).parameters()),
              "ema": _digest(list(trainer.ema.model.parameters()) + [b for b in trainer.ema.model.buffers()
                                                                    if b.is_floating_point()])}
    (Path(out_dir) / f"rank{acc.process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
