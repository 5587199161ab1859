"""Final weights on disk, and loading them back wherever a teacher or checkpoint is asked for.

An output directory of any recipe holds ``model.safetensors`` (the student), ``ema.safetensors``
(the EMA / weight-averaged model, when there is one) and ``robustkd.json`` describing how to
rebuild the model (task, model name, number of classes). Weights load with safetensors:
no pickle is ever executed.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
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


def run_markers(path: str | Path, extra: tuple[str, ...] = ()) -> list[str]:
    """The names in ``path`` that show it holds a run (empty when it holds none or does not exist);
    ``extra``: more names that count (an evaluation's report and plots)."""
    path = Path(path)
    if not path.is_dir():
        return []
    names = dict.fromkeys((*RUN_MARKERS, *extra))
    return [m for m in names if (path / m).exists() and not ((path / m).is_file() and (path / m).stat().st_size == 0)]


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
                       what: str = "--output-dir", markers: tuple[str, ...] = (),
                       resumable: bool = True) -> Path | None:
    """Make ``path`` ready for a new run (or a resumed one) before any work is done.

    A directory that already holds a run (any of :data:`RUN_MARKERS` or ``markers``) is refused
    unless ``resume`` (continue it) or ``overwrite`` (move it aside to ``NAME.old-<UTC time>``;
    nothing is deleted); so is one a live run is writing to (its lock, :class:`RunLock`). Also
    refuses a path that is a file, a read-only location, or one without ``need_bytes`` free.
    ``resumable=False``: the command cannot continue a run (``robustkd eval``), so the message does
    not offer ``--resume``. Returns where an old run was moved, else None.
    """
    path = Path(path).expanduser()
    if resume and overwrite:
        raise RunDirError("--resume continues the run in --output-dir and --overwrite moves it aside: pass one of them")
    check_writable(path, need_bytes, what)
    check_unlocked(path, what)
    found = run_markers(path, markers)
    if not found or resume:
        return None
    if not overwrite:
        first = "pass --resume to continue it, " if resumable else "pass "
        raise RunDirError(f"{what} {path} already holds a run ({', '.join(found)}): {first}"
                          f"--overwrite to move it aside to {path.name}.old-<time>, or choose a new {what}")
    return move_aside(path)


def move_aside(path: str | Path) -> Path:
    """Rename ``path`` to ``NAME.old-<UTC time>`` next to it (what ``--overwrite`` does; nothing is deleted)."""
    path = Path(path).expanduser()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    moved = path.with_name(f"{path.name}.old-{stamp}")
    n = 1
    while moved.exists():
        moved, n = path.with_name(f"{path.name}.old-{stamp}-{n}"), n + 1
    os.replace(path, moved)
    return moved


def prepare_eval_dir(output_dir: str | Path, *, overwrite: bool = False, checkpoint: str | Path | None = None,
                     main: bool | None = None) -> Path | None:
    """``robustkd eval --output-dir``, before any work: refuse the evaluated run's own folder (or one holding
    it), a folder holding a training run or another evaluation (its report and plots would be replaced;
    ``overwrite`` moves it aside instead), and one another live run is writing to; then lock it for this
    evaluation (released when the process ends). ``main``: this is the process that writes (default: ``RANK``
    unset or 0); the others only check. Returns where an old folder was moved, else None."""
    out = Path(output_dir).expanduser()
    if checkpoint is not None:
        ckpt = Path(checkpoint).expanduser().resolve()
        if out.resolve() == ckpt or out.resolve() in ckpt.parents:
            raise RunDirError(f"--output-dir {out} is the --checkpoint run {checkpoint} (or holds it): the evaluation's "
                              "report.json and plots would replace the run's own. Choose another --output-dir")
    if main is None:
        main = os.environ.get("RANK", "0") in ("", "0")
    if not main:
        check_writable(out)
        return None
    return prepare_output_dir(out, overwrite=overwrite, markers=_eval_markers(), resumable=False)


def _eval_markers() -> tuple[str, ...]:
    from .eval.schema import HTML_FILE, PLOT_FILES, REPORT_FILE

    return (REPORT_FILE, HTML_FILE, *PLOT_FILES.values())


@contextlib.contextmanager
def eval_dir_lock(output_dir: str | Path, main: bool = True) -> Iterator[None]:
    """Hold ``robustkd eval``'s ``--output-dir`` lock while the evaluation runs and writes (main process only):
    a second evaluation into the folder is refused naming this one's pid, and a report another run wrote
    there since :func:`prepare_eval_dir` checked it is not replaced."""
    if not main:
        yield
        return
    out = Path(output_dir).expanduser()
    with RunLock(out):
        found = run_markers(out, _eval_markers())
        if found:
            raise RunDirError(f"--output-dir {out} received another run's files while this evaluation started "
                              f"({', '.join(found)}): choose a new --output-dir")
        yield


# -- the run lock: one run writes to a folder at a time ------------------------------------------------
LOCK_FILE = ".robustkd.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return False
    return True


def lock_holder(path: str | Path) -> dict[str, Any] | None:
    """Who holds the run lock of ``path`` (``pid``, ``host``, ``started``, ``command``), or None when nobody
    does. A lock left by a process that no longer runs on this machine is stale (None); so is one this very
    process holds (a run in it that stopped without releasing it)."""
    lock = Path(path).expanduser() / LOCK_FILE
    try:
        info = json.loads(lock.read_text())
        pid = int(info["pid"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return {"pid": "?", "host": "?", "started": "?", "command": f"unreadable {LOCK_FILE}"}
    if info.get("host") == socket.gethostname() and (pid == os.getpid() or not _alive(pid)):
        return None
    return info


def check_unlocked(path: str | Path, what: str = "--output-dir") -> None:
    """Refuse ``path`` while another live run holds its lock, naming that run's process."""
    holder = lock_holder(path)
    if holder is not None:
        path = Path(path).expanduser()
        raise RunDirError(f"{what} {path} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}, "
                          f"started {holder.get('started')}: {str(holder.get('command', ''))[:120]}): wait for it to "
                          f"finish or choose another {what}; if that process is gone, delete {path / LOCK_FILE}")


class RunLock:
    """The lock of a run folder, held while a run writes to it: ``LOCK_FILE`` in the folder, created
    exclusively, holding this process's id, host, start time and command line. A second run into the
    folder is refused (:func:`check_unlocked`, :func:`prepare_output_dir`) naming the holder's pid. A
    lock whose process is gone is taken over. Use as a context manager, or :meth:`acquire` /
    :meth:`release` (released at interpreter exit too)::

        with RunLock(output_dir):
            ...  # write the run
    """

    def __init__(self, path: str | Path, what: str = "--output-dir"):
        self.path, self.what = Path(path).expanduser(), what
        self.file = self.path / LOCK_FILE
        self.held = False

    def acquire(self) -> RunLock:
        if self.held:
            return self
        self.created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime()), "command": " ".join(sys.argv)}
        for _ in range(2):
            try:
                fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                check_unlocked(self.path, self.what)  # raises while a live run holds it
                self.file.unlink(missing_ok=True)  # stale, or ours: take it over
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(info))
            self.held = True
            atexit.register(self.release)
            return self
        check_unlocked(self.path, self.what)
        raise RunDirError(f"could not lock {self.what} {self.path}: {self.file} keeps reappearing; choose another {self.what}")

    def release(self) -> None:
        """Remove the lock if this process still holds it (a run moved aside takes its lock file along)."""
        if not self.held:
            return
        self.held = False
        atexit.unregister(self.release)
        try:
            if json.loads(self.file.read_text()).get("pid") == os.getpid():
                self.file.unlink()
            if getattr(self, "created", False) and not any(self.path.iterdir()):
                self.path.rmdir()  # a folder made only for the lock: nothing was written, leave nothing behind
        except (OSError, ValueError):
            pass

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def hold_run_lock(path: str | Path, what: str = "--output-dir") -> RunLock:
    """Lock ``path`` for this run (created when missing) until :meth:`RunLock.release` or the process exits;
    :class:`RunDirError` naming the holder's pid when another live run holds it."""
    return RunLock(path, what).acquire()


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


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def disk_cause(path: str | Path) -> str:
    """Why a write under ``path`` failed when the library gave no errno (torch: "iostream error")."""
    base = _nearest_existing(Path(path))
    if shutil.disk_usage(base).free < 2**20:
        return f"no space left on the device holding {base}"
    if not os.access(base, os.W_OK):
        return f"{base} is read-only"
    return "the write failed"


def as_os_error(exc: BaseException, path: str | Path | None = None) -> OSError | None:
    """``exc`` as the ``OSError`` of a failed write under ``path``, or None when it is no write failure: an
    ``OSError`` itself, safetensors' ``SafetensorError`` ("I/O error: No space left on device (os error 28)"),
    or torch's ``RuntimeError`` of a failed file write ("... iostream error", "... file write failed"). Without
    an errno the cause is read from the disk (:func:`disk_cause`)."""
    if isinstance(exc, OSError):
        return exc
    text = (str(exc).splitlines() or [type(exc).__name__])[0]
    safetensors = type(exc).__name__ == "SafetensorError"
    if safetensors and (m := _OS_ERROR.search(text)):
        return OSError(int(m.group(1)), os.strerror(int(m.group(1))))
    if safetensors or (isinstance(exc, RuntimeError) and ("write" in text.lower() or "iostream" in text)):
        cause = disk_cause(path) if path is not None else "the write failed"
        return OSError(0, f"{cause} ({text[:100]})")
    return None


def failed_write(path: str | Path, exc: BaseException, intact: str | Path | None = None) -> WriteFailedError:
    """The one-line :class:`WriteFailedError` for ``exc`` raised while writing ``path``, naming what is still
    intact; re-raises ``exc`` when it is not a failed write. For ``except WRITE_ERRORS as exc: raise
    failed_write(path, exc, last_checkpoint) from exc``."""
    os_error = as_os_error(exc, path)
    if os_error is None:
        raise exc
    return write_failed(path, os_error, intact)


def _write_errors() -> tuple[type[BaseException], ...]:
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors is a dependency
        return (OSError, RuntimeError)
    return (OSError, RuntimeError, SafetensorError)


#: What a failed write of weights or checkpoints raises (disk full, read-only, quota): catch these and
#: turn them into one line with :func:`failed_write`.
WRITE_ERRORS = _write_errors()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temporary file and ``os.replace`` so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def marked_block(doc: str | Path, begin: str, end: str, what: str,
                 error: type[Exception] = ValueError) -> tuple[str, str]:
    """(text before ``begin``, text after ``end``) of a page with one generated block between the two
    marker lines; ``error`` naming the fix (``what`` says what the block holds) when there is none."""
    doc = Path(doc)
    if not doc.is_file():
        raise FileNotFoundError(f"--update-doc: no document at {doc}")
    text = doc.read_text()
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise error(f"--update-doc: {doc} needs one '{begin}' line and one '{end}' line after it, around {what}")
    head, rest = text.split(begin, 1)
    return head, rest.split(end, 1)[1]


def replace_marked_block(doc: str | Path, begin: str, end: str, markdown: str, what: str,
                         error: type[Exception] = ValueError) -> Path:
    """Replace the generated block of ``doc`` (see :func:`marked_block`) with ``markdown``, written via
    :func:`atomic_write_text`: the page's figures are regenerated, never retyped, and the rest stays."""
    head, tail = marked_block(doc, begin, end, what, error)
    atomic_write_text(Path(doc), f"{head}{begin}\n{markdown.strip()}\n{end}{tail}")
    return Path(doc)


def save_model_dir(out_dir: str | Path, student: nn.Module, ema: nn.Module | None, meta: dict[str, Any]) -> None:
    """The final weights and ``robustkd.json``, each written to a temporary file renamed into place. A failed
    write (disk full, ...) raises ``OSError`` naming the file, whatever the writer raised (safetensors raises
    its own ``SafetensorError``), and leaves no partial file behind."""
    from safetensors.torch import save_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for which, model in (("student", student), ("ema", ema)):
        if model is not None:
            tmp = out / (WEIGHT_FILES[which] + ".tmp")
            try:
                save_model(model, str(tmp))
            except WRITE_ERRORS as exc:
                tmp.unlink(missing_ok=True)
                os_error = as_os_error(exc, tmp)
                if os_error is None:
                    raise
                raise OSError(os_error.errno or 0, os_error.strerror or str(os_error), str(tmp)) from exc
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


# -- evaluating an unfinished run: its training checkpoints ---------------------------------------
RUN_CONFIG_FILE = "run_config.json"


def training_checkpoint(path: str | Path) -> Path | None:
    """The training checkpoint ``robustkd eval --checkpoint PATH`` should read, or None for final weights:
    PATH itself when it is one (``RUN/checkpoints/epoch-N``), the latest one when PATH is a run folder
    without final weights (the run has not finished, or was stopped)."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / RUN_CONFIG_FILE).exists() and path.parent.name == "checkpoints":
        for f in sorted(path.iterdir()):
            if f.is_file() and f.suffix in (".safetensors", ".bin"):
                check_weight_file(f)
        return path
    if path.is_dir() and not any((path / f).exists() for f in WEIGHT_FILES.values()):
        root = path / "checkpoints"
        if root.is_dir():
            latest = read_latest(root)
            if latest is not None:
                return latest
            raise FileNotFoundError(f"{path} has no final weights and {root} no `latest` checkpoint: pass one of "
                                    f"{sorted(p.name for p in root.glob('epoch-*')) or 'its checkpoints'} as "
                                    f"--checkpoint {root}/epoch-N")
    return None


def checkpoint_meta(ckpt: str | Path) -> dict[str, Any]:
    """What a training checkpoint records about its run (task, model, data, method; ``epoch``: the epochs
    it had completed, from its folder name)."""
    ckpt = Path(ckpt)
    try:
        meta = json.loads((ckpt / RUN_CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{ckpt / RUN_CONFIG_FILE} is missing or corrupt ({exc}): this checkpoint cannot be "
                              "evaluated; pass another RUN/checkpoints/epoch-N") from exc
    name = ckpt.name
    meta["checkpoint_epoch"] = int(name.split("-", 1)[1]) if name.startswith("epoch-") and name[6:].isdigit() else None
    return meta


def _checkpoint_objects(ckpt: Path) -> list[dict[str, Any]]:
    """The objects a training checkpoint registered (scheduler, counters, method, EMA), read with
    ``torch.load(weights_only=True)``: tensors and plain containers only, no code is run."""
    import torch

    out = []
    for f in sorted(ckpt.glob("custom_checkpoint_*.pkl"), key=lambda p: int(p.stem.rsplit("_", 1)[1])):
        try:
            obj = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file: one line, whatever the cause
            raise CheckpointError(f"{f} cannot be read ({str(exc).splitlines()[0][:120]}): pass another "
                                  "RUN/checkpoints/epoch-N") from exc
        out.append(obj if isinstance(obj, dict) else {})
    return out


def load_training_checkpoint(ckpt: str | Path, task: Task, which: Literal["auto", "student", "ema"] = "auto"
                             ) -> tuple[nn.Module, str, list[dict[str, Any]] | None]:
    """(model, which weights were taken, the run's per-epoch history up to this checkpoint) from a training
    checkpoint; ``auto`` takes the EMA copy when the run kept one, like a finished run's folder."""
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    meta = checkpoint_meta(ckpt)
    if meta.get("num_classes") != task.num_classes:
        raise ValueError(f"the checkpoint {ckpt} has {meta.get('num_classes')} classes ({meta.get('task')}) but the "
                         f"task {task.name!r} has {task.num_classes}: use a checkpoint trained on this task.")
    objects = _checkpoint_objects(ckpt)
    ema = next((o for o in objects if {"model", "num_updates", "decay"} <= set(o)), None)
    counters = next((o for o in objects if {"epoch", "step", "history"} <= set(o)), None)
    if which == "auto":
        which = "ema" if ema is not None else "student"
    if which == "ema":
        if ema is None:
            raise FileNotFoundError(f"the checkpoint {ckpt} holds no EMA copy (the run kept none): pass --which student")
        state = ema["model"]
    else:
        weights = ckpt / "model.safetensors"
        if not weights.exists():
            raise FileNotFoundError(f"the checkpoint {ckpt} has no model.safetensors: pass another "
                                    "RUN/checkpoints/epoch-N")
        state = load_file(str(weights))
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state.items()}
    model = task.build_model(meta["model"], **meta.get("model_kwargs", {}))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"the weights in {ckpt} do not fit the model {meta['model']!r} built by task {task.name!r} "
                         f"(missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]})")
    history = None
    if counters is not None:
        try:
            rows = json.loads(counters["history"]) if isinstance(counters["history"], str) else counters["history"]
            history = [r for r in rows if meta["checkpoint_epoch"] is None or r.get("epoch", 0) <= meta["checkpoint_epoch"]]
        except (TypeError, ValueError):
            history = None
    return model.eval(), which, history
