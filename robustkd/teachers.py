"""Teachers: the EMA self-teacher (ADR, weight averaging) and frozen pretrained teachers.

A teacher is evaluated through the task (``task.logits(teacher.model, batch, delta)``) so the
same classes serve images, text and speech.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

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

    def to(self, device: torch.device | str) -> "Teacher":
        self.model.to(device)
        return self


class EMATeacher(Teacher):
    """An exponential moving average of the student's weights: ADR's self-teacher and the
    weight-averaged (WA) model for evaluation. ``update`` after every optimizer step."""

    def __init__(self, student: nn.Module, decay: float = 0.995):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(unwrap(student)).eval()
        self.model.requires_grad_(False)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """``theta_ema <- decay * theta_ema + (1 - decay) * theta``; buffers (BN statistics) are
        copied, averaged over processes so the teacher is identical on every rank."""
        source = unwrap(student)
        ema_params = [p for p in self.model.parameters()]
        params = [p.detach() for p in source.parameters()]
        if params[0].dtype != ema_params[0].dtype:
            params = [p.to(ema_params[0].dtype) for p in params]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
        ema_buffers = list(self.model.buffers())
        if ema_buffers:
            for b_ema, b in zip(ema_buffers, source.buffers()):
                b_ema.copy_(b)
            _average_float_tensors_across_processes([b for b in ema_buffers if b.is_floating_point()])
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


def _average_float_tensors_across_processes(tensors: list[Tensor]) -> None:
    if not tensors or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n
