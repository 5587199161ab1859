"""The trainer's output directory: the policy decided before any work, and its checkpoints.

:func:`preflight` refuses a bad output location, another run in ``--output-dir`` (without
``--resume``/``--overwrite``) or a checkpoint that cannot be resumed, and changes nothing on disk;
:func:`check_resume_config` compares a checkpoint's run config with the run asked to continue it;
:func:`claim_output_dir` moves an old run aside (``--overwrite``) on the main process.
:func:`write_checkpoint` writes ``checkpoints/NAME`` atomically and prunes the run's older ones
(:func:`prune_checkpoints`), :func:`load_checkpoint` loads one to resume, :func:`write_final` writes the
final weights.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from accelerate.logging import get_logger
from torch import nn

from .checkpoint import (
    WRITE_ERRORS,
    CheckpointError,
    RunDirError,
    atomic_write_text,
    check_writable,
    failed_write,
    prepare_output_dir,
    read_latest,
    run_markers,
    save_model_dir,
)

CHECKPOINT_DIR = "checkpoints"
logger = get_logger("robustkd.trainer")

#: Fields that must match to resume a checkpoint (others, e.g. eval settings or epochs, may change).
RESUME_KEYS = ("task", "model", "model_kwargs", "num_classes", "method", "batch_size", "optimizer", "grad_accum",
               "awp_gamma", "ema_decay", "ema_warmup", "max_train_samples", "seed")


class ConfigMismatchError(ValueError):
    """A checkpoint made with another configuration than the one asked to resume it."""


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def needed_bytes(model: nn.Module, config: Any) -> int:
    """Room for the run's files: ``keep_checkpoints + 1`` checkpoints (the new one is written before the
    old is pruned) plus one mid-epoch checkpoint, each the model, EMA and optimizer state, plus the final
    weights; 10 % margin."""
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    per_ckpt = size * (2 + (2 if config.optimizer == "adamw" else 1))
    extra = 1 if getattr(config, "save_every_steps", 0) else 0
    return int(1.1 * ((config.keep_checkpoints + 1 + extra) * per_ckpt + 2 * size))


def preflight(config: Any, need_bytes: int, now: Mapping[str, Any]) -> tuple[Path | None, str | None]:
    """``(the checkpoint to resume or None, the run id)``; raises before any work when the output
    directory cannot take this run. ``now``: this run's config as :func:`check_resume_config` compares it."""
    c = config
    if c.resume and c.overwrite:
        prepare_output_dir(c.output_dir, resume=True, overwrite=True)  # raises the one-line error
    check_writable(c.output_dir, need_bytes)
    if not c.resume:
        if run_markers(c.output_dir) and not c.overwrite:
            prepare_output_dir(c.output_dir)  # raises: the directory holds another run
        return None, new_run_id()
    ckpt = read_latest(Path(c.output_dir) / CHECKPOINT_DIR)
    if ckpt is None:
        if found := run_markers(c.output_dir):  # resuming "from scratch" would overwrite that run's files
            raise RunDirError(f"--output-dir {c.output_dir} holds a run ({', '.join(found)}) but no checkpoint to "
                              "resume: drop --resume and pass --overwrite to move it aside, or choose a new "
                              "--output-dir")
        return None, new_run_id()
    return ckpt, check_resume_config(ckpt, now).get("run_id")


def check_resume_config(ckpt: Path, now: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's run config; :class:`ConfigMismatchError` when a field of :data:`RESUME_KEYS` differs."""
    saved = json.loads((ckpt / "run_config.json").read_text())
    diffs = {k: (saved.get(k), now.get(k)) for k in RESUME_KEYS if _norm(saved.get(k)) != _norm(now.get(k))}
    if diffs:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diffs.items())
        raise ConfigMismatchError(f"the checkpoint {ckpt} was made with another configuration ({detail}). "
                                  "Resume with the same settings, or use a new --output-dir.")
    return saved


def claim_output_dir(accelerator: Any, config: Any, run_id: str | None, need_bytes: int) -> str | None:
    """Move an old run aside (``overwrite``) on the main process; returns the run id all processes share."""
    from accelerate.utils import broadcast_object_list

    if accelerator.is_main_process and not config.resume:
        moved = prepare_output_dir(config.output_dir, overwrite=config.overwrite, need_bytes=need_bytes)
        if moved is not None:
            logger.warning(f"moved the previous run in {config.output_dir} aside to {moved} (--overwrite)")
    ids = [run_id]
    if accelerator.num_processes > 1:
        broadcast_object_list(ids)
    accelerator.wait_for_everyone()
    return ids[0]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint ``checkpoints/latest`` names (unchecked), or None."""
    pointer = Path(output_dir) / CHECKPOINT_DIR / "latest"
    try:
        name = pointer.read_text().strip()
    except OSError:
        return None
    return pointer.parent / name if name else None


def write_checkpoint(accelerator: Any, output_dir: str | Path, name: str, run_config: Mapping[str, Any], *,
                     run_id: str | None, keep: int) -> Path:
    """``checkpoints/NAME`` (the accelerator's state and ``run_config.json``) via a temporary directory
    renamed into place; ``latest`` points to it; then :func:`prune_checkpoints` (``keep``). A failed
    write raises :class:`~robustkd.checkpoint.WriteFailedError` naming the checkpoint still intact."""
    acc = accelerator
    root = Path(output_dir) / CHECKPOINT_DIR
    final, tmp = root / name, root / f".tmp-{name}"
    previous = latest_checkpoint(output_dir)
    try:
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / "run_config.json").write_text(json.dumps(run_config, indent=2, default=str))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            atomic_write_text(root / "latest", final.name)
    except WRITE_ERRORS as exc:  # a full disk: OSError, torch's RuntimeError, safetensors' SafetensorError
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise failed_write(tmp, exc, previous) from exc
    if acc.is_main_process:
        prune_checkpoints(root, final, run_id, keep)
    acc.wait_for_everyone()
    return final


def prune_checkpoints(root: Path, newest: Path, run_id: str | None, keep: int) -> None:
    """Keep the newest ``keep`` epoch checkpoints *of this run* (``run_id``) and only its newest
    mid-epoch one, none once a newer checkpoint exists; never touch another run's."""
    def saved_run_id(p: Path) -> Any:
        try:
            return json.loads((p / "run_config.json").read_text()).get("run_id")
        except (OSError, ValueError):
            return "<unreadable>"

    def ours(pattern: str) -> list[Path]:
        found = [p for p in root.glob(pattern) if p.is_dir() and p != newest and saved_run_id(p) == run_id]
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    for old in ours("step-*"):
        shutil.rmtree(old, ignore_errors=True)
    if newest.name.startswith("epoch-"):
        for old in (ours("epoch-*") + [newest])[:-max(keep, 1)]:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(accelerator: Any, ckpt: Path, now: Mapping[str, Any]) -> None:
    """Load ``ckpt`` into the accelerator's registered objects; refuse one from another configuration
    (``now``, checked again: the config may have changed since :func:`preflight`) or one that does not fit."""
    check_resume_config(ckpt, now)
    try:
        accelerator.load_state(str(ckpt))
    except (RuntimeError, KeyError) as exc:  # shapes or keys that passed the config check but not the load
        raise CheckpointError(f"the checkpoint {ckpt} does not fit this run ({str(exc).strip().splitlines()[0][:160]}"
                              "): resume with the settings it was made with, or use a new --output-dir") from exc


def write_final(accelerator: Any, output_dir: str | Path, student: nn.Module, ema: nn.Module | None,
                meta: Mapping[str, Any]) -> None:
    """The final weights and ``robustkd.json`` (:func:`~robustkd.checkpoint.save_model_dir`), on the main
    process; a failed write names the last checkpoint, still intact."""
    acc = accelerator
    acc.wait_for_everyone()
    if acc.is_main_process:
        try:
            save_model_dir(output_dir, student, ema, dict(meta))
        except WRITE_ERRORS as exc:
            raise failed_write(output_dir, exc, latest_checkpoint(output_dir)) from exc
    acc.wait_for_everyone()


def _norm(value: Any) -> Any:
    """Compare configs as JSON sees them (tuples and lists alike; a missing model_kwargs is {})."""
    return json.loads(json.dumps(value, default=str)) if value not in (None, {}) else None


__all__ = ["CHECKPOINT_DIR", "RESUME_KEYS", "ConfigMismatchError", "check_resume_config", "claim_output_dir",
           "latest_checkpoint", "load_checkpoint", "needed_bytes", "preflight", "prune_checkpoints", "write_checkpoint",
           "write_final"]
