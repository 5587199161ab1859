"""Image classification tasks: CIFAR-10, CIFAR-100, TinyImageNet-200, any ImageFolder tree.

Data comes from a local directory (Hugging Face parquet layout, torchvision's CIFAR folder, or
an ImageFolder tree with ``train/`` and ``test/`` or ``val/``) or, when online, a hub name.
Images are decoded once to a uint8 tensor; augmentation (4-pixel pad + random crop,
horizontal flip) runs batched in the collate function.
"""
from __future__ import annotations

import functools
import io
import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from robustkd.registry import MODELS, register_task
from robustkd.task import Batch, ContinuousTask, DataNotFoundError, pick_column
from robustkd.threat import ThreatModel

from . import image_models
from .image_models import Normalize

CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

SPLIT_ALIASES = {"test": ("test", "validation", "valid", "val"), "train": ("train",)}


class ImageTensorDataset(Dataset):
    """uint8 images (N, C, H, W) and int64 labels; items are dicts ``{"inputs", "labels"}``."""

    def __init__(self, images: Tensor, labels: Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Batch:
        return {"inputs": self.images[i], "labels": self.labels[i]}


def _to_float(images: Tensor) -> Tensor:
    return images.float().div_(255) if images.dtype == torch.uint8 else images


def collate_eval(examples: list[Batch]) -> Batch:
    batch = torch.utils.data.default_collate(examples)
    batch["inputs"] = _to_float(batch["inputs"])
    return batch


def collate_augment(examples: list[Batch], pad: int = 4, flip: bool = True) -> Batch:
    """Random crop after ``pad``-pixel zero padding and a random horizontal flip, per example."""
    batch = torch.utils.data.default_collate(examples)
    x = batch["inputs"]
    n, _, h, w = x.shape
    if pad:
        padded = F.pad(x, (pad, pad, pad, pad))
        offsets = torch.randint(0, 2 * pad + 1, (n, 2))
        x = torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])
    if flip:
        mask = torch.rand(n) < 0.5
        x = torch.where(mask.view(-1, 1, 1, 1), x.flip(3), x)
    batch["inputs"] = _to_float(x)
    return batch


# -- loading --------------------------------------------------------------------------------
IMAGE_COLUMNS = ("img", "image", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "fine_label")


def _decode_hf(ds: Any, image_column: str | None, label_column: str | None, size: int | None) -> tuple[Tensor, Tensor]:
    cols = list(ds.column_names)
    icol, lcol = pick_column(cols, image_column, IMAGE_COLUMNS, "image"), pick_column(cols, label_column, LABEL_COLUMNS, "label")
    images = [_pil_to_array(img, size) for img in ds[icol]]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds[lcol], dtype=torch.long)


def _pil_to_array(img: Any, size: int | None) -> np.ndarray:
    from PIL import Image

    if isinstance(img, dict):  # undecoded {"bytes", "path"}
        img = Image.open(io.BytesIO(img["bytes"])) if img.get("bytes") else Image.open(img["path"])
    img = img.convert("RGB")
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def _parquet_dir(root: Path) -> Path | None:
    for candidate in (root, root / "plain_text", root / "data"):
        if candidate.is_dir() and any(candidate.glob("*.parquet")):
            return candidate
    return None


def _load_parquet(root: Path, split: str, image_column, label_column, size) -> tuple[Tensor, Tensor]:
    import datasets

    files = sorted(p.name for p in root.glob("*.parquet"))
    for name in SPLIT_ALIASES.get(split, (split,)):
        matching = [f for f in files if f.startswith(name + "-") or f.startswith(name + ".") or f == f"{name}.parquet"]
        if matching:
            ds = datasets.load_dataset("parquet", data_files={split: [str(root / f) for f in matching]}, split=split)
            return _decode_hf(ds, image_column, label_column, size)
    raise DataNotFoundError(f"no {split!r} split in {root}: found parquet files {files}. Expected names like "
                            f"'{split}-00000-of-00001.parquet' (the Hugging Face layout).")


def _load_torchvision_cifar(root: Path, split: str, num_classes: int) -> tuple[Tensor, Tensor]:
    folder = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
    base = root / folder if (root / folder).is_dir() else root
    if num_classes == 10:
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    else:
        names = ["train"] if split == "train" else ["test"]
    xs, ys = [], []
    for name in names:
        with open(base / name, "rb") as f:
            entry = pickle.load(f, encoding="latin1")  # noqa: S301 - torchvision's own format
        xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
    return torch.from_numpy(np.concatenate(xs)), torch.tensor(ys, dtype=torch.long)


def _load_image_folder(root: Path, split: str, size: int | None) -> tuple[Tensor, Tensor, list[str]]:
    from torchvision.datasets import ImageFolder

    for name in SPLIT_ALIASES.get(split, (split,)):
        if (root / name).is_dir():
            _check_folder_classes(root, name)
            folder = ImageFolder(str(root / name))
            images = [_pil_to_array(folder.loader(path), size) for path, _ in folder.samples]
            if not images:
                raise DataNotFoundError(f"{root / name} holds no images")
            x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
            return x, torch.tensor(folder.targets, dtype=torch.long), folder.classes
    raise DataNotFoundError(f"no {split!r} folder in {root}: an ImageFolder tree needs {root}/train/<class>/*.png "
                            f"and {root}/test/<class>/*.png (or val/).")


def _folder_classes(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _check_folder_classes(root: Path, split_dir: str) -> None:
    """Every split of an ImageFolder tree must have the same class folders: ImageFolder numbers the
    classes of each split on its own, so a class missing from one split shifts that split's labels."""
    splits = [n for n in ("train", "test", "validation", "valid", "val") if (root / n).is_dir()]
    ref = "train" if "train" in splits else splits[0]
    if split_dir == ref:
        return
    want, have = _folder_classes(root / ref), _folder_classes(root / split_dir)
    if want != have:
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        parts = ([f"lacks {missing}"] if missing else []) + ([f"has {extra} that {ref}/ does not"] if extra else [])
        raise DataNotFoundError(f"the ImageFolder split {root / split_dir} {' and '.join(parts)} (class folders of "
                                f"{ref}/: {len(want)}): its labels would be numbered differently. Give every split "
                                "the same class folders.")


@functools.lru_cache(maxsize=8)
def load_images(data_dir: str | None, hub_name: str | None, split: str, num_classes: int,
                image_size: int, image_column: str | None = None,
                label_column: str | None = None) -> tuple[Tensor, Tensor]:
    """Decode a split once (cached per process). Raises :class:`DataNotFoundError` with the fix."""
    if data_dir is None:
        return _load_hub(hub_name, split, image_column, label_column, image_size)
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataNotFoundError(f"--data-dir {data_dir!r} does not exist or is not a directory. Point --data-dir at "
                                "a Hugging Face parquet folder (e.g. ../shared/data/cifar10/plain_text), "
                                "torchvision's CIFAR folder, or an ImageFolder tree.")
    if (pq := _parquet_dir(root)) is not None:
        return _load_parquet(pq, split, image_column, label_column, image_size)
    if (root / "cifar-10-batches-py").is_dir() or (root / "cifar-100-python").is_dir() or (root / "data_batch_1").exists():
        return _load_torchvision_cifar(root, split, num_classes)
    if any((root / s).is_dir() for s in ("train", "test", "val")):
        x, y, _ = _load_image_folder(root, split, image_size)
        return x, y
    raise DataNotFoundError(f"cannot read images from --data-dir {data_dir!r}: it holds no *.parquet files, no "
                            "torchvision CIFAR batches, and no train/ or test/ ImageFolder tree.")


def _load_hub(hub_name: str | None, split: str, image_column, label_column, size) -> tuple[Tensor, Tensor]:
    if hub_name is None:
        raise DataNotFoundError("this task has no hub data set: pass --data-dir with a local copy.")
    import datasets

    try:
        ds = datasets.load_dataset(hub_name)
    except Exception as exc:  # noqa: BLE001 - offline, missing, or forbidden: all need the same fix
        raise DataNotFoundError(
            f"could not load {hub_name!r} from the Hugging Face hub ({type(exc).__name__}: {str(exc)[:200]}). "
            f"With no network, pass --data-dir with a local copy (Hugging Face parquet layout, torchvision's "
            f"folder, or an ImageFolder tree). robustkd never substitutes other data."
        ) from exc
    for name in SPLIT_ALIASES.get(split, (split,)):
        if name in ds:
            return _decode_hf(ds[name], image_column, label_column, size)
    raise DataNotFoundError(f"{hub_name!r} has splits {list(ds)}, none of them {split!r}")


# -- the task -------------------------------------------------------------------------------
class ImageClassification(ContinuousTask):
    """Images in [0, 1] of shape (3, size, size); L-inf 8/255 threat model by default."""

    modality = "image"
    input_domain = (0.0, 1.0)

    def __init__(self, name: str, num_classes: int, image_size: int, stats: tuple, *,
                 data_dir: str | None = None, hub_name: str | None = None, augment: bool = True,
                 image_column: str | None = None, label_column: str | None = None,
                 eps: float = 8 / 255, norm: str = "linf"):
        self.name, self.num_classes, self.image_size, self.stats = name, num_classes, image_size, stats
        self.data_dir = str(data_dir) if data_dir is not None else None
        self.hub_name, self.augment = hub_name, augment
        self.image_column, self.label_column = image_column, label_column
        self.eps, self.norm = eps, norm
        self._datasets: dict[str, Dataset] = {}

    def dataset(self, split: str) -> Dataset:
        if split not in self._datasets:
            x, y = load_images(self.data_dir, self.hub_name, split, self.num_classes, self.image_size,
                               self.image_column, self.label_column)
            self._check_data(x, y, split)
            self._datasets[split] = ImageTensorDataset(x, y)
        return self._datasets[split]

    def _check_data(self, x: Tensor, y: Tensor, split: str) -> None:
        expected = (3, self.image_size, self.image_size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"{self.name} {split} images have shape {tuple(x.shape[1:])}, expected {expected}: "
                             f"pick the matching --dataset or set image_size.")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"{self.name} {split} labels span {int(y.min())}..{int(y.max())} but the task has "
                             f"{self.num_classes} classes: this is not {self.name} data (pick the matching --dataset).")

    def collate_fn(self, split: str) -> Callable[[list[Batch]], Batch]:
        return collate_augment if (split == "train" and self.augment) else collate_eval

    def validate_batch(self, batch: Batch) -> None:
        super().validate_batch(batch)
        x = batch["inputs"]
        expected = (3, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"{self.name} expects image batches of shape (N, {', '.join(map(str, expected))}), "
                             f"got {tuple(x.shape)}")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            hint = ("they look like 0-255 pixel values: divide the images by 255 (or pass uint8 tensors)"
                    if lo >= 0.0 and hi <= 255.0 else "remove Normalize from your data pipeline; robustkd models "
                    "normalise inside")
            raise ValueError(f"image values span [{lo:.3f}, {hi:.3f}] but must lie in [0, 1] (attacks and budgets "
                             f"like 8/255 assume raw pixels): {hint}.")

    def build_model(self, name: str, **kwargs: Any) -> nn.Module:
        """A registered image model or ``timm:<name>``, preceded by this data set's normalisation."""
        if name.startswith("timm:"):
            import timm

            if not timm.is_model(name[5:]):
                import difflib

                close = difflib.get_close_matches(name[5:], timm.list_models(), n=3)
                raise ValueError(f"timm has no model {name[5:]!r}" + (f": did you mean {', '.join('timm:' + c for c in close)}?"
                                 if close else " (list them with python -c \"import timm; print(timm.list_models('*net*'))\")"))
            net = timm.create_model(name[5:], num_classes=self.num_classes, **kwargs)
        else:
            factory = MODELS.get(name)
            if getattr(factory, "_robustkd_modality", None) != "image":
                raise ValueError(f"the model {name!r} is not an image model; image models: {', '.join(self.model_names())}, "
                                 "or timm:<name>")
            net = factory(num_classes=self.num_classes, **kwargs)
        return nn.Sequential(Normalize(*self.stats), net)

    def model_names(self) -> list[str]:
        return [e.name for e in MODELS.entries() if getattr(e.obj, "_robustkd_modality", None) == "image"]

    def threat_model(self, eps: float | None = None, norm: str | None = None, **kwargs: Any) -> ThreatModel:
        if kwargs:
            raise TypeError(f"unknown threat-model options {sorted(kwargs)} for {self.name}: image budgets take "
                            "eps and norm (linf or l2)")
        norm = norm or self.norm
        if eps is None:
            eps = self.eps if norm == self.norm else {"linf": 8 / 255, "l2": 0.5}[norm]
        width = self.input_domain[1] - self.input_domain[0]
        if norm == "linf" and eps > width:
            raise ValueError(f"an L-inf budget of {eps:g} exceeds the image value range [0, 1] (every pixel could take "
                             f"any value): did you mean {eps:g}/255 (= {eps / 255:.4f})? Write the budget as {eps:g}/255")
        return ThreatModel(eps, norm, domain=self.input_domain)

    default_eval_attacks = ("pgd20", "autoattack")


@register_task("cifar10")
def cifar10(data_dir: str | None = None, **kwargs: Any) -> ImageClassification:
    """CIFAR-10: 10 classes of 32x32 images (hub: uoft-cs/cifar10)."""
    return ImageClassification("cifar10", 10, 32, CIFAR10_STATS, data_dir=data_dir, hub_name="uoft-cs/cifar10", **kwargs)


@register_task("cifar100")
def cifar100(data_dir: str | None = None, **kwargs: Any) -> ImageClassification:
    """CIFAR-100: 100 classes of 32x32 images (hub: uoft-cs/cifar100, fine labels)."""
    kwargs.setdefault("label_column", "fine_label")
    return ImageClassification("cifar100", 100, 32, CIFAR100_STATS, data_dir=data_dir, hub_name="uoft-cs/cifar100", **kwargs)


@register_task("tinyimagenet")
def tinyimagenet(data_dir: str | None = None, **kwargs: Any) -> ImageClassification:
    """TinyImageNet-200: 200 classes of 64x64 images (hub: zh-plus/tiny-imagenet)."""
    return ImageClassification("tinyimagenet", 200, 64, IMAGENET_STATS, data_dir=data_dir, hub_name="zh-plus/tiny-imagenet", **kwargs)


@register_task("imagefolder")
def imagefolder(data_dir: str | None = None, *, num_classes: int | None = None, image_size: int = 32,
                **kwargs: Any) -> ImageClassification:
    """Any ImageFolder tree (train/<class>/..., test/<class>/...), resized to image_size."""
    if data_dir is None:
        raise DataNotFoundError("the imagefolder task needs --data-dir pointing at a tree with train/ and test/")
    if num_classes is None:
        num_classes = len([p for p in (Path(data_dir) / "train").iterdir() if p.is_dir()])
    return ImageClassification("imagefolder", num_classes, image_size, IMAGENET_STATS, data_dir=data_dir, **kwargs)


class SyntheticImages(ImageClassification):
    """Random class-conditional images: only when asked for by name (tests, smoke runs)."""

    def __init__(self, num_classes: int = 10, image_size: int = 32, n_train: int = 512, n_test: int = 128, seed: int = 0):
        super().__init__("synthetic", num_classes, image_size, CIFAR10_STATS, augment=False)
        g = torch.Generator().manual_seed(seed)
        prototypes = torch.rand(num_classes, 3, image_size, image_size, generator=g)
        for split, n in (("train", n_train), ("test", n_test)):
            y = torch.randint(0, num_classes, (n,), generator=g)
            x = (0.6 * prototypes[y] + 0.4 * torch.rand(n, 3, image_size, image_size, generator=g))
            self._datasets[split] = ImageTensorDataset((x * 255).round().to(torch.uint8), y)


@register_task("synthetic")
def synthetic(data_dir: str | None = None, **kwargs: Any) -> SyntheticImages:
    """Synthetic images with class structure (never used unless named)."""
    return SyntheticImages(**kwargs)


__all__ = ["ImageClassification", "SyntheticImages", "DataNotFoundError", "image_models"]
