"""Image classification tasks: CIFAR-10, CIFAR-100, TinyImageNet-200, any ImageFolder tree, synthetic
images, and ``hf_image`` (a transformers image classifier inside :class:`robustkd.hf.RobustTrainer`).

Images are pixels in [0, 1] of shape (3, size, size); the models standardise inside, so attacks act
on raw pixels. The data (local parquet, torchvision or ImageFolder folders, or a hub name; decoded
once to uint8; augmentation as batched tensor operations on the training device) is read by
:mod:`robustkd_tasks.image_data`, pretrained models are loaded by
:mod:`robustkd_tasks.image_pretrained`, and the architectures live in
:mod:`robustkd_tasks.image_models`; this module holds the tasks and registers them.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from robustkd.registry import MODELS, register_task
from robustkd.task import Batch, ContinuousTask, DataNotFoundError, check_norm
from robustkd.threat import ThreatModel

from . import image_models
from .hf_model import HFModelTask
from .image_data import ImageTensorDataset, augment_images, collate_augment, collate_eval, load_images
from .image_pretrained import HFImageClassifier, load_hf_image_classifier, load_image_pretrained, load_timm_pretrained

CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# TinyImageNet's own statistics, as ADR's reference uses them (src/model/create_model.py:16-17)
TINY_IMAGENET_STATS = ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262))
DEFAULT_EPS = {"linf": 8 / 255, "l2": 0.5}  # the image budgets when only a norm is given


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
        self.eps, self.norm = eps, check_norm(norm)
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
        classifier directory (``config.json``; its own normalisation inside), ``autoattack-example:resnet18``,
        ``robustbench:NAME`` or ``ARCH:PATH`` (:func:`robustkd_tasks.image_pretrained.load_image_pretrained`).
        ``None`` for anything else."""
        return load_image_pretrained(spec, self, **options)

    def threat_model(self, eps: float | None = None, norm: str | None = None, **kwargs: Any) -> ThreatModel:
        if kwargs:
            raise TypeError(f"unknown threat-model options {sorted(kwargs)} for {self.name}: image budgets take "
                            "eps and norm (linf or l2)")
        norm = check_norm(norm or self.norm)
        if eps is None:
            eps = self.eps if norm == self.norm else DEFAULT_EPS[norm]
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


# -- Hugging Face image classifiers inside transformers.Trainer (robustkd.hf) ------------------------
class HFImageTask(HFModelTask):
    """A data-less task around a transformers image classifier and its image processor, for
    :class:`robustkd.hf.RobustTrainer`: batches are the processor's ``{"pixel_values", "labels"}``; attacks
    act on raw pixels in [0, 1] (the processor's normalisation is undone, the perturbation added, and the
    normalisation applied again), in an L-inf 8/255 ball by default."""

    modality = "image"
    input_domain = (0.0, 1.0)
    input_name = "pixel_values"
    auto_class = "AutoModelForImageClassification"
    model_kind = "image-classification"
    threat_options = "eps and norm"

    def __init__(self, model: nn.Module, processor: Any = None, *, eps: float | None = None, norm: str | None = None,
                 name: str = "hf_image"):
        super().__init__(model, name=name)
        self.norm = check_norm(norm or "linf")
        self.eps = float(eps) if eps is not None else DEFAULT_EPS[self.norm]
        mean = std = None
        if processor is not None and getattr(processor, "do_normalize", False):
            mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
        self.mean = torch.tensor(mean if mean is not None else [0.0, 0.0, 0.0]).view(1, -1, 1, 1)
        self.std = torch.tensor(std if std is not None else [1.0, 1.0, 1.0]).view(1, -1, 1, 1)

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.mean.to(x.device, x.dtype), self.std.to(x.device, x.dtype)

    def perturbation_base(self, model: nn.Module, batch: Batch) -> Tensor:
        """The raw pixels: the processor's normalisation undone."""
        pv = batch["pixel_values"]
        mean, std = self._stats(pv)
        return pv * std + mean

    def model_input(self, batch: Batch, delta: Tensor | None) -> Tensor:
        """``delta`` added to the raw pixels, then the processor's normalisation applied again."""
        pv: Tensor = batch["pixel_values"]
        if delta is not None:
            mean, std = self._stats(pv)
            pv = ((pv * std + mean) + delta.to(pv.dtype) - mean) / std
        return pv

    def threat_model(self, eps: float | None = None, norm: str | None = None, **kwargs: Any) -> ThreatModel:
        self.refuse_threat_options(kwargs)
        return ThreatModel(self.eps if eps is None else eps, check_norm(norm or self.norm), domain=self.input_domain)


@register_task("hf_image", hf_input="pixel_values")
def hf_image(model: nn.Module, processor: Any = None, **kwargs: Any) -> HFImageTask:
    """Any transformers image classifier (``pixel_values`` in) inside RobustTrainer; eps/norm options."""
    return HFImageTask(model, processor, **kwargs)


__all__ = ["CIFAR100_STATS", "CIFAR10_STATS", "IMAGENET_STATS", "TINY_IMAGENET_STATS", "DataNotFoundError",
           "HFImageClassifier", "HFImageTask", "ImageClassification", "ImageTensorDataset", "SyntheticImages",
           "augment_images", "cifar10", "cifar100", "collate_augment", "collate_eval", "hf_image", "image_models",
           "imagefolder", "load_hf_image_classifier", "load_images", "load_timm_pretrained", "synthetic",
           "tinyimagenet"]
