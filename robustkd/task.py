"""The Task contract: the only place that knows what an input is.

Everything else (teachers, distillation targets, balancing, the trainer, evaluation) sees
inputs only through a task. A batch is a ``dict`` of tensors with at least ``"labels"``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from .threat import ThreatModel

Batch = dict[str, Any]


class DataNotFoundError(FileNotFoundError):
    """Data that cannot be found or read; the message says which flag or path to fix."""


def pick_column(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str) -> str:
    """The column to read ``what`` from: the one asked for, else the first known name present;
    the error lists the real columns (tables from the hub name their columns differently)."""
    if wanted:
        if wanted not in columns:
            raise ValueError(f"no {what} column {wanted!r}; the data has columns {columns}: pass "
                             f"{what}_column=<one of them> (recipes: --task-kwargs '{{\"{what}_column\": \"...\"}}')")
        return wanted
    for c in candidates:
        if c in columns:
            return c
    raise ValueError(f"no {what} column among {list(candidates)}; the data has columns {columns}: "
                     f"name it with {what}_column=... (recipes: --task-kwargs '{{\"{what}_column\": \"...\"}}')")


class Adversarial(NamedTuple):
    """What an attack returns: a (possibly new) batch and a perturbation in the task's attack
    space (``None`` for discrete attacks, which change the batch itself).
    ``task.logits(model, *adv)`` evaluates any model on it."""

    batch: Batch
    delta: Tensor | None


class Task(ABC):
    """One data set / modality. Subclasses set ``name``, ``modality`` and ``num_classes``."""

    name: str = "task"
    modality: str = "generic"
    num_classes: int
    input_domain: tuple[float, float] | None = None

    # -- data ---------------------------------------------------------------------------
    @abstractmethod
    def dataset(self, split: str) -> Dataset:
        """The split (``train`` / ``test``) as a map-style dataset of batch dicts (one example)."""

    def collate_fn(self, split: str) -> Callable[[list[Batch]], Batch]:
        """How examples of ``split`` become a batch (augmentation may live here)."""
        return torch.utils.data.default_collate

    def validate_batch(self, batch: Batch) -> None:
        """Raise a clear error if a batch breaks the task's contract (shape, range, labels)."""
        labels = self.labels(batch)
        if labels.dtype.is_floating_point or labels.dim() != 1:
            raise ValueError(f"labels must be a 1-D integer tensor, got {labels.dtype} of shape {tuple(labels.shape)}")
        bad = (labels < 0) | (labels >= self.num_classes)
        if bad.any():
            raise ValueError(
                f"label {int(labels[bad][0])} is outside the task's {self.num_classes} classes "
                f"(0..{self.num_classes - 1}): check the label column or set num_classes to match the data."
            )

    def dataloader(self, split: str, batch_size: int, *, shuffle: bool | None = None,
                   max_samples: int | None = None, seed: int = 0, num_workers: int = 0,
                   drop_last: bool = False) -> DataLoader:
        """A loader over the split; ``max_samples`` takes a seeded random subset (class mix kept)."""
        data = self.dataset(split)
        if max_samples is not None and max_samples < len(data):
            g = torch.Generator().manual_seed(seed)
            data = Subset(data, torch.randperm(len(data), generator=g)[:max_samples].tolist())
        shuffle = (split == "train") if shuffle is None else shuffle
        g = torch.Generator().manual_seed(seed)
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, collate_fn=self.collate_fn(split),
                          num_workers=num_workers, drop_last=drop_last, generator=g)

    # -- models -------------------------------------------------------------------------
    @abstractmethod
    def build_model(self, name: str, **kwargs: Any) -> nn.Module:
        """A model by name; preprocessing (normalisation, feature extraction) lives inside it so
        that attacks act on the raw input domain."""

    def model_names(self) -> list[str]:
        return []

    def check_model(self, model: nn.Module, batch: Batch) -> None:
        """Raise a clear error if ``model`` does not fit this task (e.g. class count)."""
        with torch.no_grad():
            out = self.logits(model, batch)
        if out.dim() != 2 or out.shape[1] != self.num_classes:
            raise ValueError(
                f"the model returns logits of shape {tuple(out.shape)} but the task {self.name!r} has "
                f"{self.num_classes} classes: build it with num_classes={self.num_classes} (or pick the "
                f"matching task)."
            )

    # -- batches ------------------------------------------------------------------------
    def labels(self, batch: Batch) -> Tensor:
        return batch["labels"]

    def batch_size(self, batch: Batch) -> int:
        return self.labels(batch).shape[0]

    @abstractmethod
    def perturbation_base(self, model: nn.Module, batch: Batch) -> Tensor:
        """The point in attack space that ``delta`` is added to (pixels, waveform, the model's
        own input embeddings)."""

    def perturbation_mask(self, batch: Batch) -> Tensor | None:
        """Positions that may move (1) and may not (0); ``None`` means all may move."""
        return None

    @abstractmethod
    def logits(self, model: nn.Module, batch: Batch, delta: Tensor | None = None) -> Tensor:
        """Run any model (student or teacher) on the batch, optionally perturbed by ``delta``."""

    # -- threat models and attacks --------------------------------------------------------
    @abstractmethod
    def threat_model(self, eps: float | None = None, norm: str | None = None, **kwargs: Any) -> ThreatModel:
        """The task's default threat model, or one with the given budget."""

    default_train_attack: str = "pgd"
    default_eval_attacks: tuple[str, ...] = ("pgd20",)


class ContinuousTask(Task):
    """Tasks whose inputs are a tensor ``batch["inputs"]`` the attack perturbs directly."""

    def perturbation_base(self, model: nn.Module, batch: Batch) -> Tensor:
        return batch["inputs"]

    def logits(self, model: nn.Module, batch: Batch, delta: Tensor | None = None) -> Tensor:
        x = batch["inputs"]
        return model(x if delta is None else x + delta)
