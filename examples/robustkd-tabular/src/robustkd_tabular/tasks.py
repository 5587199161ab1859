"""Tabular classification: feature vectors scaled to [0, 1], an L-inf ball of 0.05 by default.

Registered with robustkd's decorators; the package's ``robustkd.tasks`` entry point names this
module, so robustkd imports it (and so registers everything below) on first lookup.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from robustkd.registry import MODELS, register_model, register_task
from robustkd.task import Batch, ContinuousTask, DataNotFoundError
from robustkd.threat import ThreatModel


class FeatureDataset(Dataset):
    """Float features (N, D) and int64 labels; items are dicts ``{"inputs", "labels"}``."""

    def __init__(self, features: Tensor, labels: Tensor):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Batch:
        return {"inputs": self.features[i], "labels": self.labels[i]}


class Standardize(nn.Module):
    """Per-feature standardisation as the model's first layer, so attacks act on raw [0, 1] features."""

    def __init__(self, mean: Tensor, std: Tensor):
        super().__init__()
        self.register_buffer("mean", mean.clone().float(), persistent=False)
        self.register_buffer("std", std.clone().float().clamp_min(1e-6), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


@register_model("tabular_mlp", modality="tabular")
def tabular_mlp(num_features: int, num_classes: int, hidden: int = 64, depth: int = 2) -> nn.Module:
    """An MLP with ReLU hidden layers for feature vectors."""
    layers: list[nn.Module] = []
    width = num_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


class TabularTask(ContinuousTask):
    """Feature vectors in [0, 1]^D; models standardise inside; L-inf 0.05 threat model by default."""

    modality = "tabular"
    input_domain = (0.0, 1.0)
    default_model = "tabular_mlp"
    default_train_attack = "pgd"
    default_eval_attacks = ("pgd20", "random_search")

    def __init__(self, name: str, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], num_classes: int,
                 *, eps: float = 0.05, norm: str = "linf"):
        self.name, self.num_classes, self.eps, self.norm = name, num_classes, eps, norm
        self._data = {"train": FeatureDataset(*train), "test": FeatureDataset(*test)}
        self.num_features = train[0].shape[1]

    def dataset(self, split: str) -> Dataset:
        if split not in self._data:
            raise ValueError(f"unknown split {split!r}: use 'train' or 'test'")
        return self._data[split]

    def build_model(self, name: str, **kwargs: Any) -> nn.Module:
        """A registered tabular model, preceded by standardisation with the training set's statistics."""
        factory = MODELS.get(name)
        if getattr(factory, "_robustkd_modality", None) != "tabular":
            raise ValueError(f"the model {name!r} is not a tabular model; tabular models: {', '.join(self.model_names())}")
        x = self._data["train"].features
        return nn.Sequential(Standardize(x.mean(0), x.std(0)),
                             factory(num_features=self.num_features, num_classes=self.num_classes, **kwargs))

    def model_names(self) -> list[str]:
        return [e.name for e in MODELS.entries() if getattr(e.obj, "_robustkd_modality", None) == "tabular"]

    def threat_model(self, eps: float | None = None, norm: str | None = None, **kwargs: Any) -> ThreatModel:
        return ThreatModel(self.eps if eps is None else eps, norm or self.norm, domain=self.input_domain)


def make_blobs(n: int, num_features: int, num_classes: int, spread: float, generator: torch.Generator,
               centers: Tensor) -> tuple[Tensor, Tensor]:
    y = torch.randint(0, num_classes, (n,), generator=generator)
    x = centers[y] + spread * torch.randn(n, num_features, generator=generator)
    return x.clamp(0.0, 1.0), y


@register_task("tabular_blobs")
def tabular_blobs(data_dir: str | None = None, *, num_features: int = 8, num_classes: int = 3, n_train: int = 512,
                  n_test: int = 256, spread: float = 0.1, seed: int = 0, **kwargs: Any) -> TabularTask:
    """Synthetic Gaussian clusters in [0, 1]^8, 3 classes (only when asked for by name)."""
    if data_dir is not None:
        raise ValueError("tabular_blobs is synthetic and reads no data: drop --data-dir, or use tabular_csv")
    g = torch.Generator().manual_seed(seed)
    centers = 0.25 + 0.5 * torch.rand(num_classes, num_features, generator=g)
    train = make_blobs(n_train, num_features, num_classes, spread, g, centers)
    test = make_blobs(n_test, num_features, num_classes, spread, g, centers)
    return TabularTask("tabular_blobs", train, test, num_classes, **kwargs)


def _read_csv(path: Path, label_column: str) -> tuple[Tensor, Tensor]:
    if not path.is_file():
        raise DataNotFoundError(f"{path} is missing: tabular_csv needs --data-dir with train.csv and test.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or label_column not in rows[0]:
        raise ValueError(f"{path} has no {label_column!r} column (columns: {list(rows[0]) if rows else []})")
    columns = [c for c in rows[0] if c != label_column]
    x = torch.tensor([[float(r[c]) for c in columns] for r in rows], dtype=torch.float32)
    y = torch.tensor([int(r[label_column]) for r in rows], dtype=torch.long)
    return x, y


@register_task("tabular_csv")
def tabular_csv(data_dir: str | None = None, *, label_column: str = "label", num_classes: int | None = None,
                **kwargs: Any) -> TabularTask:
    """Numeric CSV files (train.csv, test.csv, a label column), min-max scaled to [0, 1] on train."""
    if data_dir is None:
        raise DataNotFoundError("tabular_csv needs --data-dir with train.csv and test.csv")
    root = Path(data_dir)
    x_train, y_train = _read_csv(root / "train.csv", label_column)
    x_test, y_test = _read_csv(root / "test.csv", label_column)
    lo, span = x_train.amin(0), (x_train.amax(0) - x_train.amin(0)).clamp_min(1e-12)
    # test values outside the training range are clamped into the [0, 1] domain the threat model assumes
    scale = lambda x: ((x - lo) / span).clamp(0.0, 1.0)  # noqa: E731
    n = num_classes if num_classes is not None else int(y_train.max()) + 1
    return TabularTask("tabular_csv", (scale(x_train), y_train), (scale(x_test), y_test), n, **kwargs)
