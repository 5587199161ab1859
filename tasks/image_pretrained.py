"""Pretrained image models by name, for the image task's ``load_pretrained`` hook.

    autoattack-example:resnet18   the CIFAR-10 ResNet-18 shipped in the pyautoattack wheel
                                  (examples/model_test.pt, inputs in [0, 1], no normalisation)
    robustbench:NAME              a RobustBench zoo model (robustbench:L2/NAME for another threat
                                  model), from --model-dir (RobustBench's layout), optional extra
    ARCH:PATH                     any state dict (.pt/.pth/.bin/.safetensors) for a registered
                                  image architecture, e.g. preact_resnet18:weights.pt
                                  (normalize=True puts the task's standardisation in front)
    timm:NAME                     timm's pretrained weights (:func:`load_timm_pretrained`)
    a directory with config.json  a Hugging Face image classifier (:func:`load_hf_image_classifier`),
                                  its own normalisation inside (:class:`HFImageClassifier`)

Every loader returns the model in eval mode; a class count or input size the task does not have
is refused with the fix.
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from robustkd.registry import MODELS

if TYPE_CHECKING:
    from .image import ImageClassification

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
    state: Any  # a file may hold a state dict, a wrapper around one, or anything else (refused below)
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


def load_state_dict_model(arch: str, path: str | Path, task: ImageClassification, normalize: bool = True) -> nn.Module:
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


def load_image_pretrained(spec: str, task: ImageClassification, model_dir: str | Path | None = None,
                          normalize: bool | None = None, threat_model: str | None = None,
                          **options: Any) -> nn.Module | None:
    """The model ``spec`` names for ``task``, or ``None`` when ``spec`` is not one of the forms above.

    ``normalize`` is for the state-dict forms (``ARCH:PATH``, ``autoattack-example:``); a Hugging Face
    directory (its checkpoint's normalisation inside) and ``timm:NAME`` (the task's standardisation in
    front) refuse it. ``model_dir`` and ``threat_model`` are RobustBench's: the other forms refuse them."""
    spec = str(spec)
    if options:
        raise TypeError(f"unknown options {sorted(options)} for the image model {spec!r}")
    path = Path(spec).expanduser()
    hf_dir = path.is_dir() and (path / "config.json").exists()
    if hf_dir or spec.startswith("timm:"):
        _refuse_robustbench_options(spec, model_dir, threat_model)
        if normalize is not None:
            raise TypeError(f"the model {spec!r} takes no normalize option: " + (
                "a Hugging Face directory keeps its checkpoint's own normalisation inside" if hf_dir else
                "a pretrained timm model always starts with the task's standardisation"))
        return load_hf_image_classifier(path, task) if hf_dir else load_timm_pretrained(spec, task)
    if spec.startswith("autoattack-example:"):
        _refuse_robustbench_options(spec, model_dir, threat_model)
        name = spec.split(":", 1)[1]
        path = autoattack_example_path(name)  # refuses a name pyautoattack does not ship
        arch = AUTOATTACK_EXAMPLES[name][0]
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
        _refuse_robustbench_options(spec, model_dir, threat_model)
        return load_state_dict_model(arch, rest, task, normalize=True if normalize is None else normalize)
    return None


def _refuse_robustbench_options(spec: str, model_dir: str | Path | None, threat_model: str | None) -> None:
    """``model_dir`` and ``threat_model`` say where a RobustBench zoo model's file is and which leaderboard it
    is from; a model of another form would not use them, so they are refused rather than ignored."""
    given = [name for name, value in (("model_dir", model_dir), ("threat_model", threat_model)) if value is not None]
    if given:
        raise TypeError(f"the model {spec!r} takes no {' or '.join(given)} option: "
                        f"{'they are' if len(given) > 1 else 'it is'} RobustBench's, for robustbench:NAME models "
                        "only; drop it")


class HFImageClassifier(nn.Module):
    """A transformers image classifier behind robustkd's image contract: pixels in [0, 1] in, logits out;
    the checkpoint's own normalisation (its preprocessor config) lives inside, so attacks act on raw
    pixels like for every other robustkd image model."""

    mean: Tensor | None
    std: Tensor | None

    def __init__(self, model: nn.Module, mean: list[float] | None = None, std: list[float] | None = None):
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std (the checkpoint's normalisation), or neither")
        super().__init__()
        self.model = model
        self.register_buffer("mean", None if mean is None else torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", None if std is None else torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.mean is not None and self.std is not None:
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
    mean: list[float] | None = None
    std: list[float] | None = None
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
