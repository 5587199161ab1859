"""Task checks: the contracts a task plug-in must honour (data, labels, domain, models, attack space,
teachers, default attacks, a training step, deterministic loaders, and -- on request -- 2 processes)."""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..task import Batch, Task
from ..threat import ThreatModel
from .distributed import _run_two_processes
from .kit import (
    _TOL,
    Check,
    ConformanceReport,
    _check_logits,
    _describe,
    _device_of,
    _fail,
    _in_ball,
    _mode_kept,
    _same_batch,
    _Skip,
    _split_size,
    _to,
)


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
            n = _split_size(task, split, data)
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
        expected = min(ctx.batch_size, _split_size(task, "test"))
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
        from ..teachers import EMATeacher, FrozenTeacher

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
        from ..attacks.base import attacks_for, create_attack

        specs = [task.default_train_attack, *task.default_eval_attacks]
        for spec in specs:
            atk = create_attack(spec, task)
            if not callable(atk):
                _fail(f"create_attack({spec!r}) built {type(atk).__name__}, which is not callable")
        available = attacks_for(task)
        if not available:
            _fail("no registered attack fits the task: every attack requires a capability it does not provide")
        return f"defaults {specs} build; attacks for {task.name}: {', '.join(available)}"

    def train_step() -> str:
        from ..config import build_method
        from ..distill.methods import Progress

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
        present = [g for g in grads if g is not None]
        if not grads or len(present) < len(grads) or not all(torch.isfinite(g).all() for g in present):
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
        n = min(_split_size(task, "train"), ctx.max_samples)
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
