"""Cross-process plumbing, once: reduce tensors over processes and move batches to a device.

Both are Accelerate's utilities (``accelerate.utils.reduce``, ``accelerate.utils.send_to_device``);
``reduce_`` only adds what its callers need: several tensors in one collective, written back in place.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
import torch.distributed as dist
from accelerate.utils import send_to_device
from torch import Tensor

__all__ = ["num_processes", "process_index", "reduce_", "send_to_device"]


def num_processes() -> int:
    """The number of processes in the running group (1 without ``torch.distributed``)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def process_index() -> int:
    """This process's rank in the running group (0 without ``torch.distributed``)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def reduce_(tensors: Tensor | Iterable[Tensor], reduction: Literal["mean", "sum"] = "mean") -> list[Tensor]:
    """In place: every process ends with the mean (or sum) over processes of each of its tensors, all of
    them in one collective (``accelerate.utils.reduce`` on their concatenation); a no-op in one process.
    Returns the tensors. Keeps BN statistics, EMA teachers, AWP directions and MTARD's balancing sums
    identical on every rank."""
    from accelerate.utils import reduce

    tensors = [tensors] if isinstance(tensors, Tensor) else list(tensors)
    if not tensors or num_processes() == 1:
        return tensors
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    flat = reduce(torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors]), reduction)
    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n
    return tensors
