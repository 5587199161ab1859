"""Events of the training loop, in the style of ``transformers.TrainerCallback``.

A :class:`TrainerCallback` overrides the events it needs; ``Trainer(..., callbacks=[...])`` calls
them in order, after the trainer's own (:class:`Interruption`, :class:`RunEstimate`)::

    class PrintLR(TrainerCallback):
        def on_epoch_end(self, trainer, record):
            print(record["epoch"], record["lr"])

Events of training: ``on_init_end`` (the trainer is built; a callback may record facts of the run
in ``trainer.run_info``, which checkpoints and the saved model carry), ``on_train_begin`` (after the
resume, before the first step), ``on_step_end`` (after each optimizer step; ``logs`` holds the
step's on-device loss values), ``on_evaluate`` (the per-epoch metrics), ``on_epoch_end`` (the
epoch's ``metrics.jsonl`` record), ``on_save`` (a checkpoint was written, epoch-end or mid-epoch)
and ``on_train_end`` (training ended: finished, stopped or failed). A callback stops the run
cleanly with ``trainer.request_stop(reason, status)``: the loop finishes the step, writes a
checkpoint, says so in one line and raises :class:`TrainingInterrupted`.

Events of the final report (:func:`robustkd.recipe.final_report`, once per model: the EMA copy,
then the student): ``on_build_attacks`` may replace the model's attacks (e.g. wrap each to measure
what it does) and ``on_report`` returns extra report sections (a value may be a callable, called
after the attacks ran, to report what they measured)::

    class Budget(TrainerCallback):
        def on_report(self, trainer, which, model, attacks):
            return {"budget": {spec: a.describe() for spec, a in attacks.items()}}

    run_recipe(parse(RECIPE), callbacks=[Budget()])  # report.json gains a "budget" section
"""
from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from accelerate.logging import get_logger

if TYPE_CHECKING:
    from torch import nn

    from .attacks.base import Attack
    from .trainer import Trainer

logger = get_logger("robustkd.trainer")


class TrainingInterrupted(SystemExit):
    """The run stopped on request (SIGINT, SIGTERM, a callback) after writing a checkpoint that
    ``--resume`` continues exactly. A ``SystemExit``: an entry point ends with ``status`` (128 + the
    signal's number) and no traceback; a library user may catch it."""

    def __init__(self, status: int, message: str, checkpoint: Any = None):
        super().__init__(status)
        self.message, self.checkpoint = message, checkpoint

    def __str__(self) -> str:
        return self.message


class TrainerCallback:
    """The events of :class:`~robustkd.trainer.Trainer` and of the final report; each does nothing
    unless overridden."""

    def on_init_end(self, trainer: Trainer) -> None: ...

    def on_train_begin(self, trainer: Trainer) -> None: ...

    def on_step_end(self, trainer: Trainer, logs: dict[str, Any]) -> None: ...

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, Any]) -> None: ...

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None: ...

    def on_save(self, trainer: Trainer, path: Any) -> None: ...

    def on_train_end(self, trainer: Trainer) -> None: ...

    def on_build_attacks(self, trainer: Trainer, which: str,
                         attacks: Mapping[str, Attack]) -> Mapping[str, Attack] | None:
        """The attacks of model ``which`` (``"student"``, ``"ema"``) in the final report, by spec: return
        the ones to run instead (the same specs), or None to keep them."""
        return None

    def on_report(self, trainer: Trainer, which: str, model: nn.Module,
                  attacks: Mapping[str, Attack]) -> Mapping[str, Any] | None:
        """Extra sections of model ``which``'s report (``{section: value}``; a callable value is called
        after the evaluation), or None."""
        return None


class CallbackList:
    """Calls an event on every callback, in order."""

    def __init__(self, callbacks: list[TrainerCallback]):
        for cb in callbacks:
            if not isinstance(cb, TrainerCallback):
                raise TypeError(f"callbacks must be TrainerCallback instances, got {type(cb).__name__}")
        self.callbacks = list(callbacks)

    def __iter__(self) -> Iterator[TrainerCallback]:
        return iter(self.callbacks)

    def event(self, name: str, trainer: Trainer, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, name)(trainer, *args)

    def build_attacks(self, trainer: Trainer, which: str, attacks: Mapping[str, Attack]) -> dict[str, Attack]:
        """``on_build_attacks`` through every callback in order, each seeing the previous one's attacks; a
        callback that drops or adds a spec is refused (the report runs the specs the user gave)."""
        out = dict(attacks)
        for cb in self.callbacks:
            replaced = cb.on_build_attacks(trainer, which, out)
            if replaced is None:
                continue
            if set(replaced) != set(out):
                raise ValueError(f"{type(cb).__name__}.on_build_attacks returned the attacks "
                                 f"{sorted(replaced)} for {sorted(out)}: it may replace attacks, not add or drop specs")
            out = dict(replaced)
        return out

    def report_sections(self, trainer: Trainer, which: str, model: nn.Module,
                        attacks: Mapping[str, Attack]) -> dict[str, Any]:
        """The sections every callback's ``on_report`` returns, in order; a section two callbacks both
        give, or one that is neither a dict nor a callable returning one, is refused."""
        out: dict[str, Any] = {}
        for cb in self.callbacks:
            sections = cb.on_report(trainer, which, model, attacks)
            for key, value in (sections or {}).items():
                if not (isinstance(value, Mapping) or callable(value)):
                    raise ValueError(f"{type(cb).__name__}.on_report: the report section {key!r} is a "
                                     f"{type(value).__name__}: give a dict, or a callable that returns one")
                if key in out:
                    raise ValueError(f"{type(cb).__name__}.on_report gives the report section {key!r}, which an "
                                     "earlier callback gave: rename one of them")
                out[key] = value
        return out


class Interruption(TrainerCallback):
    """SIGINT (Ctrl-C) and SIGTERM (a cluster's pre-emption) stop the run cleanly: the current step
    finishes, a checkpoint is written and the process ends with one line (status 128 + the signal).
    A second signal exits at once (``KeyboardInterrupt``). Handlers are installed for the time of
    ``fit`` in the main thread only, and the previous ones restored afterwards."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.previous: dict[int, Any] = {}
        self.trainer: Trainer | None = None

    def on_train_begin(self, trainer: Trainer) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self.trainer = trainer
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        trainer, name = self.trainer, signal.Signals(signum).name
        if trainer is None or trainer.stop_requested is not None:  # the second signal: exit at once
            self.on_train_end(trainer)
            raise KeyboardInterrupt
        trainer.request_stop(name, 128 + signum)
        logger.warning(f"{name}: finishing the current step, then writing a checkpoint (send it again to exit at "
                       "once)")

    def on_train_end(self, trainer: Trainer | None) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.previous, self.trainer = {}, None


#: steps timed before the first estimate (after the first step, which compiles and warms up), or
#: fewer when they take longer than ESTIMATE_AFTER_SECONDS
ESTIMATE_AFTER_STEPS = 5
ESTIMATE_AFTER_SECONDS = 60.0
#: an estimate longer than this suggests a shorter schedule or a GPU
LONG_RUN_SECONDS = 24 * 3600.0


def duration(seconds: float) -> str:
    """``45s``, ``12m 05s``, ``3h 20m``, ``2.4 days``."""
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m {int(seconds % 60):02d}s"
    if seconds < 2 * 86400:
        return f"{int(seconds // 3600)}h {int(seconds % 3600 // 60):02d}m"
    return f"{seconds / 86400:.1f} days"


class RunEstimate(TrainerCallback):
    """The first minutes of a long run: at the start one line with the device, the epochs and the
    optimizer steps; after the first few steps one line estimating the whole run's training time,
    suggesting a shorter schedule or a GPU when it runs to days; each epoch's summary line then ends
    with the time left (:meth:`remaining`), from the pace so far (evaluations included)."""

    def __init__(self, after_steps: int = ESTIMATE_AFTER_STEPS, after_seconds: float = ESTIMATE_AFTER_SECONDS,
                 long_run: float | None = None):
        self.after_steps, self.after_seconds, self.long_run = after_steps, after_seconds, long_run
        self.start: tuple[float, int] | None = None
        self.estimated = False

    def on_train_begin(self, trainer: Trainer) -> None:
        acc, c, s = trainer.accelerator, trainer.config, trainer.state
        self.start, self.estimated = None, False
        device = str(acc.device) + (f" x {acc.num_processes} processes" if acc.num_processes > 1 else "")
        where = f"; resuming at step {s.step}" if s.step else ""
        logger.info(f"training on {device}: {c.epochs} epochs x {trainer.steps_per_epoch} optimizer steps = "
                    f"{trainer.total_steps} steps (batch {c.batch_size}{f' x {c.grad_accum} accumulated' if c.grad_accum > 1 else ''}, "
                    f"{trainer.train_examples} training examples){where}")

    def _now(self, trainer: Trainer) -> float:
        if trainer.accelerator.device.type == "cuda":  # once at each end of the timed window: the queue drained
            torch.cuda.synchronize(trainer.accelerator.device)
        return time.perf_counter()

    def on_step_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        if self.estimated:
            return
        step = trainer.state.step
        if self.start is None:  # the first step compiles and warms up: time from its end
            self.start = (self._now(trainer), step)
            return
        t0, s0 = self.start
        elapsed, done = time.perf_counter() - t0, step - s0
        if done < self.after_steps and elapsed < self.after_seconds:
            return
        per_step = (self._now(trainer) - t0) / done
        left = (trainer.total_steps - step) * per_step
        self.estimated = True
        line = (f"estimated training time: {duration(left)} more ({duration(trainer.total_steps * per_step)} in "
                f"all, {per_step:.3g}s per optimizer step over steps {s0 + 1}-{step}; each evaluation adds its own)")
        if left > (self.long_run if self.long_run is not None else LONG_RUN_SECONDS):
            device = trainer.accelerator.device.type
            shorter = "fewer --epochs (the ADR preset tuned for short runs: --preset adr/short-schedule)" \
                if trainer.method.name == "adr" else "fewer --epochs or --max-train-samples"
            gpu = "a GPU" if device == "cpu" else "more GPUs (accelerate launch --num_processes N)"
            line += f". This runs to days on {device}: for a first result try {shorter}, or train on {gpu}"
        logger.info(line)

    def remaining(self, trainer: Trainer) -> float | None:
        """Seconds left at the pace since the first step (evaluations included), or None before it."""
        if self.start is None or trainer.state.step <= self.start[1]:
            return None
        t0, s0 = self.start
        return (time.perf_counter() - t0) / (trainer.state.step - s0) * (trainer.total_steps - trainer.state.step)


__all__ = ["CallbackList", "Interruption", "RunEstimate", "TrainerCallback", "TrainingInterrupted", "duration"]
