"""Final weights on disk, and loading them back wherever a teacher or checkpoint is asked for.

An output directory of any recipe holds ``model.safetensors`` (the student), ``ema.safetensors``
(the EMA / weight-averaged model, when there is one) and ``robustkd.json`` describing how to
rebuild the model (task, model name, number of classes). Weights load with safetensors:
no pickle is ever executed.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Literal

from torch import nn

from .task import Task

META_FILE = "robustkd.json"
WEIGHT_FILES = {"student": "model.safetensors", "ema": "ema.safetensors"}
# What marks a directory as holding a run (a recipe's or RobustTrainer's output).
RUN_MARKERS = ("checkpoints", "metrics.jsonl", META_FILE, *WEIGHT_FILES.values(), "report.json")


class RunDirError(ValueError):
    """An output location that cannot take this run (another run in it, a file, read-only, full)."""


class CheckpointError(ValueError):
    """A checkpoint or weight file that cannot be read (truncated, empty pointer, corrupt JSON)."""


class WriteFailedError(ValueError):
    """A write during the run failed; the message names the path and the cause, and what is still intact."""


def run_markers(path: str | Path) -> list[str]:
    """The names in ``path`` that show it holds a run (empty when it holds none or does not exist)."""
    path = Path(path)
    if not path.is_dir():
        return []
    return [m for m in RUN_MARKERS if (path / m).exists() and not ((path / m).is_file() and (path / m).stat().st_size == 0)]


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: str | Path, need_bytes: int = 0, what: str = "--output-dir") -> None:
    """Refuse an output location that is a file, cannot be written, or lacks ``need_bytes`` of room.
    Checks the directory itself or, when it does not exist yet, its nearest existing parent."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{what} {path} is an existing file, not a directory: choose another {what}")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise RunDirError(f"{what} {path} cannot be created: {base} is a file, not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=base, prefix=".robustkd-write-test-"):
            pass
    except OSError as exc:
        raise RunDirError(f"{what} {path} is not writable ({base}: {exc.strerror or exc}): choose a writable "
                          f"{what}") from exc
    free = shutil.disk_usage(base).free
    if need_bytes and free < need_bytes:
        raise RunDirError(f"{what} {path} has {free / 2**20:.0f} MiB free but this run needs about "
                          f"{need_bytes / 2**20:.0f} MiB (checkpoint and final weights): free space or choose "
                          f"another {what}")


def prepare_output_dir(path: str | Path, *, resume: bool = False, overwrite: bool = False, need_bytes: int = 0,
                       what: str = "--output-dir") -> Path | None:
    """Make ``path`` ready for a new run (or a resumed one) before any work is done.

    A directory that already holds a run is refused unless ``resume`` (continue it) or ``overwrite``
    (move it aside to ``NAME.old-<UTC time>``; nothing is deleted). Also refuses a path that is a
    file, a read-only location, or one without ``need_bytes`` free. Returns where an old run was
    moved, else None.
    """
    path = Path(path).expanduser()
    if resume and overwrite:
        raise RunDirError("--resume continues the run in --output-dir and --overwrite moves it aside: pass one of them")
    check_writable(path, need_bytes, what)
    found = run_markers(path)
    if not found or resume:
        return None
    if not overwrite:
        raise RunDirError(f"{what} {path} already holds a run ({', '.join(found)}): pass --resume to continue it, "
                          f"--overwrite to move it aside to {path.name}.old-<time>, or choose a new {what}")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    moved = path.with_name(f"{path.name}.old-{stamp}")
    n = 1
    while moved.exists():
        moved, n = path.with_name(f"{path.name}.old-{stamp}-{n}"), n + 1
    os.replace(path, moved)
    return moved


def check_weight_file(path: str | Path) -> None:
    """Raise :class:`CheckpointError` (one line) when a safetensors or torch zip file is truncated or corrupt."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ValueError("the file is empty")
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                f.keys()
        elif path.suffix in (".bin", ".pkl", ".pt", ".pth") and zipfile.is_zipfile(path) is False:
            with open(path, "rb") as f:
                head = f.read(2)
            if head == b"PK":  # a torch zip archive whose end (central directory) is missing
                raise ValueError("the archive is truncated")
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors/zip errors of every kind mean the same
        raise CheckpointError(f"{path} is truncated or corrupt ({str(exc).splitlines()[0][:120]}): restore it, or "
                              "start again in a new --output-dir") from exc


def read_latest(root: str | Path) -> Path | None:
    """The checkpoint directory ``root/latest`` points to, checked readable; None when there is no pointer."""
    root = Path(root)
    pointer = root / "latest"
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    if not name:
        raise CheckpointError(f"{pointer} is empty: point it at a checkpoint folder (e.g. `echo epoch-3 > {pointer}`, "
                              f"one of {sorted(p.name for p in root.glob('epoch-*'))}) or start a new --output-dir")
    ckpt = root / name
    if not ckpt.is_dir():
        raise CheckpointError(f"{pointer} names {name!r} but {ckpt} does not exist: point it at one of "
                              f"{sorted(p.name for p in root.glob('epoch-*'))} or start a new --output-dir")
    for f in sorted(ckpt.iterdir()):
        if f.is_file():
            check_weight_file(f)
    try:
        json.loads((ckpt / "run_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{ckpt / 'run_config.json'} is missing or corrupt ({exc}): the checkpoint cannot "
                              "be resumed; start a new --output-dir") from exc
    return ckpt


def write_failed(path: str | Path, exc: OSError, intact: str | Path | None = None) -> WriteFailedError:
    """The one-line error for a failed write: the path, the cause, and what is still intact."""
    cause = exc.strerror or str(exc)
    keep = f"; {intact} is intact" if intact else ""
    return WriteFailedError(f"could not write {path}: {cause}{keep}. Free space or make the location writable, "
                            "then continue with --resume")


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
    try:
        return json.loads(meta_path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{meta_path} is corrupt ({exc}): restore it or re-run the recipe") from exc


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
    check_weight_file(weights)
    model = task.build_model(meta["model"], **meta.get("model_kwargs", {}))
    missing, unexpected = load_weights(model, str(weights), strict=False)
    if missing or unexpected:
        raise ValueError(f"the weights in {weights} do not fit the model {meta['model']!r} built by task {task.name!r} "
                         f"(missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}): was it trained with "
                         "another --model?")
    return model.eval()
