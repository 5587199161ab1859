"""Image classification tasks: CIFAR-10, CIFAR-100, TinyImageNet-200, any ImageFolder tree.

Data comes from a local directory (Hugging Face parquet layout, torchvision's CIFAR folder, or
an ImageFolder tree with ``train/`` and ``test/`` or ``val/``) or, when online, a hub name.
Images are decoded once to a uint8 tensor; augmentation (4-pixel pad + random crop,
horizontal flip) runs on whole batches where the batch is (the trainer calls
``augment_batch`` on the training device), as batched tensor operations.
"""
from __future__ import annotations

import functools
import io
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from robustkd.registry import MODELS, register_task
from robustkd.task import Batch, ContinuousTask, DataNotFoundError, Task, pick_column
from robustkd.threat import ThreatModel

from . import image_models

CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# TinyImageNet's own statistics, as ADR's reference uses them (src/model/create_model.py:16-17)
TINY_IMAGENET_STATS = ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262))

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


def augment_images(x: Tensor, pad: int = 4, flip: bool = True, generator: torch.Generator | None = None) -> Tensor:
    """Per image of the batch ``x`` (N, C, H, W): a random H x W crop of the image zero-padded by
    ``pad`` pixels (offsets uniform in 0..2*pad) and a horizontal flip with probability 1/2
    (torchvision's ``RandomCrop(padding=pad)`` + ``RandomHorizontalFlip()``), all images at once
    on ``x``'s device, with no host synchronisation."""
    n, c, h, w = x.shape
    dev = x.device
    if pad:
        padded = F.pad(x, (pad, pad, pad, pad))
        offsets = torch.randint(0, 2 * pad + 1, (n, 2), device=dev, generator=generator)
        rows = offsets[:, 0, None] + torch.arange(h, device=dev)  # (N, H)
        cols = offsets[:, 1, None] + torch.arange(w, device=dev)  # (N, W)
        x = padded[torch.arange(n, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                   rows[:, None, :, None], cols[:, None, None, :]]
    if flip:
        mask = torch.rand(n, device=dev, generator=generator) < 0.5
        x = torch.where(mask.view(-1, 1, 1, 1), x.flip(3), x)
    return x


def collate_augment(examples: list[Batch], pad: int = 4, flip: bool = True) -> Batch:
    """:func:`collate_eval` then :func:`augment_images`: for loops that augment on the CPU."""
    batch = collate_eval(examples)
    batch["inputs"] = augment_images(batch["inputs"], pad, flip)
    return batch


# -- loading --------------------------------------------------------------------------------
IMAGE_COLUMNS = ("img", "image", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "fine_label")


def _decode_hf(ds: Any, image_column: str | None, label_column: str | None, size: int | None,
               resize: bool = False, where: str = "the data") -> tuple[Tensor, Tensor]:
    cols = list(ds.column_names)
    icol, lcol = pick_column(cols, image_column, IMAGE_COLUMNS, "image"), pick_column(cols, label_column, LABEL_COLUMNS, "label")
    labels = ds[lcol]
    bad = next((v for v in labels if not isinstance(v, (int, np.integer)) or isinstance(v, bool)), None)
    if bad is not None:
        kinds = sorted({type(v).__name__ for v in labels})
        raise ValueError(f"the label column {lcol!r} of {where} holds {'/'.join(kinds)} values (e.g. {bad!r}) but image "
                         "tasks take integer class ids: store the labels as integers or a ClassLabel feature (e.g. "
                         "ds.class_encode_column(...) in datasets), or name another column with label_column= (recipes: "
                         "--task-kwargs '{\"label_column\": \"NAME\"}')")
    images = [_pil_to_array(img, size if resize else None) for img in ds[icol]]
    _check_sizes(images, size, where)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels, dtype=torch.long)


def _check_sizes(images: list[np.ndarray], size: int | None, where: str) -> None:
    """Refuse images of another size than the task's: resizing them would change the data without a word."""
    if size is None:
        return
    sizes: dict[tuple[int, int], int] = {}
    for a in images:
        sizes[(a.shape[1], a.shape[0])] = sizes.get((a.shape[1], a.shape[0]), 0) + 1
    other = {s: n for s, n in sizes.items() if s != (size, size)}
    if other:
        (w, h), n = max(other.items(), key=lambda kv: kv[1])
        raise ValueError(f"{n} of {len(images)} images in {where} are {w}x{h} but this task takes {size}x{size}: pick "
                         "the --dataset that matches the data (tinyimagenet is 64x64), or pass resize=True to resize "
                         f"them to {size}x{size} (recipes: --task-kwargs '{{\"resize\": true}}')")


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


def _load_parquet(root: Path, split: str, image_column, label_column, size, resize: bool = False) -> tuple[Tensor, Tensor]:
    import datasets

    from robustkd.guards import check_parquet_files

    files = sorted(p.name for p in root.glob("*.parquet"))
    for name in SPLIT_ALIASES.get(split, (split,)):
        matching = [f for f in files if f.startswith(name + "-") or f.startswith(name + ".") or f == f"{name}.parquet"]
        if matching:
            paths = [str(root / f) for f in matching]
            check_parquet_files(paths, split, root)  # a corrupt file or no rows: one line, not a DatasetGenerationError
            ds = datasets.load_dataset("parquet", data_files={split: paths}, split=split)
            return _decode_hf(ds, image_column, label_column, size, resize, f"{root} ({split} split)")
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


def _load_image_folder(root: Path, split: str, size: int | None, resize: bool = True) -> tuple[Tensor, Tensor, list[str]]:
    from torchvision.datasets import ImageFolder

    for name in SPLIT_ALIASES.get(split, (split,)):
        if (root / name).is_dir():
            _check_folder_classes(root, name)
            folder = ImageFolder(str(root / name))
            images = [_pil_to_array(folder.loader(path), size if resize else None) for path, _ in folder.samples]
            if not images:
                raise DataNotFoundError(f"{root / name} holds no images")
            _check_sizes(images, size, str(root / name))
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
                label_column: str | None = None, resize: bool = False) -> tuple[Tensor, Tensor]:
    """Decode a split once (cached per process). Raises :class:`DataNotFoundError` with the fix. Images of
    another size than ``image_size`` are refused unless ``resize`` (then resized, bilinear)."""
    if data_dir is None:
        return _load_hub(hub_name, split, image_column, label_column, image_size, resize)
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataNotFoundError(f"--data-dir {data_dir!r} does not exist or is not a directory. Point --data-dir at "
                                "a Hugging Face parquet folder (e.g. ../shared/data/cifar10/plain_text), "
                                "torchvision's CIFAR folder, or an ImageFolder tree.")
    if (pq := _parquet_dir(root)) is not None:
        return _load_parquet(pq, split, image_column, label_column, image_size, resize)
    if (root / "cifar-10-batches-py").is_dir() or (root / "cifar-100-python").is_dir() or (root / "data_batch_1").exists():
        return _load_torchvision_cifar(root, split, num_classes)
    if any((root / s).is_dir() for s in ("train", "test", "val")):
        x, y, _ = _load_image_folder(root, split, image_size, resize)
        return x, y
    raise DataNotFoundError(f"cannot read images from --data-dir {data_dir!r}: it holds no *.parquet files, no "
                            "torchvision CIFAR batches, and no train/ or test/ ImageFolder tree.")


def _load_hub(hub_name: str | None, split: str, image_column, label_column, size, resize: bool = False) -> tuple[Tensor, Tensor]:
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
            from robustkd.guards import check_split_rows

            check_split_rows(ds[name], split, hub_name)
            return _decode_hf(ds[name], image_column, label_column, size, resize, f"{hub_name} ({name} split)")
    raise DataNotFoundError(f"{hub_name!r} has splits {list(ds)}, none of them {split!r}")


# -- the task -------------------------------------------------------------------------------
class ImageClassification(ContinuousTask):
    """Images in [0, 1] of shape (3, size, size); L-inf 8/255 threat model by default."""

    modality = "image"
    input_domain = (0.0, 1.0)

    def __init__(self, name: str, num_classes: int, image_size: int, stats: tuple, *,
                 data_dir: str | None = None, hub_name: str | None = None, augment: bool = True,
                 image_column: str | None = None, label_column: str | None = None,
                 eps: float = 8 / 255, norm: str = "linf", resize: bool = False):
        self.name, self.num_classes, self.image_size, self.stats = name, num_classes, image_size, stats
        self.resize = bool(resize)  # images of another size: refused unless True
        self.data_dir = str(data_dir) if data_dir is not None else None
        self.hub_name, self.augment = hub_name, augment
        self.image_column, self.label_column = image_column, label_column
        self.eps, self.norm = eps, norm
        self._datasets: dict[str, Dataset] = {}

    def dataset(self, split: str) -> Dataset:
        if split not in self._datasets:
            x, y = load_images(self.data_dir, self.hub_name, split, self.num_classes, self.image_size,
                               self.image_column, self.label_column, self.resize)
            self._check_data(x, y, split)
            self._datasets[split] = ImageTensorDataset(x, y)
        return self._datasets[split]

    def _check_data(self, x: Tensor, y: Tensor, split: str) -> None:
        if len(y) == 0:
            from robustkd.guards import empty_split

            raise empty_split(split, self.data_dir or self.hub_name or self.name)
        expected = (3, self.image_size, self.image_size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"{self.name} {split} images have shape {tuple(x.shape[1:])}, expected {expected}: "
                             f"pick the matching --dataset or set image_size.")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"{self.name} {split} labels span {int(y.min())}..{int(y.max())} but the task has "
                             f"{self.num_classes} classes: this is not {self.name} data (pick the matching --dataset).")

    def collate_fn(self, split: str) -> Callable[[list[Batch]], Batch]:
        return collate_eval  # training augmentation runs batched on the device: augment_batch

    def augment_batch(self, batch: Batch) -> Batch:
        """4-pixel pad + random crop and horizontal flip of every image (:func:`augment_images`)
        when the task augments (``augment=True``, the default for real data)."""
        if not self.augment:
            return batch
        return {**batch, "inputs": augment_images(batch["inputs"])}

    def validate_batch(self, batch: Batch) -> None:
        super().validate_batch(batch)
        x = batch["inputs"]
        expected = (3, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"{self.name} expects image batches of shape (N, {', '.join(map(str, expected))}), "
                             f"got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"image batches are {x.dtype} but models and attacks take float images in [0, 1]: pass "
                             "x.float() / 255 (robustkd's data loaders convert uint8 images)")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            hint = ("they look like 0-255 pixel values: divide the images by 255"
                    if lo >= 0.0 and hi <= 255.0 else "remove Normalize from your data pipeline; robustkd models "
                    "normalise inside")
            raise ValueError(f"image values span [{lo:.3f}, {hi:.3f}] but must lie in [0, 1] (attacks and budgets "
                             f"like 8/255 assume raw pixels): {hint}.")

    def build_model(self, name: str, *, normalize: bool = True, **kwargs: Any) -> nn.Module:
        """A registered image model or ``timm:<name>``; with ``normalize`` (default) it starts with this
        data set's per-channel standardisation, without it the bare network (reference key layout)."""
        from .image_models import accepts_normalize, with_normalization

        mean, std = self.stats
        if name.startswith("timm:"):
            import timm

            if not timm.is_model(name[5:]):
                import difflib

                close = difflib.get_close_matches(name[5:], timm.list_models(), n=3)
                raise ValueError(f"timm has no model {name[5:]!r}" + (f": did you mean {', '.join('timm:' + c for c in close)}?"
                                 if close else " (list them with python -c \"import timm; print(timm.list_models('*net*'))\")"))
            return with_normalization(timm.create_model(name[5:], num_classes=self.num_classes, **kwargs),
                                      normalize, mean, std)
        factory = MODELS.get(name)
        if getattr(factory, "_robustkd_modality", None) != "image":
            raise ValueError(f"the model {name!r} is not an image model; image models: {', '.join(self.model_names())}, "
                             "or timm:<name>")
        if accepts_normalize(factory):
            return factory(num_classes=self.num_classes, normalize=normalize, mean=mean, std=std, **kwargs)
        return with_normalization(factory(num_classes=self.num_classes, **kwargs), normalize, mean, std)

    def model_names(self) -> list[str]:
        return [e.name for e in MODELS.entries() if getattr(e.obj, "_robustkd_modality", None) == "image"]

    def load_pretrained(self, spec: str, **options: Any) -> nn.Module | None:
        """A pretrained image model for this task (the ``Task.load_pretrained`` hook): ``timm:<name>``
        (pretrained timm weights, refused when their head has another class count), a Hugging Face image
        classifier directory (``config.json``; its own normalisation inside), or one of
        :mod:`robustkd_tasks.image_pretrained`'s forms (``autoattack-example:resnet18``, ``robustbench:NAME``,
        ``ARCH:PATH``). ``None`` for anything else."""
        from .image_pretrained import load_image_pretrained

        path = Path(str(spec)).expanduser()
        if path.is_dir() and (path / "config.json").exists():
            return load_hf_image_classifier(path, self)
        if str(spec).startswith("timm:"):
            return load_timm_pretrained(str(spec), self)
        return load_image_pretrained(spec, self, **options)

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
    return ImageClassification("tinyimagenet", 200, 64, TINY_IMAGENET_STATS, data_dir=data_dir, hub_name="zh-plus/tiny-imagenet", **kwargs)


@register_task("imagefolder")
def imagefolder(data_dir: str | None = None, *, num_classes: int | None = None, image_size: int = 32,
                **kwargs: Any) -> ImageClassification:
    """Any ImageFolder tree (train/<class>/..., test/<class>/...), resized to image_size (resize=False refuses
    images of another size instead)."""
    kwargs.setdefault("resize", True)
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


# -- pretrained models (the load_pretrained hook) ---------------------------------------------------
class HFImageClassifier(nn.Module):
    """A transformers image classifier behind robustkd's image contract: pixels in [0, 1] in, logits out;
    the checkpoint's own normalisation (its preprocessor config) lives inside, so attacks act on raw
    pixels like for every other robustkd image model."""

    def __init__(self, model: nn.Module, mean: list[float] | None = None, std: list[float] | None = None):
        super().__init__()
        self.model = model
        self.register_buffer("mean", None if mean is None else torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", None if std is None else torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return self.model(pixel_values=x).logits


def load_hf_image_classifier(path: Path, task: ImageClassification) -> HFImageClassifier:
    """A Hugging Face image-classification directory as a model for ``task``; another class count or input
    size is refused with the fix."""
    import json

    from transformers import AutoModelForImageClassification

    config = json.loads((path / "config.json").read_text())
    labels = config.get("id2label") or {}
    n = len(labels) if labels else config.get("num_labels")
    if n is not None and int(n) != task.num_classes:
        raise ValueError(f"the model {str(path)!r} has {n} classes but the task {task.name!r} has {task.num_classes}: "
                         "a teacher must be trained on the student's classes (fine-tune it on this task first)")
    model = AutoModelForImageClassification.from_pretrained(str(path), local_files_only=True)
    size = getattr(model.config, "image_size", None)
    if isinstance(size, int) and size != task.image_size:
        raise ValueError(f"the model {str(path)!r} takes {size}x{size} images but the task {task.name!r} has "
                         f"{task.image_size}x{task.image_size}: use a model built for this input size")
    mean = std = None
    pre = path / "preprocessor_config.json"
    if pre.exists():
        proc = json.loads(pre.read_text())
        if proc.get("do_normalize", True) and "image_mean" in proc:
            mean, std = proc["image_mean"], proc["image_std"]
    return HFImageClassifier(model, mean, std)


def load_timm_pretrained(spec: str, task: ImageClassification) -> nn.Module:
    """``timm:<name>`` with its pretrained weights (from the local cache when offline); a head pretrained
    for another class count would be random, so it is refused."""
    try:
        model = task.build_model(spec, pretrained=True)
    except Exception as exc:  # noqa: BLE001 - unknown name, offline without cache, wrong head: one fix
        raise ValueError(f"could not load the pretrained timm model {spec!r} ({type(exc).__name__}: {str(exc)[:300]}). "
                         "Offline, timm needs the weights in the local Hugging Face cache; otherwise pass a recipe "
                         "output directory.") from exc
    net = model[-1] if isinstance(model, nn.Sequential) else model
    cfg = getattr(net, "pretrained_cfg", {}) or {}
    if cfg.get("num_classes") not in (None, task.num_classes):
        raise ValueError(f"the timm model {spec!r} was pretrained with {cfg['num_classes']} classes but the task "
                         f"{task.name!r} has {task.num_classes}: its classifier head would be random. Fine-tune it on "
                         f"this task first (e.g. recipes/cifar_adr.py --method standard --model {spec}) and pass that "
                         "run's output directory.")
    return model


# -- Hugging Face image classifiers inside transformers.Trainer (robustkd.hf) ------------------------
class HFImageTask(Task):
    """A data-less task around a transformers image classifier and its image processor, for
    :class:`robustkd.hf.RobustTrainer`: batches are the processor's ``{"pixel_values", "labels"}``; attacks
    act on raw pixels in [0, 1] (the processor's normalisation is undone, the perturbation added, and the
    normalisation applied again), in an L-inf 8/255 ball by default."""

    modality = "image"
    input_domain = (0.0, 1.0)

    def __init__(self, model: nn.Module, processor: Any = None, *, eps: float | None = None, norm: str | None = None,
                 name: str = "hf_image"):
        config = getattr(model, "config", None)
        if getattr(config, "num_labels", None) is None:
            raise ValueError("the model has no config.num_labels: pass a transformers image-classification model")
        self.name, self.num_classes = name, int(config.num_labels)
        self.norm = norm or "linf"
        self.eps = float(eps) if eps is not None else {"linf": 8 / 255, "l2": 0.5}[self.norm]
        mean = std = None
        if processor is not None and getattr(processor, "do_normalize", False):
            mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
        self.mean = torch.tensor(mean if mean is not None else [0.0, 0.0, 0.0]).view(1, -1, 1, 1)
        self.std = torch.tensor(std if std is not None else [1.0, 1.0, 1.0]).view(1, -1, 1, 1)

    def dataset(self, split: str) -> Dataset:
        raise ValueError(f"the task {self.name!r} wraps a model for transformers.Trainer and has no data of its own: "
                         "pass train_dataset/eval_dataset to the Trainer")

    def build_model(self, name: str, **kwargs: Any) -> nn.Module:
        from transformers import AutoModelForImageClassification

        return AutoModelForImageClassification.from_pretrained(name, num_labels=self.num_classes, **kwargs)

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.mean.to(x.device, x.dtype), self.std.to(x.device, x.dtype)

    def perturbation_base(self, model: nn.Module, batch: Batch) -> Tensor:
        pv = batch["pixel_values"]
        mean, std = self._stats(pv)
        return pv * std + mean

    def logits(self, model: nn.Module, batch: Batch, delta: Tensor | None = None) -> Tensor:
        pv = batch["pixel_values"]
        if delta is not None:
            mean, std = self._stats(pv)
            pv = ((pv * std + mean) + delta.to(pv.dtype) - mean) / std
        return model(pixel_values=pv).logits

    def threat_model(self, eps: float | None = None, norm: str | None = None, **kwargs: Any) -> ThreatModel:
        if kwargs:
            raise TypeError(f"unknown threat-model options {sorted(kwargs)} for {self.name}: eps and norm")
        return ThreatModel(self.eps if eps is None else eps, norm or self.norm, domain=self.input_domain)


@register_task("hf_image", hf_input="pixel_values")
def hf_image(model: nn.Module, processor: Any = None, **kwargs: Any) -> HFImageTask:
    """Any transformers image classifier (``pixel_values`` in) inside RobustTrainer; eps/norm options."""
    return HFImageTask(model, processor, **kwargs)


__all__ = ["ImageClassification", "SyntheticImages", "DataNotFoundError", "HFImageClassifier", "HFImageTask",
           "image_models"]
