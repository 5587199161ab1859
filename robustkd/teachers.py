"""Teachers: the EMA self-teacher (ADR, weight averaging) and frozen pretrained teachers.

A teacher is evaluated through the task (``task.logits(teacher.model, batch, delta)``) so the
same classes serve images, text and speech.
"""
from __future__ import annotations

import copy
from collections.abc import Sized
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from .distributed import reduce_
from .task import Batch, Task


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP / compile / Accelerate wrappers."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


class Teacher:
    """Something that gives logits for a batch through a task; never trained by the student's loss."""

    model: nn.Module

    def logits(self, task: Task, batch: Batch, delta: Tensor | None = None) -> Tensor:
        if self.model.training:
            raise RuntimeError(
                f"the teacher {type(self.model).__name__} is in train mode: its batch-norm statistics "
                "would change with every student batch. Call .eval() on it (FrozenTeacher does this)."
            )
        with torch.no_grad():
            return task.logits(self.model, batch, delta)

    def to(self, device: torch.device | str) -> Teacher:
        self.model.to(device)
        return self


class EMATeacher(Teacher):
    """An exponential moving average of the student's weights: ADR's self-teacher and the
    weight-averaged (WA) model for evaluation. ``update`` after every optimizer step.

    As ADR's reference (timm's ``ModelEmaV2``), floating-point buffers such as batch-norm
    statistics are averaged too (``buffers="ema"``); ``buffers="copy"`` takes the student's.
    ``warmup=True`` uses timm's ramp ``min(decay, (1 + t) / (10 + t))`` so that a short run's
    teacher is not dominated by its random initial weights (not in the paper: off by default).
    """

    def __init__(self, student: nn.Module, decay: float = 0.995, *, warmup: bool = False,
                 buffers: str = "ema"):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        if buffers not in ("ema", "copy"):
            raise ValueError(f"buffers must be 'ema' or 'copy', got {buffers!r}")
        self.decay, self.warmup, self.buffers = decay, warmup, buffers
        self.model = copy.deepcopy(unwrap(student)).eval()
        self.model.requires_grad_(False)
        self.num_updates = 0

    def current_decay(self) -> float:
        """The decay the next update uses (ramped up from 0.1 with ``warmup``)."""
        t = self.num_updates
        return min(self.decay, (1 + t) / (10 + t)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """``theta_ema <- decay * theta_ema + (1 - decay) * theta`` for the parameters and float
        buffers (or a copy of the buffers), averaged over processes so every rank has the same teacher."""
        source = unwrap(student)
        decay = self.current_decay()
        ema_params: list[Tensor] = list(self.model.parameters())
        params = [p.detach().to(e.dtype) for p, e in zip(source.parameters(), ema_params)]
        # decay * ema + (1 - decay) * theta in this order, as timm's ModelEmaV2 (ADR's reference) rounds it
        torch._foreach_mul_(ema_params, decay)
        torch._foreach_add_(ema_params, torch._foreach_mul(params, 1.0 - decay))
        floats = []
        for b_ema, b in zip(self.model.buffers(), source.buffers()):
            if b_ema.is_floating_point() and self.buffers == "ema":
                b_ema.copy_(decay * b_ema + (1.0 - decay) * b.to(b_ema.dtype))
            else:
                b_ema.copy_(b)
            if b_ema.is_floating_point():
                floats.append(b_ema)
        reduce_(floats)  # every rank keeps the same teacher
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])


class FrozenTeacher(Teacher):
    """A pretrained model used as a teacher: eval mode, no gradients."""

    def __init__(self, model: nn.Module, name: str = "teacher"):
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.name = name


# -- loading frozen teachers ------------------------------------------------------------------
def _probe_batch(task: Task) -> Batch:
    data = task.dataset("test")  # map-style, so sized (the task contract)
    return task.collate_fn("test")([data[i] for i in range(min(2, len(cast(Sized, data))))])


def load_teacher(spec: str | Path, task: Task, *, which: str = "auto", probe: Batch | None = None,
                 name: str | None = None, **options: Any) -> FrozenTeacher:
    """A frozen teacher for ``task`` from a spec, checked before any training starts.

    ``spec`` is a robustkd recipe output directory or one of its weight files (the EMA model when the
    run kept one, with ``which="auto"``), or anything the task's :meth:`~robustkd.task.Task.load_pretrained`
    hook loads (``options`` go to it): for the built-in tasks, ``timm:<name>`` and Hugging Face
    directories for images, Hugging Face directories for text. The teacher is run once on ``probe``
    (default: two test examples of the task) so a teacher with another class count or input shape fails
    here with a clear message, not mid-run.
    """
    from .checkpoint import META_FILE, load_model

    spec = str(spec)
    label = name or spec
    if spec == "ema":
        raise ValueError("'ema' is not a file teacher: pass robust_teacher='ema' to MTARD (the student's EMA "
                         "self-teacher) instead of loading it")
    path = Path(spec).expanduser()
    if not path.exists() and ":" not in spec:
        raise FileNotFoundError(f"teacher {spec!r} does not exist: pass a recipe --output-dir, a model the task "
                                f"{task.name!r} loads (e.g. a Hugging Face directory, timm:<name>), or (robust teacher "
                                "only) 'ema'")
    base = path if path.is_dir() else path.parent
    try:
        if path.exists() and (base / META_FILE).exists():
            model = load_model(path, task, which)  # type: ignore[arg-type]
        else:
            pretrained = task.load_pretrained(spec, **options)
            if pretrained is None:
                raise FileNotFoundError(f"teacher {spec!r} is neither a robustkd output directory ({META_FILE} "
                                        f"missing) nor a model the task {task.name!r} loads")
            model = pretrained
    except (FileNotFoundError, ValueError):
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt or foreign weights: say which file, not a stack trace
        raise ValueError(f"the teacher checkpoint {spec!r} does not load ({type(exc).__name__}: {str(exc)[:300]}): "
                         "is the file complete and made by robustkd or transformers?") from exc
    model.eval()
    model.requires_grad_(False)
    batch = _probe_batch(task) if probe is None else probe
    try:
        with torch.no_grad():
            out = task.logits(model, batch)
    except Exception as exc:  # noqa: BLE001 - shape errors surface as many exception types
        shapes = {k: tuple(v.shape) for k, v in batch.items() if isinstance(v, Tensor)}
        raise ValueError(f"the teacher {label!r} cannot take the task {task.name!r}'s inputs {shapes} "
                         f"({type(exc).__name__}: {str(exc)[:300]}): its input shape differs; use a teacher built "
                         "for this task's inputs") from exc
    if out.dim() != 2 or out.shape[1] != task.num_classes:
        raise ValueError(f"the teacher {label!r} returns logits of shape {tuple(out.shape)} but the task "
                         f"{task.name!r} has {task.num_classes} classes: use a teacher trained on this task's classes")
    return FrozenTeacher(model, name=label)
