"""The one training loop, on Accelerate: one CPU, one GPU or many processes.

Per step: ``method.prepare`` (targets, teachers, attack) -> optional AWP -> ``method.loss`` ->
backward -> optimizer and LR-scheduler step -> EMA update -> ``method.after_step`` -> the
``on_step_end`` event. Per epoch: evaluation every ``eval_every`` epochs, a line in
``metrics.jsonl``, and a checkpoint written to a temporary directory and renamed into place, so a
crash never leaves a corrupt "latest"; ``save_every_steps`` adds mid-epoch checkpoints, and SIGINT /
SIGTERM write one after the current step (:mod:`robustkd.callbacks`). ``resume`` continues from
either exactly: the data order (the batches already done are skipped), the random number
generators, the optimizer, scheduler, EMA and method state.

The settings are declared in :mod:`robustkd.train_config`; the output directory (its policy, and
writing, pruning and loading checkpoints and the final weights) lives in :mod:`robustkd.rundir`, the
divergence guard in :mod:`robustkd.divergence`, the events in :mod:`robustkd.callbacks`.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate.logging import get_logger
from torch import nn

from .attacks.base import Attack, create_attack
from .awp import AWP
from .callbacks import CallbackList, Interruption, RunEstimate, TrainerCallback, TrainingInterrupted, duration
from .checkpoint import RunLock, atomic_write_text, write_failed
from .distill.methods import Method, Progress
from .distributed import reduce_
from .divergence import CHECK_EVERY, DivergenceError, DivergenceGuard, divergence_hint
from .eval.robustness import evaluate_predictions
from .guards import check_train_batches
from .rundir import (
    RESUME_KEYS,
    ConfigMismatchError,
    claim_output_dir,
    latest_checkpoint,
    load_checkpoint,
    needed_bytes,
    preflight,
    write_checkpoint,
    write_final,
)
from .task import Task
from .teachers import EMATeacher, unwrap
from .train_config import TrainConfig, setting

logger = get_logger(__name__)  # Accelerate's multi-process logger: main process only by default


NONFINITE_CHECK_EVERY = CHECK_EVERY  # the name before robustkd.divergence
_RESUME_KEYS = RESUME_KEYS
__all__ = ["ConfigMismatchError", "DivergenceError", "TrainConfig", "Trainer", "TrainerCallback", "TrainingInterrupted",
           "evaluate_models", "for_each_model", "lr_factor", "setting"]


@dataclass
class _TrainState:
    """Loop counters and history: saved with every checkpoint. Within an epoch (a mid-epoch
    checkpoint): the micro-batches done, and the epoch's loss sum, loss count and seconds so far."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    history: list[dict[str, Any]] = field(default_factory=list)
    batch: int = 0  # micro-batches of epoch ``epoch`` (0-based) done
    loss_sum: float = 0.0
    loss_count: int = 0
    seconds: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "history": json.dumps(self.history), "batch": self.batch,
                "loss_sum": self.loss_sum, "loss_count": self.loss_count, "seconds": self.seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = json.loads(state["history"])
        self.batch, self.loss_count = int(state.get("batch", 0)), int(state.get("loss_count", 0))
        self.loss_sum, self.seconds = float(state.get("loss_sum", 0.0)), float(state.get("seconds", 0.0))


class Trainer:
    """Fit ``model`` on ``task`` with ``method``; ``fit()`` trains, evaluates, checkpoints.

    ``callbacks``: :class:`~robustkd.callbacks.TrainerCallback` instances whose events run after the
    trainer's own (:class:`~robustkd.callbacks.Interruption`, :class:`~robustkd.callbacks.RunEstimate`)."""

    def __init__(self, task: Task, model: nn.Module, method: Method, config: TrainConfig,
                 run_info: dict[str, Any] | None = None, callbacks: list[TrainerCallback] | None = None):
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, set_seed

        self.task, self.method, self.config = task, method, config
        self.run_info = dict(run_info or {})
        self.output_dir = Path(config.output_dir)
        self.estimate = RunEstimate()
        self.callbacks = CallbackList([Interruption(), self.estimate, *(callbacks or [])])
        self.stop_requested: tuple[str, int] | None = None
        if config.save_every_steps < 0:
            raise ValueError(f"--save-every-steps {config.save_every_steps}: use 0 (epoch ends only) or a positive "
                             "number of optimizer steps")
        # output dir and resume checks: before any work
        self._resume_from, self.run_id = preflight(config, needed_bytes(model, config), self._config_now())
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
        self.train_loader = task.dataloader("train", config.batch_size, max_samples=config.max_train_samples,
                                            seed=config.seed, drop_last=config.drop_last,
                                            num_workers=config.num_workers, pin_memory=config.pin_memory)
        self.eval_loader = task.dataloader("test", config.eval_batch_size, max_samples=config.max_eval_samples,
                                           seed=config.seed, shuffle=False, num_workers=config.num_workers,
                                           pin_memory=config.pin_memory)
        self.train_examples = len(self.train_loader.dataset)  # type: ignore[arg-type]
        check_train_batches(self.train_examples, config.batch_size, config.drop_last)
        if len(self.train_loader) == 0:
            raise ValueError("the training split is empty: check --data-dir and --max-train-samples")
        self._validate(model)
        self.run_id = claim_output_dir(acc, config, self.run_id, needed_bytes(model, config))
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
        self.bn_momentum = None
        if config.bn_momentum_schedule:
            from .fidelity import BNMomentumSchedule

            if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in unwrap(self.model).modules()):
                raise ValueError("--bn-momentum-schedule: this model has no batch-norm layer, so nothing would "
                                 "change: drop --bn-momentum-schedule")
            self.bn_momentum = BNMomentumSchedule()
        self.state = _TrainState()
        self.guard = DivergenceGuard(acc.device, max_nonfinite_steps=config.max_nonfinite_steps,
                                     reduce=(lambda t: acc.reduce(t, "sum")) if acc.num_processes > 1 else None,
                                     hint=divergence_hint(config), latest=self._latest_checkpoint)
        # Accelerate needs only state_dict/load_state_dict, which the method, EMA and counters all have
        for obj in (self.scheduler, self.state, self.method) + ((self.ema,) if self.ema else ()):
            acc.register_for_checkpointing(obj)
        self.eval_attacks = {spec: create_attack(spec, task, **(config.eval_threat or {})) for spec in config.eval_attacks}
        self.callbacks.event("on_init_end", self)

    # -- setup helpers ------------------------------------------------------------------
    def _config_now(self) -> dict[str, Any]:
        """This run's configuration as a checkpoint's ``run_config.json`` holds it (for the resume check)."""
        return {**self.run_info, "task": self.task.name, "num_classes": self.task.num_classes,
                "method": self.method.name, **asdict(self.config)}

    def _validate(self, model: nn.Module) -> None:
        """Check data and model against the task on one batch of each split, before any work."""
        for loader in (self.train_loader, self.eval_loader):
            batch = next(iter(loader))
            self.task.validate_batch(batch)
        self.task.check_model(model.eval(), batch)
        model.train()

    def _make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer; ``bn_no_decay``: ADR's two parameter groups (:func:`robustkd.fidelity.param_groups`)."""
        from .fidelity import is_bn_parameter, param_groups

        c = self.config
        if c.bn_no_decay and not any(is_bn_parameter(n) for n, _ in model.named_parameters()):
            raise ValueError("--bn-no-decay: this model has no parameter named 'batchnorm' (ADR's grouping: the "
                             "PreAct-ResNet and WRN models), so nothing would change: drop --bn-no-decay")
        groups = param_groups(model, c.weight_decay, no_decay_bn=c.bn_no_decay)
        if c.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
                                   nesterov=c.nesterov)
        if c.nesterov:
            raise ValueError(f"nesterov applies to the SGD optimizer only, not {c.optimizer!r}: drop --nesterov")
        if c.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=c.lr, weight_decay=c.weight_decay)
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
        if self.bn_momentum is not None:  # before the step's forward passes (1.0 at step 0, then 0.01)
            self.bn_momentum(victim, self.state.step)
        # the attack sets and restores the victim's mode; it and the teachers run in the run's precision
        with acc.autocast():
            prepared = method.prepare(victim, batch, progress)
        awp = self.awp if self.awp is not None and self.awp.active(self.state.epoch) else None
        v = None
        if awp is not None:
            v = awp.compute(victim, lambda m: method.loss(m, batch, prepared, progress)[0])
            awp.perturb(victim, v)
        with acc.accumulate(model):
            loss, logs = method.loss(model, batch, prepared, progress)
            if self.guard.loss_ok(loss, self.state.step):  # False only for a skipped step under --max-nonfinite-steps
                acc.backward(loss)
                if awp is not None and v is not None and awp.restores_before_step:  # the gradient at w + v updates w
                    awp.restore(victim, v)
                if self.config.max_grad_norm is not None and acc.sync_gradients:
                    acc.clip_grad_norm_(model.parameters(), self.config.max_grad_norm)
                self.optimizer.step()
            else:
                if awp is not None and v is not None and awp.restores_before_step:
                    awp.restore(victim, v)
                logs = {**logs, "skipped": True}
            self.optimizer.zero_grad(set_to_none=True)
        if awp is not None and v is not None and not awp.restores_before_step:
            awp.restore(victim, v)
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
        """Train for ``config.epochs`` (continuing from the last checkpoint with ``resume``), holding the
        output folder's run lock (:class:`~robustkd.checkpoint.RunLock`) on the main process."""
        lock = RunLock(self.output_dir) if self.accelerator.is_main_process else contextlib.nullcontext()
        with lock:
            return self._fit()

    def _fit(self) -> list[dict[str, Any]]:
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
        self.guard.reset()
        self.stop_requested = None
        if c.log_with:
            name = c.run_name or self.output_dir.name
            acc.init_trackers(name, config=_flat_config(self.run_config()),
                              init_kwargs={"wandb": {"name": name, "tags": list(c.tags)}})
        if self.bn_momentum is not None and self.state.step > 1:  # resumed: the momentum the schedule set at step 1
            self.bn_momentum(unwrap(self.model), 1)
        self.callbacks.event("on_train_begin", self)
        try:
            for epoch in range(self.state.epoch, c.epochs):
                self._train_epoch(epoch, metrics)
            self.save_final()
            if c.log_with:
                acc.end_training()
        finally:
            self.callbacks.event("on_train_end", self)
        return self.state.history

    def _train_epoch(self, epoch: int, metrics: Path) -> None:
        """One epoch, from the batch a mid-epoch checkpoint stopped at (``state.batch``)."""
        from accelerate import skip_first_batches
        from tqdm.auto import tqdm

        acc, c, state = self.accelerator, self.config, self.state
        if hasattr(self.train_loader, "set_epoch"):
            self.train_loader.set_epoch(epoch)
        self.model.train()
        start, n_batches = state.batch, len(self.train_loader)
        started = time.perf_counter() - state.seconds
        loss_sum = torch.tensor(state.loss_sum, dtype=torch.float32, device=acc.device)
        n = state.loss_count
        loader = skip_first_batches(self.train_loader, start) if start else self.train_loader
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{c.epochs}", leave=False, initial=start, total=n_batches,
                   disable=not (c.progress and acc.is_local_main_process))
        for i, batch in enumerate(bar if start < n_batches else (), start):
            if i == start and start:
                # the checkpoint's generator states were taken after this epoch's loader drew its seed;
                # the new loader drew another one on its first batch: back to the checkpoint's states
                self._restore_rng()
            logs = self.train_step(batch)
            state.batch = i + 1
            if not logs.get("skipped", False):
                loss_sum += logs["loss"].float()
                n += 1
            if i % CHECK_EVERY == 0:
                self.check_finite(epoch)  # one host sync every CHECK_EVERY steps
            if i % 10 == 0 and not bar.disable:  # a host sync: only when the bar is shown
                bar.set_postfix(loss=f"{float(logs['loss']):.4f}")
            if not acc.sync_gradients:
                continue
            self.callbacks.event("on_step_end", self, logs)
            last = i + 1 == n_batches
            if self._stopping() and not last:  # on the epoch's last step: after its evaluation and checkpoint
                self._keep_partial(loss_sum, n, started)
                self._stop(self.save_checkpoint(mid_epoch=True), epoch)
            if c.save_every_steps and state.step % c.save_every_steps == 0 and not last:
                self._keep_partial(loss_sum, n, started)
                self.save_checkpoint(mid_epoch=True)
        bar.close()
        self.check_finite(epoch, parameters=True)
        record: dict[str, Any] = {"epoch": epoch + 1, "step": state.step,
                                  "lr": self.optimizer.param_groups[0]["lr"],
                                  "train_loss": float(acc.reduce(loss_sum, "mean")) / max(n, 1),
                                  "epoch_seconds": time.perf_counter() - started,
                                  **self.method.log_values(self.progress())}
        state.epoch, state.batch, state.loss_sum, state.loss_count, state.seconds = epoch + 1, 0, 0.0, 0, 0.0
        # batch-norm statistics drift apart per process: make them identical before eval/checkpoint
        reduce_([b for b in unwrap(self.model).buffers() if b.is_floating_point()])
        if c.eval_every and ((epoch + 1) % c.eval_every == 0 or epoch + 1 == c.epochs):
            evaluated = self.evaluate_all(prefix_ema="ema_")
            self.callbacks.event("on_evaluate", self, evaluated)
            record.update(evaluated)
        record["run_id"] = self.run_id
        state.history.append(record)
        if acc.is_main_process:
            try:
                with open(metrics, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as exc:
                raise write_failed(metrics, exc, self._latest_checkpoint()) from exc
            left = self.estimate.remaining(self) if epoch + 1 < c.epochs else None
            logger.info(_summary_line(record) + (f" | {duration(left)} left" if left is not None else ""))
        if c.log_with:
            acc.log({k: v for k, v in _flat_config(record).items() if isinstance(v, (int, float))}, step=epoch + 1)
        self.callbacks.event("on_epoch_end", self, record)
        path = self.save_checkpoint()
        if self._stopping(at_epoch_end=True):
            self._stop(path, epoch)

    # -- stopping on request (SIGINT, SIGTERM, a callback) ---------------------------------
    def request_stop(self, reason: str, status: int = 1) -> None:
        """Stop after the current optimizer step with a checkpoint; the process then ends with ``status``."""
        if self.stop_requested is None:
            self.stop_requested = (reason, status)

    def _stopping(self, at_epoch_end: bool = False) -> bool:
        """Whether to stop now: every process agrees (one all-reduce every ``CHECK_EVERY`` steps and at
        epoch ends when there are several; none on a single process)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return self.stop_requested is not None
        if not at_epoch_end and self.state.step % CHECK_EVERY:
            return False
        flag = torch.tensor(float(self.stop_requested is not None), device=acc.device)
        if float(acc.reduce(flag, "sum")) > 0:
            self.request_stop("a signal to another process", 143)
            return True
        return False

    def _keep_partial(self, loss_sum: torch.Tensor, n: int, started: float) -> None:
        """The epoch so far, for a mid-epoch checkpoint (one host read of the loss sum)."""
        self.state.loss_sum, self.state.loss_count = float(loss_sum), n
        self.state.seconds = time.perf_counter() - started

    def _stop(self, path: Path, epoch: int) -> None:
        reason, status = self.stop_requested or ("a stop request", 1)
        s = self.state
        where = f"epoch {epoch + 1}, batch {s.batch}/{len(self.train_loader)}" if s.batch else f"end of epoch {s.epoch}"
        message = (f"stopped on {reason} after optimizer step {s.step} of {self.total_steps} ({where}): checkpoint "
                   f"{path}; continue with --resume")
        logger.warning(message)
        raise TrainingInterrupted(status, message, path)

    def _restore_rng(self) -> None:
        random.setstate(self._rng[0])
        if self._rng[1] is not None:
            import numpy as np

            np.random.set_state(self._rng[1])
        torch.set_rng_state(self._rng[2])
        if self._rng[3] is not None:
            torch.cuda.set_rng_state_all(self._rng[3])

    def _capture_rng(self) -> None:
        try:
            import numpy as np

            numpy_state = np.random.get_state()
        except ImportError:  # pragma: no cover - numpy comes with torch's stack
            numpy_state = None
        self._rng = (random.getstate(), numpy_state, torch.get_rng_state(),
                     torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)

    # -- divergence (robustkd.divergence) -----------------------------------------------
    @property
    def _skipped(self) -> int:
        return self.guard.skipped

    def check_finite(self, epoch: int, parameters: bool = False) -> None:
        """Raise :class:`DivergenceError` when a loss since the start was non-finite or (every time: one
        fused reduction in the same host read) a weight is non-finite or exploded."""
        del parameters  # the weights are checked at every check (kept for callers of the old signature)
        self.guard.check(list(unwrap(self.model).parameters()), step=self.state.step, epoch=epoch)

    def _latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.output_dir)

    def models(self) -> dict[str, nn.Module]:
        """The run's models by name: ``student``, then ``ema`` when the run keeps an EMA copy."""
        return {"student": unwrap(self.model), **({"ema": self.ema.model} if self.ema is not None else {})}

    def evaluate_all(self, attacks: dict[str, Attack] | None = None, prefix_ema: str = "ema_") -> dict[str, Any]:
        """Clean and robust accuracy of the student and, when kept, the EMA model."""
        models = {{"student": "", "ema": prefix_ema}[name]: m for name, m in self.models().items()}
        out = evaluate_models(self.task, models, self.eval_loader, self.eval_attacks if attacks is None else attacks,
                              self.accelerator, progress=self.config.progress and self.accelerator.is_local_main_process)
        self.model.train()
        return out

    # -- checkpoints ----------------------------------------------------------------------
    def run_config(self) -> dict[str, Any]:
        return {**self.run_info, "run_id": self.run_id, "task": self.task.name, "num_classes": self.task.num_classes,
                "method": self.method.name, "method_config": self.method.describe(), **asdict(self.config)}

    def save_checkpoint(self, mid_epoch: bool = False) -> Path:
        """``checkpoints/epoch-N`` (``mid_epoch``: ``checkpoints/step-N``, N optimizer steps done) via a
        temporary directory renamed into place; ``latest`` points to it; the older ones of this run are
        pruned to ``keep_checkpoints`` (:func:`robustkd.rundir.write_checkpoint`). A mid-epoch one is
        checked for divergence first (the epoch's end is checked before its evaluation)."""
        if mid_epoch:
            self.check_finite(self.state.epoch)
        name = f"step-{self.state.step}" if mid_epoch else f"epoch-{self.state.epoch}"
        final = write_checkpoint(self.accelerator, self.output_dir, name, self.run_config(), run_id=self.run_id,
                                 keep=self.config.keep_checkpoints)
        self.callbacks.event("on_save", self, final)
        return final

    def resume(self) -> bool:
        """Load the latest checkpoint under ``output_dir`` (if any); refuse one from another configuration."""
        ckpt = self._resume_from
        if ckpt is None:
            logger.info(f"no checkpoint under {self.output_dir}: starting from scratch")
            return False
        load_checkpoint(self.accelerator, ckpt, self._config_now())
        self._capture_rng()
        within = f", batch {self.state.batch} of epoch {self.state.epoch + 1}" if self.state.batch else ""
        logger.info(f"resumed from {ckpt} (epoch {self.state.epoch}, step {self.state.step}{within})")
        return True

    def save_final(self) -> None:
        """The final weights (student, EMA) and ``robustkd.json`` in ``output_dir``."""
        meta = {**self.run_info, "run_id": self.run_id, "task": self.task.name,
                "num_classes": self.task.num_classes, "method": self.method.name, "epochs": self.state.epoch}
        write_final(self.accelerator, self.output_dir, unwrap(self.model), self.ema.model if self.ema else None, meta)


#: a model of a set to evaluate: the module, or a context that gives it (a PEFT student with its EMA
#: adapter weights swapped in, restored afterwards)
ModelSource = nn.Module | AbstractContextManager[nn.Module]
R = TypeVar("R")


def for_each_model(models: Mapping[str, ModelSource], run: Callable[[str, nn.Module], R], *,
                   keep_random_state: bool = False) -> dict[str, R]:
    """``run(name, model)`` for each model of a set (the student, its EMA copy, ...) in order: the one
    loop behind every evaluation of a run's models (the trainer's per-epoch metrics, the final report,
    ``RobustTrainer``'s robust metrics). A model given as a context is entered around its run;
    ``keep_random_state`` leaves the caller's random number generators as they were (an evaluation
    inside training that must not move its random state)."""
    out: dict[str, R] = {}
    for name, source in models.items():
        with contextlib.ExitStack() as stack:
            if keep_random_state:
                stack.enter_context(torch.random.fork_rng())
            model = source if isinstance(source, nn.Module) else stack.enter_context(source)
            out[name] = run(name, model)
    return out


def evaluate_models(task: Task, models: Mapping[str, ModelSource], loader: Any, attacks: Mapping[str, Attack],
                    accelerator: Any = None, progress: bool = False, *, seed: int | None = None) -> dict[str, Any]:
    """Clean and robust accuracy of each model (the student, its EMA copy, ...) under ``attacks`` on
    ``loader``: one dict, each model's keys prefixed with its name (``""`` for the student, ``"ema_"``);
    with ``progress`` a bar per model names the attack and the model. ``seed``: the attacks' random
    starts are seeded per batch (:func:`robustkd.eval.robustness.evaluate_predictions`) and the caller's
    random state is left as it was."""
    def run(prefix: str, model: nn.Module) -> dict[str, Any]:
        label = {"": "student", "ema_": "EMA"}.get(prefix, prefix.rstrip("_"))
        return evaluate_predictions(task, model, loader, dict(attacks), accelerator, progress, seed=seed,
                                    label=label).summary()

    out: dict[str, Any] = {}
    for prefix, summary in for_each_model(models, run, keep_random_state=seed is not None).items():
        out.update({f"{prefix}{k}": v for k, v in summary.items()})
    return out


def _set_tf32(enabled: bool, device: torch.device) -> None:
    """TF32 for float32 matmuls and cuDNN convolutions on Ampere+ GPUs; a no-op elsewhere."""
    if not enabled or device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 8:
        return
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"  # type: ignore[attr-defined]  # torch >= 2.9, not in its stubs


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
