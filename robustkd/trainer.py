"""The one training loop, on Accelerate: one CPU, one GPU or many processes.

Per step: ``method.prepare`` (targets, teachers, attack) -> optional AWP -> ``method.loss`` ->
backward -> optimizer and LR-scheduler step -> EMA update -> ``method.after_step``. Per epoch:
evaluation every ``eval_every`` epochs, a line in ``metrics.jsonl``, and a checkpoint written
to a temporary directory and renamed into place, so a crash never leaves a corrupt "latest".
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from accelerate.logging import get_logger
from torch import nn

from .attacks.base import Attack, create_attack
from .awp import AWP
from .checkpoint import (CheckpointError, RunDirError, atomic_write_text, prepare_output_dir, read_latest,
                         save_model_dir, write_failed)
from .distill.methods import Method, Progress
from .eval.robustness import evaluate
from .task import Task
from .distributed import reduce_
from .teachers import EMATeacher, unwrap

CHECKPOINT_DIR = "checkpoints"
logger = get_logger(__name__)  # Accelerate's multi-process logger: main process only by default


def setting(default: Any = MISSING, help: str = "", *, group: str, factory: Any = None, flag: bool = True,
            flag_type: Any = None) -> Any:
    """A field of :class:`TrainConfig` with what its recipe flag needs: the help text, the ``--help``
    group, and (``flag_type``) the type the flag parses when it differs from the field's
    (``--milestones 100,150`` for a list). ``flag=False``: derived from other settings, not a flag."""
    metadata = {"help": help, "group": group, "flag": flag, "flag_type": flag_type}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


OPTIM, MODEL, THREAT, SPEED, RUN = ("optimisation", "model and method", "threat model and attacks",
                                    "speed (docs/performance.md)", "run")


@dataclass
class TrainConfig:
    """Everything about *how* to train (the method and the model say *what*).

    This is the one declaration of the trainer's settings: each field is also a recipe flag
    (``--grad-accum``), a key of a ``--config`` file and of a preset, with the help text declared
    here (``robustkd.config`` builds the flags from these fields). Recipes start from other
    defaults (e.g. 200 epochs) through their presets."""

    epochs: int = setting(1, "training epochs", group=OPTIM)
    batch_size: int = setting(128, "training batch size (per process)", group=OPTIM)
    eval_batch_size: int = setting(256, "evaluation batch size", group=OPTIM)
    drop_last: bool = setting(False, "drop the last partial training batch of each epoch (ADR's reference does)",
                              group=OPTIM)
    optimizer: Literal["sgd", "adamw"] = setting("sgd", "optimizer", group=OPTIM)
    lr: float = setting(0.1, "learning rate", group=OPTIM)
    momentum: float = setting(0.9, "SGD momentum", group=OPTIM)
    nesterov: bool = setting(False, "Nesterov momentum (ADR's reference SGD uses it; --nesterov false turns a "
                             "preset's off)", group=OPTIM)
    weight_decay: float = setting(5e-4, "weight decay", group=OPTIM)
    lr_schedule: Literal["multistep", "cosine", "constant"] = setting("multistep", "LR schedule", group=OPTIM)
    milestones: Optional[list[int]] = setting(None, "LR decay epochs, comma-separated (default: 50%%,75%% of "
                                              "--epochs)", group=OPTIM, flag_type=Optional[str])
    lr_gamma: float = setting(0.1, "LR factor at each milestone", group=OPTIM)
    lr_warmup_epochs: float = setting(0, "linear LR warm-up epochs before the schedule (fractions allowed: ADR "
                                      "uses 2.5)", group=OPTIM)
    lr_warmup_init: float = setting(0.0, "LR at the start of the warm-up (ADR's PreAct configs: 1e-6)", group=OPTIM)
    lr_min: float = setting(0.0, "the cosine schedule's final LR", group=OPTIM)
    grad_accum: int = setting(1, "gradient accumulation steps", group=OPTIM)
    max_grad_norm: Optional[float] = setting(None, "clip the gradient norm to this value before each optimizer "
                                             "step (off by default: no reference clips)", group=OPTIM)
    mixed_precision: Optional[Literal["no", "fp16", "bf16"]] = setting(
        None, "mixed precision (default: Accelerate's setting, e.g. accelerate launch --mixed_precision)", group=OPTIM)
    ema_decay: Optional[float] = setting(None, "keep an EMA (weight-averaged) model with this decay; methods that "
                                         "need one (ADR, MTARD's EMA teacher) use 0.995 when none is given; baselines "
                                         "keep none unless asked (WA: --ema-decay 0.995)", group=MODEL)
    ema_warmup: bool = setting(False, "ramp the EMA decay as timm does, min(decay, (1+t)/(10+t)), so short runs get "
                               "a useful teacher (not in ADR's reference)", group=MODEL)
    awp_gamma: Optional[float] = setting(None, "AWP's relative weight-perturbation size (on with --awp)",
                                         group=MODEL, flag=False)
    awp_warmup: int = setting(0, "epochs before AWP starts", group=MODEL)
    awp_style: Literal["adr", "wu2020"] = setting("adr", "AWP style: adr (every parameter, BN statistics from the "
                                                  "unperturbed pass, as ADR's reference) or wu2020 (weight matrices "
                                                  "only, as Wu et al.'s code)", group=MODEL)
    eval_every: int = setting(1, "evaluate every N epochs (0: only at the end)", group=RUN)
    eval_attacks: list[str] = setting(help="attacks evaluated every --eval-every epochs (specs: pgd20, "
                                      "pgd:steps=50, fgsm, autoattack, ...; ',' or ';' separated)", group=THREAT,
                                      factory=lambda: ["pgd20"], flag_type=str)
    max_train_samples: Optional[int] = setting(None, "train on a seeded random subset of this many examples",
                                               group="data")
    max_eval_samples: Optional[int] = setting(None, "evaluate on a seeded random subset of this many examples",
                                              group="data")
    seed: int = setting(0, "random seed: model initialisation, data order, augmentation, attack starts", group=RUN)
    output_dir: str = setting("runs/robustkd", "where the run writes its checkpoints, config.yaml and report.json",
                              group=RUN)
    resume: bool = setting(False, "continue from the last checkpoint in --output-dir", group=RUN)
    cpu: bool = setting(False, "force CPU even when a GPU is present", group=RUN)
    log_with: Optional[str] = setting(None, "log metrics to an Accelerate tracker: tensorboard (pip install -e "
                                      "'.[tensorboard]'; logs under --output-dir) or wandb (pip install -e '.[wandb]')",
                                      group=RUN)
    run_name: Optional[str] = setting(None, "the tracker run's name (default: the --output-dir's name)", group=RUN)
    tags: list[str] = setting(help="comma-separated tracker tags (wandb)", group=RUN, factory=list,
                              flag_type=Optional[str])
    progress: bool = setting(True, "progress bars (--no-progress hides them)", group=RUN, flag=False)
    keep_checkpoints: int = setting(1, "how many epoch checkpoints to keep (the newest)", group=RUN)
    eval_threat: Optional[dict[str, Any]] = setting(
        None, "the run's threat model (e.g. {'eps': 0.5, 'norm': 'l2'}): the budget of every per-epoch evaluation "
        "attack whose spec names none", group=THREAT, flag=False)
    compile: bool = setting(False, "torch.compile the student (the model the attack and the update both use); the "
                            "first steps compile (minutes on a CPU)", group=SPEED)
    channels_last: bool = setting(False, "channels-last (NHWC) memory format for the models and image batches (a "
                                  "GPU mode)", group=SPEED)
    tf32: bool = setting(False, "TF32 matmuls and convolutions on Ampere+ GPUs (no effect elsewhere)", group=SPEED)
    num_workers: int = setting(0, "data-loader worker processes", group=SPEED)
    pin_memory: bool = setting(False, "page-locked batches, copied to the GPU without blocking", group=SPEED)
    overwrite: bool = setting(False, "--output-dir holds another run: move it aside to NAME.old-<time> (never "
                              "deleted) and start afresh", group=RUN)
    max_nonfinite_steps: int = setting(0, "skip up to N steps whose loss is not finite (normal with fp16); 0: stop "
                                       "at the first, keeping the last good checkpoint", group=RUN)

    def resolved_milestones(self) -> list[int]:
        """LR decay epochs; the default (50 % and 75 % of the run) skips epoch 0 so short runs keep their LR."""
        if self.milestones is not None:
            return list(self.milestones)
        return [m for m in (self.epochs // 2, (3 * self.epochs) // 4) if m > 0]


class ConfigMismatchError(ValueError):
    """A checkpoint made with another configuration than the one asked to resume it."""


class DivergenceError(ValueError):
    """Training produced a non-finite loss or parameter; the last good checkpoint is kept, nothing final written."""


NONFINITE_CHECK_EVERY = 10  # micro-steps between host checks of the on-device non-finite flag (no per-step sync)


@dataclass
class _TrainState:
    """Loop counters and history: saved with every checkpoint."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    history: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "history": json.dumps(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = json.loads(state["history"])


# Fields that must match to resume a checkpoint (others, e.g. eval settings or epochs, may change).
_RESUME_KEYS = ("task", "model", "model_kwargs", "num_classes", "method", "batch_size", "optimizer", "grad_accum", "awp_gamma",
                "ema_decay", "ema_warmup", "max_train_samples", "seed")


class Trainer:
    """Fit ``model`` on ``task`` with ``method``; ``fit()`` trains, evaluates, checkpoints."""

    def __init__(self, task: Task, model: nn.Module, method: Method, config: TrainConfig,
                 run_info: dict[str, Any] | None = None):
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, set_seed

        self.task, self.method, self.config = task, method, config
        self.run_info = dict(run_info or {})
        self.output_dir = Path(config.output_dir)
        self._resume_from = self._preflight(model)  # output dir and resume checks: before any work
        if config.awp_gamma is not None and config.grad_accum > 1:
            raise ValueError("AWP perturbs the weights once per optimizer step and cannot be combined with "
                             "gradient accumulation: use --grad-accum 1 or drop --awp")
        check_trackers(config.log_with)
        self.accelerator = Accelerator(
            cpu=config.cpu or not torch.cuda.is_available(), mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.grad_accum, log_with=config.log_with,
            project_dir=config.output_dir,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=config.pin_memory))
        set_seed(config.seed)
        acc = self.accelerator
        _set_tf32(config.tf32, acc.device)
        loader_options = {"num_workers": config.num_workers, "pin_memory": config.pin_memory}
        self._claim_output_dir(model)
        self.train_loader = task.dataloader("train", config.batch_size, max_samples=config.max_train_samples,
                                            seed=config.seed, drop_last=config.drop_last, **loader_options)
        self.eval_loader = task.dataloader("test", config.eval_batch_size, max_samples=config.max_eval_samples,
                                           seed=config.seed, shuffle=False, **loader_options)
        if len(self.train_loader) == 0:
            raise ValueError("the training split is empty: check --data-dir and --max-train-samples")
        self._validate(model)
        if config.channels_last:  # before the optimizer and the EMA copy: both see the same tensors
            model = model.to(memory_format=torch.channels_last)
        self.optimizer = self._make_optimizer(model)
        decay = config.ema_decay if config.ema_decay is not None else (0.995 if method.needs_ema else None)
        self.ema = EMATeacher(model, decay, warmup=config.ema_warmup) if decay is not None else None
        self.awp = AWP(config.awp_gamma, config.awp_warmup, style=config.awp_style) \
            if config.awp_gamma is not None else None
        self.model, self.optimizer, self.train_loader, self.eval_loader = acc.prepare(
            model, self.optimizer, self.train_loader, self.eval_loader)
        if config.compile:  # in place (nn.Module.compile): same module, same state-dict names for EMA and saving
            unwrap(self.model).compile()
        if self.ema is not None:
            self.ema.to(acc.device)
        self.method.setup(self.model, self.ema)
        for teacher in getattr(self.method, "teachers", []):
            teacher.to(acc.device)
            if config.channels_last:
                teacher.model.to(memory_format=torch.channels_last)
        self.steps_per_epoch = math.ceil(len(self.train_loader) / config.grad_accum)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.scheduler = self._make_scheduler()
        self.state = _TrainState()
        self._reset_nonfinite()
        # Accelerate needs only state_dict/load_state_dict, which the method, EMA and counters all have
        for obj in (self.scheduler, self.state, self.method) + ((self.ema,) if self.ema else ()):
            acc.register_for_checkpointing(obj)
        self.eval_attacks = {spec: create_attack(spec, task, **(config.eval_threat or {})) for spec in config.eval_attacks}

    # -- setup helpers ------------------------------------------------------------------
    def _needed_bytes(self, model: nn.Module) -> int:
        """Room for the run's files: ``keep_checkpoints + 1`` checkpoints (the new one is written before the
        old is pruned), each the model, EMA and optimizer state, plus the final weights; 10 % margin."""
        size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        per_ckpt = size * (2 + (2 if self.config.optimizer == "adamw" else 1))
        return int(1.1 * ((self.config.keep_checkpoints + 1) * per_ckpt + 2 * size))

    def _preflight(self, model: nn.Module) -> Path | None:
        """Refuse a bad output location, another run in ``output_dir`` (without ``resume``/``overwrite``),
        or a checkpoint that cannot be resumed; returns the checkpoint to resume. Changes nothing on disk."""
        c = self.config
        if c.resume and c.overwrite:
            prepare_output_dir(c.output_dir, resume=True, overwrite=True)  # raises the one-line error
        from .checkpoint import check_writable, run_markers

        check_writable(c.output_dir, self._needed_bytes(model))
        if not c.resume:
            if run_markers(c.output_dir) and not c.overwrite:
                prepare_output_dir(c.output_dir)  # raises: the directory holds another run
            self.run_id: str | None = uuid.uuid4().hex[:12]
            return None
        ckpt = read_latest(self.output_dir / CHECKPOINT_DIR)
        if ckpt is None:
            if found := run_markers(c.output_dir):  # resuming "from scratch" would overwrite that run's files
                raise RunDirError(f"--output-dir {c.output_dir} holds a run ({', '.join(found)}) but no checkpoint to "
                                  "resume: drop --resume and pass --overwrite to move it aside, or choose a new "
                                  "--output-dir")
            self.run_id = uuid.uuid4().hex[:12]
            return None
        self.run_id = self._check_resume_config(ckpt).get("run_id")
        return ckpt

    def _check_resume_config(self, ckpt: Path) -> dict[str, Any]:
        """The checkpoint's run config; :class:`ConfigMismatchError` when a field of ``_RESUME_KEYS`` differs."""
        saved = json.loads((ckpt / "run_config.json").read_text())
        now = {**self.run_info, "task": self.task.name, "num_classes": self.task.num_classes,
               "method": self.method.name, **asdict(self.config)}
        diffs = {k: (saved.get(k), now.get(k)) for k in _RESUME_KEYS if _norm(saved.get(k)) != _norm(now.get(k))}
        if diffs:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diffs.items())
            raise ConfigMismatchError(f"the checkpoint {ckpt} was made with another configuration ({detail}). "
                                      "Resume with the same settings, or use a new --output-dir.")
        return saved

    def _claim_output_dir(self, model: nn.Module) -> None:
        """Move an old run aside (``overwrite``) on the main process; share one run id across processes."""
        from accelerate.utils import broadcast_object_list

        acc, c = self.accelerator, self.config
        if acc.is_main_process and not c.resume:
            moved = prepare_output_dir(c.output_dir, overwrite=c.overwrite, need_bytes=self._needed_bytes(model))
            if moved is not None:
                logger.warning(f"moved the previous run in {c.output_dir} aside to {moved} (--overwrite)")
        ids = [self.run_id]
        if acc.num_processes > 1:
            broadcast_object_list(ids)
        self.run_id = ids[0]
        acc.wait_for_everyone()

    def _validate(self, model: nn.Module) -> None:
        """Check data and model against the task on one batch of each split, before any work."""
        for loader in (self.train_loader, self.eval_loader):
            batch = next(iter(loader))
            self.task.validate_batch(batch)
        self.task.check_model(model.eval(), batch)
        model.train()

    def _make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        c = self.config
        if c.optimizer == "sgd":
            return torch.optim.SGD(model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
                                   nesterov=c.nesterov)
        if c.nesterov:
            raise ValueError(f"nesterov applies to the SGD optimizer only, not {c.optimizer!r}: drop --nesterov")
        if c.optimizer == "adamw":
            return torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        raise ValueError(f"unknown optimizer {c.optimizer!r}: use 'sgd' or 'adamw'")

    def _make_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        """Per-iteration schedulers (stepped once per optimizer step); see :func:`lr_factor`."""
        c = self.config
        if c.lr_schedule not in ("multistep", "cosine", "constant"):
            raise ValueError(f"unknown LR schedule {c.lr_schedule!r}: use multistep, cosine or constant")
        if c.lr_warmup_epochs < 0 or c.lr_warmup_init < 0 or c.lr_min < 0:
            raise ValueError("lr_warmup_epochs, lr_warmup_init and lr_min must be >= 0")
        milestones = [m * self.steps_per_epoch for m in c.resolved_milestones()]
        warmup = int(c.lr_warmup_epochs * self.steps_per_epoch)
        if c.lr_schedule == "multistep" and not warmup:
            return torch.optim.lr_scheduler.MultiStepLR(self.optimizer, milestones, gamma=c.lr_gamma)
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda k: lr_factor(
            k, c.lr_schedule, lr=c.lr, total=max(self.total_steps, 1), milestones=milestones, gamma=c.lr_gamma,
            warmup=warmup, warmup_init=c.lr_warmup_init, lr_min=c.lr_min))

    def progress(self) -> Progress:
        milestones = [m * self.steps_per_epoch for m in self.config.resolved_milestones()] \
            if self.config.lr_schedule == "multistep" else []
        passed = sum(self.state.step >= m for m in milestones)
        return Progress(self.state.step, self.total_steps, self.state.epoch, passed)

    # -- the step -----------------------------------------------------------------------
    def train_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """One micro-batch: attack, loss, backward; optimizer step at accumulation boundaries."""
        acc, method, model = self.accelerator, self.method, self.model
        batch = self._on_device(batch)
        progress = self.progress()
        victim = unwrap(model)
        # the attack sets and restores the victim's mode; it and the teachers run in the run's precision
        with acc.autocast():
            prepared = method.prepare(victim, batch, progress)
        v = None
        if self.awp is not None and self.awp.active(self.state.epoch):
            v = self.awp.compute(victim, lambda m: method.loss(m, batch, prepared, progress)[0])
            self.awp.perturb(victim, v)
        with acc.accumulate(model):
            loss, logs = method.loss(model, batch, prepared, progress)
            if self._loss_ok(loss):  # False only for a skipped step under --max-nonfinite-steps
                acc.backward(loss)
                if v is not None and self.awp.restores_before_step:  # the gradient at w + v updates w
                    self.awp.restore(victim, v)
                if self.config.max_grad_norm is not None and acc.sync_gradients:
                    acc.clip_grad_norm_(model.parameters(), self.config.max_grad_norm)
                self.optimizer.step()
            else:
                if v is not None and self.awp.restores_before_step:
                    self.awp.restore(victim, v)
                logs = {**logs, "skipped": True}
            self.optimizer.zero_grad(set_to_none=True)
        if v is not None and not self.awp.restores_before_step:
            self.awp.restore(victim, v)
        if acc.sync_gradients:
            self.scheduler.step()
            self.state.step += 1
            if self.ema is not None:
                self.ema.update(model)
            method.after_step(model, self.progress())
        return logs

    def _on_device(self, batch: dict) -> dict:
        """The task's batched augmentation, on the device the batch is on; 4-D float tensors in
        channels-last format when that mode is on."""
        batch = self.task.augment_batch(batch)
        if self.config.channels_last:
            batch = {k: v.contiguous(memory_format=torch.channels_last)
                     if isinstance(v, torch.Tensor) and v.dim() == 4 and v.is_floating_point() else v
                     for k, v in batch.items()}
        return batch

    # -- the loop -----------------------------------------------------------------------
    def fit(self) -> list[dict[str, Any]]:
        """Train for ``config.epochs`` (continuing from the last checkpoint with ``resume``)."""
        from tqdm.auto import tqdm

        acc, c = self.accelerator, self.config
        if c.resume:
            self.resume()
        metrics = self.output_dir / "metrics.jsonl"
        if acc.is_main_process:
            try:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                # this run's rows only: a resumed run restarts from the checkpoint's history (no duplicates)
                atomic_write_text(metrics, "".join(json.dumps(r) + "\n" for r in self.state.history))
            except OSError as exc:
                raise write_failed(metrics, exc) from exc
        self._reset_nonfinite()
        if c.log_with:
            name = c.run_name or self.output_dir.name
            acc.init_trackers(name, config=_flat_config(self.run_config()),
                              init_kwargs={"wandb": {"name": name, "tags": list(c.tags)}})
        for epoch in range(self.state.epoch, c.epochs):
            if hasattr(self.train_loader, "set_epoch"):
                self.train_loader.set_epoch(epoch)
            self.model.train()
            started, loss_sum, n = time.perf_counter(), torch.zeros((), device=acc.device), 0
            bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{c.epochs}", leave=False,
                       disable=not (c.progress and acc.is_local_main_process))
            for i, batch in enumerate(bar):
                logs = self.train_step(batch)
                if not logs.get("skipped", False):
                    loss_sum += logs["loss"].float()
                    n += 1
                if i % NONFINITE_CHECK_EVERY == 0:
                    self.check_finite(epoch)  # one host sync every NONFINITE_CHECK_EVERY steps
                if i % 10 == 0 and not bar.disable:  # a host sync: only when the bar is shown
                    bar.set_postfix(loss=f"{float(logs['loss']):.4f}")
            self.check_finite(epoch, parameters=True)
            record: dict[str, Any] = {"epoch": epoch + 1, "step": self.state.step,
                                      "lr": self.optimizer.param_groups[0]["lr"],
                                      "train_loss": float(acc.reduce(loss_sum, "mean")) / max(n, 1),
                                      "epoch_seconds": time.perf_counter() - started,
                                      **self.method.log_values(self.progress())}
            self.state.epoch = epoch + 1
            # batch-norm statistics drift apart per process: make them identical before eval/checkpoint
            reduce_([b for b in unwrap(self.model).buffers() if b.is_floating_point()])
            if c.eval_every and ((epoch + 1) % c.eval_every == 0 or epoch + 1 == c.epochs):
                record.update(self.evaluate_all(prefix_ema="ema_"))
            record["run_id"] = self.run_id
            self.state.history.append(record)
            if acc.is_main_process:
                try:
                    with open(metrics, "a") as f:
                        f.write(json.dumps(record) + "\n")
                except OSError as exc:
                    raise write_failed(metrics, exc, self._latest_checkpoint()) from exc
                logger.info(_summary_line(record))
            if c.log_with:
                acc.log({k: v for k, v in _flat_config(record).items() if isinstance(v, (int, float))}, step=epoch + 1)
            self.save_checkpoint()
        self.save_final()
        if c.log_with:
            acc.end_training()
        return self.state.history

    # -- divergence ---------------------------------------------------------------------
    def _reset_nonfinite(self) -> None:
        device = self.accelerator.device
        self._nonfinite = torch.zeros((), dtype=torch.long, device=device)  # non-finite losses since the start
        self._first_bad = torch.full((), -1, dtype=torch.long, device=device)  # 1-based step of the first
        self._skipped = 0  # steps skipped under max_nonfinite_steps

    def _loss_ok(self, loss: torch.Tensor) -> bool:
        """Record a non-finite loss on the device (no host sync); with ``max_nonfinite_steps`` > 0 sync
        once per step to skip such a step, and stop after more than that many."""
        bad = ~torch.isfinite(loss.detach()).all()
        self._nonfinite += bad
        self._first_bad = torch.where(bad & (self._first_bad < 0), self.state.step + 1, self._first_bad)
        if self.config.max_nonfinite_steps <= 0:
            return True
        if self.accelerator.num_processes > 1:  # every process must skip the same steps (DDP's all-reduce)
            bad = self.accelerator.reduce(bad.float(), "sum") > 0
        if not bool(bad):
            return True
        self._skipped += 1
        if self._skipped > self.config.max_nonfinite_steps:
            raise self._divergence(f"the loss was non-finite in {self._skipped} steps (more than "
                                   f"--max-nonfinite-steps {self.config.max_nonfinite_steps}), the last at step "
                                   f"{self.state.step + 1}")
        return False

    def check_finite(self, epoch: int, parameters: bool = False) -> None:
        """Raise :class:`DivergenceError` when a loss since the last check (or, with ``parameters``, a
        weight) is non-finite. One host sync; called every few steps and before every evaluation/checkpoint."""
        count = self._nonfinite
        if self.accelerator.num_processes > 1:  # all processes stop together, or none does
            count = self.accelerator.reduce(count.clone(), "sum")
        if self.config.max_nonfinite_steps <= 0 and int(count) > 0:
            raise self._divergence(f"the loss became non-finite at step {int(self._first_bad)} (epoch {epoch + 1})")
        if parameters:
            params = [p.detach() for p in unwrap(self.model).parameters()]
            if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
                raise self._divergence(f"the weights became non-finite by step {self.state.step} (epoch {epoch + 1})")

    def _divergence(self, what: str) -> DivergenceError:
        c = self.config
        latest = self._latest_checkpoint()
        kept = f"the last good checkpoint {latest} is kept" if latest else "no checkpoint had been written yet"
        return DivergenceError(
            f"training diverged: {what}. Likely cause: the learning rate is too high (--lr {c.lr:g}); lower it, "
            f"clip gradients (--max-grad-norm), or with mixed precision allow skipped steps "
            f"(--max-nonfinite-steps N). {kept[0].upper() + kept[1:]}; no final weights or report were written.")

    def _latest_checkpoint(self) -> Path | None:
        pointer = self.output_dir / CHECKPOINT_DIR / "latest"
        try:
            name = pointer.read_text().strip()
        except OSError:
            return None
        return pointer.parent / name if name else None

    def evaluate_all(self, attacks: dict[str, Attack] | None = None, prefix_ema: str = "ema_") -> dict[str, Any]:
        """Clean and robust accuracy of the student and, when kept, the EMA model."""
        attacks = self.eval_attacks if attacks is None else attacks
        out = evaluate(self.task, unwrap(self.model), self.eval_loader, attacks, accelerator=self.accelerator)
        if self.ema is not None:
            ema = evaluate(self.task, self.ema.model, self.eval_loader, attacks, accelerator=self.accelerator)
            out.update({f"{prefix_ema}{k}": v for k, v in ema.items()})
        self.model.train()
        return out

    # -- checkpoints ----------------------------------------------------------------------
    def run_config(self) -> dict[str, Any]:
        return {**self.run_info, "run_id": self.run_id, "task": self.task.name, "num_classes": self.task.num_classes,
                "method": self.method.name, "method_config": self.method.describe(), **asdict(self.config)}

    def save_checkpoint(self) -> Path:
        """``checkpoints/epoch-N`` via a temporary directory renamed into place; ``latest`` points to it."""
        acc = self.accelerator
        root = self.output_dir / CHECKPOINT_DIR
        final = root / f"epoch-{self.state.epoch}"
        tmp = root / f".tmp-epoch-{self.state.epoch}"
        previous = self._latest_checkpoint()
        try:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            acc.wait_for_everyone()
            acc.save_state(str(tmp), safe_serialization=True)
            acc.wait_for_everyone()
            if acc.is_main_process:
                (tmp / "run_config.json").write_text(json.dumps(self.run_config(), indent=2, default=str))
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
                atomic_write_text(root / "latest", final.name)
        except (OSError, RuntimeError) as exc:  # torch reports a full disk as RuntimeError (iostream error)
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, RuntimeError) and "write" not in str(exc).lower() and "iostream" not in str(exc):
                raise
            if not isinstance(exc, OSError):
                exc = OSError(0, f"{_disk_cause(tmp)} ({str(exc).splitlines()[0][:100]})")
            raise write_failed(tmp, exc, previous) from exc
        if acc.is_main_process:
            self._prune(root, final)
        acc.wait_for_everyone()
        return final

    def _prune(self, root: Path, newest: Path) -> None:
        """Keep the newest ``keep_checkpoints`` checkpoints *of this run* (its run id); never touch others."""
        def run_id(p: Path) -> Any:
            try:
                return json.loads((p / "run_config.json").read_text()).get("run_id")
            except (OSError, ValueError):
                return "<unreadable>"

        ours = [p for p in root.glob("epoch-*") if p.is_dir() and p != newest and run_id(p) == self.run_id]
        ours = sorted(ours, key=lambda p: int(p.name.split("-")[1])) + [newest]
        for old in ours[:-max(self.config.keep_checkpoints, 1)]:
            shutil.rmtree(old, ignore_errors=True)

    def resume(self) -> bool:
        """Load the latest checkpoint under ``output_dir`` (if any); refuse one from another configuration."""
        ckpt = self._resume_from
        if ckpt is None:
            logger.info(f"no checkpoint under {self.output_dir}: starting from scratch")
            return False
        self._check_resume_config(ckpt)  # again: the config may have been changed since __init__
        try:
            self.accelerator.load_state(str(ckpt))
        except (RuntimeError, KeyError) as exc:  # shapes or keys that passed the config check but not the load
            raise CheckpointError(f"the checkpoint {ckpt} does not fit this run ({str(exc).strip().splitlines()[0][:160]}"
                                  "): resume with the settings it was made with, or use a new --output-dir") from exc
        logger.info(f"resumed from {ckpt} (epoch {self.state.epoch}, step {self.state.step})")
        return True

    def save_final(self) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            meta = {**self.run_info, "run_id": self.run_id, "task": self.task.name,
                    "num_classes": self.task.num_classes, "method": self.method.name, "epochs": self.state.epoch}
            try:
                save_model_dir(self.output_dir, unwrap(self.model), self.ema.model if self.ema else None, meta)
            except (OSError, RuntimeError) as exc:
                if not isinstance(exc, OSError):
                    exc = OSError(0, f"{_disk_cause(self.output_dir)} ({str(exc).splitlines()[0][:100]})")
                raise write_failed(self.output_dir, exc, self._latest_checkpoint()) from exc
        acc.wait_for_everyone()


def _norm(value: Any) -> Any:
    """Compare configs as JSON sees them (tuples and lists alike; a missing model_kwargs is {})."""
    return json.loads(json.dumps(value, default=str)) if value not in (None, {}) else None


def _disk_cause(path: Path) -> str:
    """Name why a write failed when the library gave no errno (torch: "iostream error")."""
    from .checkpoint import _nearest_existing

    base = _nearest_existing(path)
    if shutil.disk_usage(base).free < 2**20:
        return f"no space left on the device holding {base}"
    if not os.access(base, os.W_OK):
        return f"{base} is read-only"
    return "the write failed"


def _set_tf32(enabled: bool, device: torch.device) -> None:
    """TF32 for float32 matmuls and cuDNN convolutions on Ampere+ GPUs; a no-op elsewhere."""
    if not enabled or device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 8:
        return
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"


def _flat_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_config(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out


def _summary_line(record: dict[str, Any]) -> str:
    parts = [f"epoch {record['epoch']}", f"loss {record['train_loss']:.4f}"]
    for prefix in ("", "ema_"):
        if f"{prefix}clean_accuracy" in record:
            parts.append(f"{prefix}clean {record[f'{prefix}clean_accuracy']:.4f}")
            for name, acc in record.get(f"{prefix}robust_accuracy", {}).items():
                parts.append(f"{prefix}{name} {acc:.4f}")
    parts.append(f"{record['epoch_seconds']:.1f}s")
    return " | ".join(parts)


def check_trackers(log_with: str | None) -> None:
    """Refuse a named tracker whose package is missing (Accelerate would skip it without a word)."""
    if not log_with:
        return
    from accelerate.tracking import get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    for name in (n.strip() for n in str(log_with).split(",")):
        if name and name != "all" and name not in available:
            raise ValueError(f"--log-with {name}: the {name} package is not installed (pip install "
                             f"'robustkd[{name}]' or pip install {name}); installed trackers: "
                             f"{', '.join(sorted(available)) or 'none'}")


def lr_factor(k: int, schedule: str, *, lr: float, total: int, milestones: list[int], gamma: float = 0.1,
              warmup: int = 0, warmup_init: float = 0.0, lr_min: float = 0.0) -> float:
    """The LR of optimizer step ``k`` (0-based) as a fraction of ``lr``, as ADR's reference sets it:
    a timm scheduler stepped after each iteration with that iteration's index, so step ``k`` runs
    at ``f(max(k - 1, 0))`` where ``f(t)`` is a linear warm-up from ``warmup_init`` for ``t < warmup``
    and then the schedule at ``t`` (the cosine spans all ``total`` steps, warm-up included, as
    timm's ``warmup_prefix=False``). Milestones take effect at step ``k = m`` (timm compares them
    with ``t + 1``), as PyTorch's MultiStepLR.
    """
    t = max(k - 1, 0)
    if t < warmup:
        return (warmup_init + t * (lr - warmup_init) / warmup) / lr
    if schedule == "cosine":
        if t >= total:
            return lr_min / lr
        return (lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * t / total))) / lr
    if schedule == "multistep":
        return gamma ** sum(k >= m for m in milestones)
    return 1.0
