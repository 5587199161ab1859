"""The Task contract: the only place that knows what an input is.

Everything else (teachers, distillation targets, balancing, the trainer, evaluation) sees
inputs only through a task. A batch is a ``dict`` of tensors with at least ``"labels"``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sized
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from .threat import Norm, ThreatModel

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


def check_norm(norm: str) -> Norm:
    """``norm`` as a threat model's norm (``linf`` or ``l2``); anything else is refused with the choices.
    Tasks call it where a norm option enters (their constructor, ``threat_model(norm=...)``)."""
    if norm not in ("linf", "l2"):
        raise ValueError(f"unknown norm {norm!r}: use 'linf' or 'l2'")
    return cast(Norm, norm)


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

    def augment_batch(self, batch: Batch) -> Batch:
        """Training augmentation of a whole batch, run by the trainer where the batch is (on the
        training device), in batched tensor operations; the default augments nothing."""
        return batch

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
                   drop_last: bool = False, pin_memory: bool = False) -> DataLoader:
        """A loader over the split; ``max_samples`` takes a seeded random subset (class mix kept).
        ``num_workers`` worker processes (kept alive across epochs) collate batches; ``pin_memory``
        puts them in page-locked memory for asynchronous copies to a GPU."""
        data = self.dataset(split)
        indices = self.sample_indices(split, max_samples, seed)
        if indices is not None:
            data = Subset(data, indices)
        shuffle = (split == "train") if shuffle is None else shuffle
        g = torch.Generator().manual_seed(seed)
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, collate_fn=self.collate_fn(split),
                          num_workers=num_workers, drop_last=drop_last, generator=g,
                          pin_memory=pin_memory and torch.cuda.is_available(), persistent_workers=num_workers > 0)

    def sample_indices(self, split: str, max_samples: int | None, seed: int = 0) -> list[int] | None:
        """The examples ``dataloader(split, max_samples=..., seed=...)`` draws (``None``: all of them, in
        order), so that attacks run outside a loader (TextAttack) can use the very same points.
        A smaller ``max_samples`` with the same seed gives a prefix of a larger one's sample."""
        data = self.dataset(split)
        if not isinstance(data, Sized):
            raise TypeError(f"the {split!r} split of the task {self.name!r} is a {type(data).__name__} without len(): "
                            "Task.dataset must return a map-style dataset (with __len__ and __getitem__)")
        n = len(data)
        if max_samples is None or max_samples >= n:
            return None
        g = torch.Generator().manual_seed(seed)
        return torch.randperm(n, generator=g)[:max_samples].tolist()

    # -- models -------------------------------------------------------------------------
    @abstractmethod
    def build_model(self, name: str, **kwargs: Any) -> nn.Module:
        """A model by name; preprocessing (normalisation, feature extraction) lives inside it so
        that attacks act on the raw input domain."""

    def model_names(self) -> list[str]:
        return []

    def load_pretrained(self, spec: str, **options: Any) -> nn.Module | None:
        """A pretrained model for this task from ``spec`` (a hub name, ``timm:<name>``, a directory, ... --
        whatever the task knows how to load), or ``None`` when the spec is not one it loads. Teachers
        (:func:`robustkd.teachers.load_teacher`) come through this hook; a robustkd output directory is
        loaded by the core before the hook is asked."""
        return None

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

    def point_batch(self, batch: Batch, point: Tensor) -> Batch | None:
        """``batch`` with its attack-space input replaced by ``point``, the perturbed input itself, or
        ``None`` when the attack space is not an input the batch holds (token embeddings).

        Attacks that keep the perturbed point, as the reference attacks of ADR, TRADES and MTARD do,
        evaluate and return ``Adversarial(task.point_batch(batch, point), None)``: the model then sees
        exactly that point, where ``x + (point - x)`` can differ from it in the last bit. Attacks on a
        task that returns ``None`` hand it an offset ``delta`` (:meth:`logits`)."""
        return None

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

    def point_batch(self, batch: Batch, point: Tensor) -> Batch | None:
        """The batch with ``inputs`` replaced by the perturbed point (pixels, waveforms)."""
        return {**batch, "inputs": point}
