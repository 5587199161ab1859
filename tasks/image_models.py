"""Image classifiers used in the adversarial-robustness literature.

Registered in the model registry with ``modality="image"``; any timm model is available as
``timm:<name>``. Every factory takes ``normalize: bool = True``: with it the model starts with
the data set's per-channel standardisation (``mean``/``std``, passed by the task), so attacks
act on raw pixels in [0, 1]; ``normalize=False`` gives the bare network (MTARD's reference
students and the AutoAttack example model have no normalisation). The normalisation is a
separate first module (``nn.Sequential(Normalize, net)``); the bare network's state dict has
exactly the key layout of the reference definitions, so published checkpoints load into it:

* ``resnet18``: the CIFAR ResNet-18 of ADR's ``src/model/resnet.py`` (also the layout of
  ``pyautoattack/examples/resnet.py`` and RobustBench's ``ResNet``): ``conv1``, ``bn1``,
  ``layer1``..``layer4``, ``linear``.
* ``preact_resnet18``: ADR's ``src/model/preact_resnet.py`` = RobustBench's ``DMPreActResNet``
  (DeepMind layout: ``conv_2d``, ``layer_0``..``layer_3``, ``batchnorm``, ``logits``; explicit
  "SAME" padding; a 3x3 shortcut convolution on the *raw* block input).
* ``wrn34_10``: ADR's ``src/model/wideresnet.py`` = RobustBench's ``DMWideResNet`` with depth 34,
  width 10 (``init_conv``, ``layer.{g}.block.{i}``, ``batchnorm``, ``logits``).

The three compute as the reference does, rounding included: ``pooling="auto"`` (default) averages a
fixed window where the reference does (``AvgPool2d(4)`` / ``AvgPool2d(8)`` on CIFAR-sized inputs, its
``adaptive_pooling=False``) and a global adaptive average otherwise (its TinyImageNet models);
``"window"`` / ``"global"`` force one. ``activation="swish"`` is the reference's swish
(``src/model/create_model.py:20-40``, ADR's PreAct-ResNet configs), ``"relu"`` the default.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkd.registry import register_model

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


class Normalize(nn.Module):
    """Per-channel standardisation as the model's first layer, so attacks work in [0, 1] pixels."""

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def with_normalization(net: nn.Module, normalize: bool, mean: Sequence[float] | None,
                       std: Sequence[float] | None) -> nn.Module:
    """``nn.Sequential(Normalize(mean, std), net)`` when ``normalize``, else ``net`` itself."""
    if not normalize:
        return net
    if mean is None or std is None:
        raise ValueError("normalize=True needs the data set's mean and std (the task passes them)")
    return nn.Sequential(Normalize(mean, std), net)


def accepts_normalize(factory) -> bool:
    """True when an image model factory takes ``normalize``/``mean``/``std`` itself (the built-in ones do)."""
    params = inspect.signature(factory).parameters
    return all(k in params for k in ("normalize", "mean", "std"))


POOLING = ("auto", "window", "global")
ACTIVATIONS = ("relu", "swish")


class _SwishFn(torch.autograd.Function):
    """``x * sigmoid(x)`` with the gradient ``sigmoid(x) * (1 + x * (1 - sigmoid(x)))`` computed from
    those formulas (not ``F.silu``'s fused kernel), so it rounds as ADR's swish does."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad * (s * (1 + x * (1 - s)))


def _activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}: use one of {', '.join(ACTIVATIONS)}")
    return F.relu if name == "relu" else _SwishFn.apply


def _check_pooling(pooling: str) -> str:
    if pooling not in POOLING:
        raise ValueError(f"unknown pooling {pooling!r}: use one of {', '.join(POOLING)}")
    return pooling


def _pool(out: Tensor, pooling: str, window: int) -> Tensor:
    """Average the last feature map to one vector per example: a ``window`` x ``window`` average pool
    (the reference's CIFAR models) or a global adaptive average (its TinyImageNet models)."""
    fits = out.shape[-2:] == (window, window)
    if pooling == "window" or (pooling == "auto" and fits):
        if not fits:
            raise ValueError(f"pooling='window' averages a {window}x{window} feature map, these inputs give "
                             f"{out.shape[-2]}x{out.shape[-1]}: build the model with pooling='global' (or 'auto')")
        return F.avg_pool2d(out, window).flatten(1)
    return F.adaptive_avg_pool2d(out, 1).flatten(1)


class SmallCNN(nn.Module):
    """A 4-conv network with batch norm for quick CPU runs (about 0.6 M parameters)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        w = width
        self.features = nn.Sequential(*block(in_channels, w), *block(w, w), nn.MaxPool2d(2),
                                      *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
                                      *block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(4 * w, 4 * w), nn.ReLU(inplace=True),
                                        nn.Linear(4 * w, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


# -- ResNet-18 (ADR src/model/resnet.py; pyautoattack examples/resnet.py) ---------------------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1, activation: str = "relu"):
        super().__init__()
        self.act = _activation(activation)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class ResNet(nn.Module):
    """The CIFAR ResNet of the adversarial-training literature (3x3 stem, no max-pool); ``pooling``:
    ``AvgPool2d(4)`` on 32x32 inputs as the reference, adaptive on others (see the module docstring)."""

    layer1: nn.Sequential  # set in __init__ by name, one per stage
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(self, layers: Sequence[int] = (2, 2, 2, 2), num_classes: int = 10, pooling: str = "auto",
                 activation: str = "relu"):
        super().__init__()
        self.pooling, self.act = _check_pooling(pooling), _activation(activation)
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, width, 2 if (j == 0 and i > 0) else 1, activation))
                cin = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(_pool(out, self.pooling, 4))


# -- the DeepMind-layout networks (ADR src/model/{preact_resnet,wideresnet}.py, RobustBench dm_*) ---
def _same_pad(x: Tensor, stride: int) -> Tensor:
    """TensorFlow "SAME" padding for a 3x3 convolution, as the reference pads by hand."""
    if stride == 1:
        return F.pad(x, (1, 1, 1, 1))
    if stride == 2:
        return F.pad(x, (0, 1, 0, 1))
    raise ValueError(f"unsupported stride {stride}")


class PreActBlock(nn.Module):
    """Pre-activation block; the shortcut (a 3x3 convolution when the shape changes) takes the
    block's raw input, not the activated one."""

    def __init__(self, cin: int, cout: int, stride: int = 1, activation: str = "relu"):
        super().__init__()
        self.stride, self.act = stride, _activation(activation)
        self.batchnorm_0 = nn.BatchNorm2d(cin)
        self.conv_2d_1 = nn.Conv2d(cin, cout, 3, stride, 0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(cout)
        self.conv_2d_2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.has_shortcut = stride != 1 or cin != cout
        if self.has_shortcut:
            self.shortcut = nn.Conv2d(cin, cout, 3, stride, 0, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.batchnorm_0(x))
        shortcut = self.shortcut(_same_pad(x, self.stride)) if self.has_shortcut else x
        out = self.conv_2d_1(_same_pad(out, self.stride))
        out = self.conv_2d_2(self.act(self.batchnorm_1(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet-18/34 in the reference (DeepMind) layout."""

    layer_0: nn.Sequential  # set in __init__ by name, one per stage
    layer_1: nn.Sequential
    layer_2: nn.Sequential
    layer_3: nn.Sequential

    def __init__(self, depth: int = 18, num_classes: int = 10, pooling: str = "auto", activation: str = "relu"):
        super().__init__()
        self.pooling, self.act = _check_pooling(pooling), _activation(activation)
        blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}.get(depth)
        if blocks is None:
            raise ValueError(f"PreActResNet depth must be 18 or 34, got {depth}")
        self.conv_2d = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        cin = 64
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), blocks)):
            layer = []
            for j in range(n):
                layer.append(PreActBlock(cin, width, (1 if i == 0 else 2) if j == 0 else 1, activation))
                cin = width
            setattr(self, f"layer_{i}", nn.Sequential(*layer))
        self.batchnorm = nn.BatchNorm2d(512)
        self.logits = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv_2d(x)
        out = self.layer_3(self.layer_2(self.layer_1(self.layer_0(out))))
        out = self.act(self.batchnorm(out))
        return self.logits(_pool(out, self.pooling, 4))


class WideBlock(nn.Module):
    """WideResNet block: when the width changes, both branches start from the activated input
    and the shortcut is a 1x1 convolution; otherwise the shortcut is the raw input."""

    def __init__(self, cin: int, cout: int, stride: int, activation: str = "relu"):
        super().__init__()
        self.stride, self.act = stride, _activation(activation)
        self.batchnorm_0 = nn.BatchNorm2d(cin)
        self.conv_0 = nn.Conv2d(cin, cout, 3, stride, 0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(cout)
        self.conv_1 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.has_shortcut = cin != cout
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False) if self.has_shortcut else None

    def forward(self, x: Tensor) -> Tensor:
        act = self.act(self.batchnorm_0(x))
        if self.has_shortcut:
            x = act
        out = self.conv_0(_same_pad(act, self.stride))
        out = self.conv_1(self.act(self.batchnorm_1(out)))
        return (self.shortcut(x) if self.shortcut is not None else x) + out


class _BlockGroup(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int, activation: str = "relu"):
        super().__init__()
        self.block = nn.Sequential(*[WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, activation)
                                     for i in range(n)])

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class WideResNet(nn.Module):
    """WideResNet (Zagoruyko & Komodakis) in the reference (DeepMind) layout; depth 34, width 10
    is the robustness benchmark model."""

    def __init__(self, depth: int = 34, width: int = 10, num_classes: int = 10, pooling: str = "auto",
                 activation: str = "relu"):
        super().__init__()
        self.pooling, self.act = _check_pooling(pooling), _activation(activation)
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.init_conv = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.layer = nn.Sequential(_BlockGroup(n, widths[0], widths[1], 1, activation),
                                   _BlockGroup(n, widths[1], widths[2], 2, activation),
                                   _BlockGroup(n, widths[2], widths[3], 2, activation))
        self.batchnorm = nn.BatchNorm2d(widths[3])
        self.logits = nn.Linear(widths[3], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.batchnorm(self.layer(self.init_conv(x))))
        return self.logits(_pool(out, self.pooling, 8))


# -- factories ------------------------------------------------------------------------------------
@register_model("small_cnn", modality="image")
def small_cnn(num_classes: int = 10, normalize: bool = True, mean: Sequence[float] | None = CIFAR10_MEAN,
              std: Sequence[float] | None = CIFAR10_STD, **kwargs) -> nn.Module:
    """Small 5-conv CNN with batch norm: trains in minutes on a CPU."""
    return with_normalization(SmallCNN(num_classes, **kwargs), normalize, mean, std)


@register_model("resnet18", modality="image")
def resnet18(num_classes: int = 10, normalize: bool = True, mean: Sequence[float] | None = CIFAR10_MEAN,
             std: Sequence[float] | None = CIFAR10_STD, pooling: str = "auto", activation: str = "relu") -> nn.Module:
    """CIFAR ResNet-18 (11.2 M parameters), ADR's main model (ADR src/model/resnet.py layout)."""
    return with_normalization(ResNet((2, 2, 2, 2), num_classes, pooling, activation), normalize, mean, std)


@register_model("preact_resnet18", modality="image")
def preact_resnet18(num_classes: int = 10, normalize: bool = True, mean: Sequence[float] | None = CIFAR10_MEAN,
                    std: Sequence[float] | None = CIFAR10_STD, pooling: str = "auto",
                    activation: str = "relu") -> nn.Module:
    """Pre-activation ResNet-18 as ADR's src/model/preact_resnet.py and RobustBench's DMPreActResNet."""
    return with_normalization(PreActResNet(18, num_classes, pooling, activation), normalize, mean, std)


@register_model("wrn34_10", modality="image")
def wrn34_10(num_classes: int = 10, normalize: bool = True, mean: Sequence[float] | None = CIFAR10_MEAN,
             std: Sequence[float] | None = CIFAR10_STD, pooling: str = "auto", activation: str = "relu") -> nn.Module:
    """WideResNet-34-10 (46 M parameters) as ADR's src/model/wideresnet.py and RobustBench's DMWideResNet."""
    return with_normalization(WideResNet(34, 10, num_classes, pooling, activation), normalize, mean, std)
