"""Pretrained image models by name, for the image task's ``load_pretrained`` hook.

    autoattack-example:resnet18   the CIFAR-10 ResNet-18 shipped in the pyautoattack wheel
                                  (examples/model_test.pt, inputs in [0, 1], no normalisation)
    robustbench:NAME              a RobustBench zoo model (robustbench:L2/NAME for another threat
                                  model), from --model-dir (RobustBench's layout), optional extra
    ARCH:PATH                     any state dict (.pt/.pth/.bin/.safetensors) for a registered
                                  image architecture, e.g. preact_resnet18:weights.pt
                                  (normalize=True puts the task's standardisation in front)

Every loader returns the model in eval mode; a class count or input size the task does not have
is refused with the fix.
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustkd.registry import MODELS

AUTOATTACK_EXAMPLES = {"resnet18": ("resnet18", "model_test.pt")}
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def autoattack_example_path(name: str = "resnet18") -> Path:
    """Where the pyautoattack wheel keeps the example model's state dict."""
    if name not in AUTOATTACK_EXAMPLES:
        raise ValueError(f"pyautoattack ships the example model(s) {', '.join(AUTOATTACK_EXAMPLES)}, not {name!r}: "
                         "use autoattack-example:resnet18")
    path = Path(str(importlib.resources.files("pyautoattack") / "examples" / AUTOATTACK_EXAMPLES[name][1]))
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed pyautoattack: reinstall it "
                                "(pip install --force-reinstall pyautoattack)")
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a file without running pickled code (``weights_only``); the usual wrappers
    (``{"state_dict": ...}``, ``{"model": ...}``, DataParallel's ``module.`` prefix) are unwrapped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"the weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - not a tensor file, or one that needs arbitrary pickle
            raise ValueError(f"{str(path)!r} is not a state dict robustkd can read safely ({type(exc).__name__}: "
                             f"{str(exc)[:200]})") from exc
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_state_dict_model(arch: str, path: str | Path, task: Any, normalize: bool = True) -> nn.Module:
    """A registered image architecture of ``task`` with the weights of ``path`` loaded strictly into the
    bare network (the reference key layout)."""
    model = task.build_model(arch, normalize=normalize)
    net = model[1] if normalize and isinstance(model, nn.Sequential) else model
    state = read_state_dict(path)
    result = net.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"the weights in {str(path)!r} do not fit the architecture {arch!r} (missing "
                         f"{result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]}): name the architecture "
                         "they were trained with")
    return model.eval()


def load_image_pretrained(spec: str, task: Any, model_dir: str | Path | None = None,
                          normalize: bool | None = None, threat_model: str | None = None,
                          **options: Any) -> nn.Module | None:
    """The model ``spec`` names for ``task``, or ``None`` when ``spec`` is not one of the forms above."""
    spec = str(spec)
    if options:
        raise TypeError(f"unknown options {sorted(options)} for the image model {spec!r}")
    if spec.startswith("autoattack-example:"):
        arch, _ = AUTOATTACK_EXAMPLES.get(spec.split(":", 1)[1], (None, None))
        path = autoattack_example_path(spec.split(":", 1)[1])
        if task.num_classes != 10 or task.image_size != 32:
            raise ValueError(f"{spec} is a CIFAR-10 model (10 classes, 32x32) but the task {task.name!r} has "
                             f"{task.num_classes} classes of {task.image_size}x{task.image_size}: use --task cifar10")
        # the example model takes [0, 1] pixels without normalisation (pyautoattack examples/eval.py)
        return load_state_dict_model(arch, path, task, normalize=bool(normalize))
    if spec.startswith("robustbench:"):
        from robustkd.robustbench import load_robustbench

        if task.name not in ("cifar10", "cifar100", "imagenet"):
            raise ValueError(f"RobustBench's zoo has cifar10, cifar100 and imagenet models, not {task.name!r} ones")
        return load_robustbench(spec, task.name, model_dir=model_dir, threat_model=threat_model)
    arch, sep, rest = spec.partition(":")
    if sep and arch in MODELS and getattr(MODELS.get(arch), "_robustkd_modality", None) == "image" \
            and Path(rest).suffix in STATE_DICT_SUFFIXES:
        return load_state_dict_model(arch, rest, task, normalize=True if normalize is None else normalize)
    return None
