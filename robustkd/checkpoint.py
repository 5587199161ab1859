"""Final weights on disk, and loading them back wherever a teacher or checkpoint is asked for.

An output directory of any recipe holds ``model.safetensors`` (the student), ``ema.safetensors``
(the EMA / weight-averaged model, when there is one) and ``robustkd.json`` describing how to
rebuild the model (task, model name, number of classes). Weights load with safetensors:
no pickle is ever executed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from torch import nn

from .task import Task

META_FILE = "robustkd.json"
WEIGHT_FILES = {"student": "model.safetensors", "ema": "ema.safetensors"}


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temporary file and ``os.replace`` so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_model_dir(out_dir: str | Path, student: nn.Module, ema: nn.Module | None, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for which, model in (("student", student), ("ema", ema)):
        if model is not None:
            tmp = out / (WEIGHT_FILES[which] + ".tmp")
            save_model(model, str(tmp))
            os.replace(tmp, out / WEIGHT_FILES[which])
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=2, default=str))


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    meta_path = (path if path.is_dir() else path.parent) / META_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{path} is not a robustkd output directory: {meta_path.name} is missing. Pass the "
                                "--output-dir of a finished recipe run (or a file inside it).")
    return json.loads(meta_path.read_text())


def load_model(path: str | Path, task: Task, which: Literal["auto", "student", "ema"] = "auto") -> nn.Module:
    """Rebuild and load a model from a recipe's output directory (or one of its weight files).

    ``which="auto"`` takes the EMA model when the run kept one (the better robust teacher), else
    the student. Raises a clear error when the checkpoint was made for another task or class count.
    """
    from safetensors.torch import load_model as load_weights

    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist: pass a recipe's --output-dir")
    meta = read_meta(path)
    if path.is_file():
        weights = path
    else:
        order = {"auto": ("ema", "student"), "student": ("student",), "ema": ("ema",)}[which]
        found = [path / WEIGHT_FILES[w] for w in order if (path / WEIGHT_FILES[w]).exists()]
        if not found:
            raise FileNotFoundError(f"{path} has no {' or '.join(WEIGHT_FILES[w] for w in order)}: the run did not finish")
        weights = found[0]
    if meta.get("num_classes") != task.num_classes:
        raise ValueError(f"the checkpoint {path} has {meta.get('num_classes')} classes ({meta.get('task')}) but the task "
                         f"{task.name!r} has {task.num_classes}: use a checkpoint trained on this task.")
    model = task.build_model(meta["model"], **meta.get("model_kwargs", {}))
    missing, unexpected = load_weights(model, str(weights), strict=False)
    if missing or unexpected:
        raise ValueError(f"the weights in {weights} do not fit the model {meta['model']!r} built by task {task.name!r} "
                         f"(missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}): was it trained with "
                         "another --model?")
    return model.eval()
