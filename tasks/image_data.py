"""Image data: decoding a split once to a uint8 tensor, and batch collation and augmentation.

A split comes from a local directory (the Hugging Face parquet layout, torchvision's CIFAR folder,
or an ImageFolder tree with ``train/`` and ``test/`` or ``val/``) or, when online, a hub name, and is
kept as one uint8 tensor ``(N, C, H, W)`` with int64 labels (:class:`ImageTensorDataset`). Batches
become float images in [0, 1] (:func:`collate_eval`); augmentation (4-pixel pad + random crop,
horizontal flip) runs on whole batches as batched tensor operations where the batch is
(:func:`augment_images`; the trainer calls the task's ``augment_batch`` on the training device).
"""
from __future__ import annotations

import functools
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from robustkd.task import Batch, DataNotFoundError, pick_column

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
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def _parquet_dir(root: Path) -> Path | None:
    for candidate in (root, root / "plain_text", root / "data"):
        if candidate.is_dir() and any(candidate.glob("*.parquet")):
            return candidate
    return None


def _load_parquet(root: Path, split: str, image_column: str | None, label_column: str | None, size: int | None,
                  resize: bool = False) -> tuple[Tensor, Tensor]:
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


def _load_hub(hub_name: str | None, split: str, image_column: str | None, label_column: str | None, size: int | None,
              resize: bool = False) -> tuple[Tensor, Tensor]:
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

__all__ = ["IMAGE_COLUMNS", "LABEL_COLUMNS", "SPLIT_ALIASES", "ImageTensorDataset", "augment_images",
           "collate_augment", "collate_eval", "load_images"]
