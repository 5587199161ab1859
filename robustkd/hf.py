"""Robust fine-tuning inside ``transformers.Trainer``.

``RobustTrainer`` is a ``Trainer`` whose training loss is a robustkd :class:`~robustkd.distill.Method`
(ADR, PGD-AT, TRADES, MTARD, ...) run through a task built around the model and its processor;
everything else (evaluation, prediction, saving, ``resume_from_checkpoint``, ``accelerate launch``,
logging, callbacks) is the ``Trainer``'s own. The method and its training attack are built by
:func:`robustkd.config.build_method`, the builder the recipes use, from :class:`RobustConfig`.

* The EMA teacher, when the method keeps one, is saved in every checkpoint folder and restored on
  resume; ``RobustConfig(fresh_ema=True)`` continues a checkpoint without one (a plain ``Trainer``'s)
  with a new EMA started from its weights.
* Robust metrics (clean and robust accuracy of the student and of the EMA model) are part of the one
  metrics dict every evaluation returns, logs once and hands to ``on_evaluate`` callbacks, so
  ``metric_for_best_model``, ``EarlyStoppingCallback`` and trackers see them; ``eval_dataset`` may be
  a dict (``eval_<name>_robust_accuracy/<spec>``). Their cost has its own budget
  (``RobustConfig.eval_samples``, ``RobustConfig.eval_every``).
* ``load_best_model_at_end=True`` also restores the best checkpoint's EMA teacher.
* On a ``peft`` model (LoRA, ...) the EMA teacher averages only the trainable (adapter) weights and
  runs the student's frozen base with them: the teacher costs adapter memory, not a second model.

Any Hugging Face classification model works whose task is registered: the task is the registered one
named by ``RobustConfig.task``, or else the one registered with ``hf_input=<the model's main_input_name>``
(the built-in plug-ins register ``hf_text`` for ``input_ids``, ``hf_image`` for ``pixel_values`` and
``hf_audio`` for ``input_values``). This module knows no modality itself.

For a ``Trainer`` subclass of your own, add :class:`RobustCallback` to its callbacks and call
``callback.compute_loss(model, inputs)`` from your ``compute_loss``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.trainer_utils import get_last_checkpoint

from .attacks.base import build_attacks, create_attack, parse_attack_spec
from .distill.methods import Method, Progress
from .registry import TASKS, RegistryError
from .task import Task
from .teachers import EMATeacher, Teacher, unwrap

EMA_FILE = "robustkd_ema.safetensors"
STATE_FILE = "robustkd_state.pt"
EMA_NOTE = "robustkd_ema.json"  # beside save_model's ema/: which checkpoint the EMA weights come from
logger = logging.getLogger(__name__)

#: options of a PGD-family training-attack spec and the build_method setting each one becomes
_SPEC_SETTINGS = {"steps": "attack_steps", "random_start": "attack_random_start", "init_std": "attack_init_std",
                  "loss": "attack_loss"}
_THREAT_OPTIONS = ("eps", "norm", "snr_db")


@dataclass
class RobustConfig:
    """What to train robustly with: a registered method, its training attack and the threat model.

    ``task`` names a registered task to build around the model (default: the one registered for the
    model's ``main_input_name``), with ``task_options`` (e.g. ``{"snr_db": 30}`` for audio);
    ``eps`` / ``norm`` set the task's threat model (for text: the per-token embedding ball, relative to
    each token embedding's norm) and so the default budget of the training and evaluation attacks.

    ``attack`` is the training attack, a PGD-family spec (``pgd``, ``embedding_pgd``, ``snr_pgd``, with
    options ``steps``, ``step_size`` or ``rel_step_size``, ``random_start``, ``loss``, ``init_std`` and
    the budget ``eps``/``norm``/``snr_db``; default: the task's ``default_train_attack``); ``attack_steps``
    its steps unless the spec names them. Its objective, start and mode are the method's own unless
    given (declared on the method's class, see ``robustkd.presets.method_defaults``), as in a recipe. ``method_kwargs`` go to the method;
    ``clean_teacher`` / ``robust_teacher`` are MTARD's teachers as a recipe takes them (a model
    directory, a recipe output directory, ``"ema"`` for the robust one).

    ``ema_decay`` (default 0.995 when the method needs an EMA teacher) and ``ema_warmup`` (timm's ramp)
    set the EMA; ``fresh_ema=True`` starts a new EMA from the weights of the checkpoint training resumes
    from instead of restoring the one saved there (needed for a plain ``Trainer`` checkpoint).

    ``eval_attacks`` are run at each evaluation and reported as ``eval_robust_accuracy/<spec>`` (and
    ``eval_ema_robust_accuracy/<spec>``), on ``eval_samples`` points of each evaluation set (a sample
    seeded by ``TrainingArguments.seed``, the same at every evaluation; default: all) and, during
    training, at every ``eval_every``-th evaluation (``evaluate()`` called by you always runs them).
    """

    method: str = "adr"
    attack: str | None = None
    eps: float | None = None
    norm: str | None = None
    task: str | None = None
    task_options: dict[str, Any] = field(default_factory=dict)
    attack_steps: int = 10
    ema_decay: float | None = None  # default 0.995 when the method needs an EMA teacher
    ema_warmup: bool = False
    fresh_ema: bool = False
    max_length: int = 512
    eval_attacks: tuple[str, ...] = ()
    eval_samples: int | None = None
    eval_every: int = 1
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    clean_teacher: str | None = None
    robust_teacher: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.eval_attacks, str):
            self.eval_attacks = tuple(s for s in self.eval_attacks.replace(";", ",").split(",") if s.strip())
        if self.eval_samples is not None and self.eval_samples < 1:
            raise ValueError(f"RobustConfig(eval_samples={self.eval_samples}): give a number of points >= 1, or None "
                             "for the whole evaluation set")
        if self.eval_every < 1:
            raise ValueError(f"RobustConfig(eval_every={self.eval_every}): robust metrics run at every N-th "
                             "evaluation, N >= 1")


def task_for_model(model: nn.Module, processor: Any = None, config: RobustConfig | None = None) -> Task:
    """The registered task around ``model``: ``config.task`` by name, else the one registered with
    ``hf_input=`` the model's ``main_input_name``; ``eps``/``norm``/``max_length`` and ``task_options`` go to it."""
    config = config or RobustConfig()
    bare = unwrap(model)
    if config.task is not None:
        factory = TASKS.get(config.task)
    else:
        key = getattr(bare, "main_input_name", None)
        matches = [e for e in TASKS.entries() if getattr(e.obj, "_robustkd_hf_input", None) == key]
        if not matches:
            raise RegistryError(f"no registered task takes models whose input is {key!r} "
                                f"({type(bare).__name__}): name one with RobustConfig(task=...) or register a task "
                                "with register_task(name, hf_input=...)")
        if len(matches) > 1:
            raise RegistryError(f"several tasks take {key!r} models ({', '.join(e.name for e in matches)}): name one "
                                "with RobustConfig(task=...)")
        factory = matches[0].obj
    options = {k: v for k, v in (("eps", config.eps), ("norm", config.norm)) if v is not None}
    if getattr(factory, "_robustkd_hf_input", None) == "input_ids":
        options["max_length"] = config.max_length
    return factory(bare, processor, **{**options, **config.task_options})


def build_robust_method(config: RobustConfig, task: Task) -> Method:
    """The method and its training attack from ``config``, through :func:`robustkd.config.build_method`
    (the recipes' builder): the attack spec's budget becomes the threat model, its options the
    ``attack_*`` settings; anything the builder cannot honour is refused with the option named."""
    from .attacks.pgd import PGD
    from .config import build_method
    from .presets import method_defaults
    from .registry import METHODS

    METHODS.get(config.method)  # an unknown method fails here, with the known ones listed
    settings: dict[str, Any] = {"method": config.method, "attack_steps": config.attack_steps,
                                "method_kwargs": dict(config.method_kwargs), "beta": None,
                                "clean_teacher": config.clean_teacher, "robust_teacher": config.robust_teacher}
    for key in ("clean_teacher", "robust_teacher"):  # the earlier spelling: teachers inside method_kwargs
        if key in settings["method_kwargs"]:
            if settings[key] is not None:
                raise ValueError(f"RobustConfig gives {key} twice (as {key}= and in method_kwargs): keep {key}=")
            settings[key] = settings["method_kwargs"].pop(key)
        value = settings[key]
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise ValueError(f"RobustConfig({key}=<{type(value).__name__}>): teachers are given as a recipe takes "
                             "them, a model directory (model.save_pretrained(DIR)), a recipe output directory or "
                             "'ema' for the robust one")
        if value is not None:
            settings[key] = str(value)
    threat, relative = None, False
    if method_defaults(config.method).get("attack") is None:
        if config.attack is not None:
            raise ValueError(f"RobustConfig(attack={config.attack!r}): the method {config.method!r} trains on clean "
                             "inputs and takes no attack; drop attack=")
    else:
        spec = config.attack or task.default_train_attack
        name, options = parse_attack_spec(spec)
        attack = create_attack(spec, task)  # an unknown attack or option fails here
        if not isinstance(attack, PGD):
            raise ValueError(f"RobustConfig(attack={spec!r}): RobustTrainer trains with a PGD-family attack (pgd, "
                             "embedding_pgd, snr_pgd), built as a recipe builds it (robustkd.config.build_method); "
                             "evaluate other attacks with eval_attacks=")
        other = sorted(set(options) - set(_SPEC_SETTINGS) - set(_THREAT_OPTIONS) - {"step_size", "rel_step_size"})
        if other:
            raise ValueError(f"RobustConfig(attack={spec!r}): the training attack takes no option "
                             f"{', '.join(other)} here; it takes {', '.join([*_SPEC_SETTINGS, 'step_size', 'rel_step_size', *_THREAT_OPTIONS])}")
        threat = attack.threat
        for option, setting in _SPEC_SETTINGS.items():
            if option in options:
                settings[setting] = options[option]
        if options.get("step_size") is not None:
            settings["attack_step_size"] = str(options["step_size"])
        elif options.get("rel_step_size") is not None or attack.rel_step_size is not None:
            # relative to each input's radius (embedding_pgd's own default: 2.5 / steps)
            rel = options.get("rel_step_size") or 2.5 / int(settings["attack_steps"])
            settings["attack_step_size"], relative = str(rel), True
        else:
            settings["attack_step_size"] = None  # the threat model's default step for the steps
    return build_method(settings, task, threat=threat, relative_step=relative)


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(unwrap(model), PeftModel)


class AdapterEMATeacher(Teacher):
    """ADR's EMA self-teacher for a ``peft`` model: an exponential moving average of the trainable
    (adapter) weights only. The teacher is the student's own frozen base run with the averaged adapter
    weights, swapped in (tensor references, no copy) for the teacher's forward pass and swapped back, so
    it costs the adapters' memory instead of a second model. Frozen buffers are the student's."""

    buffers = "student"

    def __init__(self, student: nn.Module, decay: float = 0.995, *, warmup: bool = False):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.student = unwrap(student)
        self.decay, self.warmup = decay, warmup
        self.tensors: dict[str, torch.Tensor] = {n: p.detach().clone() for n, p in self.student.named_parameters()
                                                 if p.requires_grad}
        if not self.tensors:
            raise ValueError(f"the PEFT model {type(self.student).__name__} has no trainable weights to average")
        self.num_updates = 0
        self._swapped = False
        self.model = self.student  # the module the teacher runs (use :meth:`swapped` to give it the EMA weights)

    def current_decay(self) -> float:
        """The decay the next update uses: :meth:`robustkd.teachers.EMATeacher.current_decay`'s (timm's ramp
        with ``warmup``)."""
        return EMATeacher.current_decay(cast(EMATeacher, self))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        if self._swapped:
            raise RuntimeError("the EMA adapter weights are swapped into the student: update after the swap ends")
        params = dict(unwrap(student).named_parameters())
        ema = list(self.tensors.values())
        source = [params[n].detach().to(e.dtype) for n, e in self.tensors.items()]
        decay = self.current_decay()
        torch._foreach_mul_(ema, decay)
        torch._foreach_add_(ema, torch._foreach_mul(source, 1.0 - decay))
        self.num_updates += 1

    @contextlib.contextmanager
    def swapped(self) -> Iterator[nn.Module]:
        """The student with the EMA adapter weights in place of its own (restored on exit)."""
        if self._swapped:
            yield self.student
            return
        params = dict(self.student.named_parameters())

        def swap() -> None:
            for name, tensor in self.tensors.items():
                p = params[name]
                own = p.data
                p.data = tensor
                self.tensors[name] = own

        with torch.no_grad():
            swap()
        self._swapped = True
        try:
            yield self.student
        finally:
            with torch.no_grad():
                swap()
            self._swapped = False

    def logits(self, task: Task, batch: Any, delta: torch.Tensor | None = None) -> torch.Tensor:
        was_training = self.student.training
        self.student.eval()
        try:
            with self.swapped(), torch.no_grad():
                return task.logits(self.student, batch, delta)
        finally:
            self.student.train(was_training)

    def to(self, device: torch.device | str) -> AdapterEMATeacher:
        self.tensors = {n: t.to(device) for n, t in self.tensors.items()}
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"tensors": dict(self.tensors), "num_updates": self.num_updates, "decay": self.decay}


@contextlib.contextmanager
def ema_model(ema: Any) -> Iterator[nn.Module]:
    """The EMA model as a module: the EMA copy, or the PEFT student with its EMA adapter weights."""
    if isinstance(ema, AdapterEMATeacher):
        was_training = ema.student.training
        try:
            with ema.swapped() as model:
                yield model
        finally:
            ema.student.train(was_training)
    else:
        yield ema.model


class RobustCallback(TrainerCallback):
    """The robust part of training as a ``TrainerCallback``: builds the method, keeps the EMA
    teacher up to date after each optimizer step, saves it into each checkpoint and restores it on
    resume (and from the best checkpoint with ``load_best_model_at_end``). ``compute_loss`` gives the
    method's loss for a batch."""

    def __init__(self, model: nn.Module, processor: Any = None, config: RobustConfig | None = None,
                 task: Task | None = None):
        self.config = config or RobustConfig()
        self.task = task or task_for_model(model, processor, self.config)
        self.method: Method = build_robust_method(self.config, self.task)
        # built once, as the recipe trainer's per-epoch attacks are; each evaluation reuses them
        self.eval_attacks = build_attacks(self.config.eval_attacks, self.task)
        decay = self.config.ema_decay if self.config.ema_decay is not None else (0.995 if self.method.needs_ema else None)
        if self.config.ema_warmup and decay is None:
            raise ValueError(f"RobustConfig(ema_warmup=True): the method {self.config.method!r} keeps no EMA; give "
                             "ema_decay= too to keep one")
        self.ema_decay = decay
        self.ema: EMATeacher | AdapterEMATeacher | None = None
        self.ema_source: str | None = None  # the checkpoint the EMA weights were restored from, if any
        self.state: TrainerState | None = None
        self.resume_from: str | None = None
        self._ready = False

    # -- setup ----------------------------------------------------------------------------
    def setup(self, model: nn.Module) -> None:
        """Create the EMA teacher from the (possibly resumed) model and hand teachers to the method."""
        if self._ready:
            return
        device = next(unwrap(model).parameters()).device
        if self.ema_decay is not None:
            if _is_peft(model):
                self.ema = AdapterEMATeacher(model, self.ema_decay, warmup=self.config.ema_warmup).to(device)
            else:
                self.ema = EMATeacher(model, self.ema_decay, warmup=self.config.ema_warmup)
                self.ema.to(device)
        for teacher in getattr(self.method, "teachers", []):
            teacher.to(device)
        # an adapter EMA teaches as an EMATeacher does (logits, update, decay, num_updates)
        self.method.setup(model, cast("EMATeacher | None", self.ema))
        self._ready = True

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, **kwargs: Any) -> None:
        self.state = state
        self._ready = False
        self.ema_source = None
        self.setup(_given_model(model, "on_train_begin"))
        path = self.resume_from
        if path is None and state.global_step > 0:
            candidate = Path(_output_dir(args)) / f"checkpoint-{state.global_step}"
            path = str(candidate) if candidate.is_dir() else None
            if path is None:
                raise FileNotFoundError(f"training resumes at step {state.global_step} but {candidate} does not exist: "
                                        "set callback.resume_from to the checkpoint folder so its EMA teacher is restored")
        if path is not None:
            if self.config.fresh_ema:
                logger.info("RobustConfig(fresh_ema=True): a new EMA teacher and method state start from the weights "
                            "of %s", path)
            else:
                self.load(path)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: nn.Module | None = None, **kwargs: Any) -> None:
        model = _given_model(model, "on_step_end")
        if self.ema is not None:
            self.ema.update(model)
        self.method.after_step(model, self.progress(state))

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if args.should_save:
            self.save(Path(_output_dir(args)) / f"checkpoint-{state.global_step}")

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        # Trainer has just loaded the best checkpoint's model: its EMA teacher goes with it
        best = state.best_model_checkpoint
        if args.load_best_model_at_end and best is not None and Path(best).is_dir():
            self.load(best)
            logger.info("load_best_model_at_end: the EMA teacher and method state are those of %s", best)

    # -- state ----------------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        """Write the EMA weights (safetensors; the adapter weights only for a PEFT model) and the method /
        EMA counters into ``folder``."""
        from safetensors.torch import save_file, save_model

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if isinstance(self.ema, AdapterEMATeacher):
            save_file({k: v.contiguous() for k, v in self.ema.tensors.items()}, str(folder / EMA_FILE))
        elif self.ema is not None:
            save_model(self.ema.model, str(folder / EMA_FILE))
        state = {"method": self.method.state_dict(),
                 "ema": {"num_updates": self.ema.num_updates, "decay": self.ema.decay,
                         "kind": "adapter" if isinstance(self.ema, AdapterEMATeacher) else "model"}
                 if self.ema else None}
        torch.save(state, folder / STATE_FILE)

    def load(self, folder: str | Path) -> None:
        """Restore what :meth:`save` wrote; a checkpoint without it is refused (no silent fresh EMA)."""
        from safetensors.torch import load_file, load_model

        folder = Path(folder)
        if not (folder / STATE_FILE).exists():
            raise FileNotFoundError(f"{folder} has no {STATE_FILE} (not written by RobustTrainer, e.g. a plain "
                                    "Trainer checkpoint), so its EMA teacher and method state cannot be restored: pass "
                                    "RobustConfig(fresh_ema=True) to start a new EMA from its weights")
        state = torch.load(folder / STATE_FILE, weights_only=True)
        if self.ema is not None:
            if not (folder / EMA_FILE).exists() or state["ema"] is None:
                raise FileNotFoundError(f"{folder} has no EMA teacher ({EMA_FILE}) but the method "
                                        f"{self.method.name!r} keeps one: pass RobustConfig(fresh_ema=True) to start a "
                                        "new EMA from its weights")
            if isinstance(self.ema, AdapterEMATeacher):
                saved = load_file(str(folder / EMA_FILE))
                if set(saved) != set(self.ema.tensors):
                    raise ValueError(f"the EMA adapter weights in {folder} do not fit the model's trainable weights "
                                     f"(missing {sorted(set(self.ema.tensors) - set(saved))[:3]}, unexpected "
                                     f"{sorted(set(saved) - set(self.ema.tensors))[:3]})")
                for name, tensor in self.ema.tensors.items():
                    tensor.copy_(saved[name])
            else:
                missing, unexpected = load_model(self.ema.model, str(folder / EMA_FILE), strict=False)
                if missing or unexpected:
                    raise ValueError(f"the EMA weights in {folder} do not fit the model (missing {missing[:3]}, "
                                     f"unexpected {unexpected[:3]})")
            self.ema.num_updates = int(state["ema"]["num_updates"])
        self.method.load_state_dict(state["method"])
        self.ema_source = str(folder)

    # -- the loss -------------------------------------------------------------------------
    def progress(self, state: TrainerState | None = None) -> Progress:
        state = state or self.state
        if state is None:
            return Progress()
        return Progress(step=int(state.global_step), total_steps=max(int(state.max_steps or 1), 1),
                        epoch=int(state.epoch or 0))

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any],
                     return_outputs: bool = False) -> torch.Tensor | None | tuple[torch.Tensor | None, Any]:
        """The method's robust loss (a mean over the batch) in training; the plain cross-entropy (and
        logits) otherwise."""
        task = self.task
        if not model.training or not torch.is_grad_enabled():
            logits = task.logits(model, inputs)
            loss = torch.nn.functional.cross_entropy(logits, inputs["labels"]) if "labels" in inputs else None
            return (loss, SequenceClassifierOutput(loss=cast(Any, loss), logits=cast(Any, logits))) if return_outputs \
                else loss
        self.setup(model)
        progress = self.progress()
        prepared = self.method.prepare(unwrap(model), inputs, progress)  # the attack sets the victim's mode
        loss, logs = self.method.loss(model, inputs, prepared, progress)
        self.last_logs = logs  # detached tensors: no host sync per step (read them at logging time)
        if return_outputs:
            return loss, SequenceClassifierOutput(loss=cast(Any, loss), logits=None)
        return loss

    def log_values(self) -> dict[str, float]:
        """The method's schedules and adaptive values, as ``robust/<name>`` (ADR: ``robust/adr_tau``,
        ``robust/adr_lambda``; the same names as a recipe's ``metrics.jsonl``, prefixed)."""
        return {f"robust/{k}": float(v) for k, v in self.method.log_values(self.progress()).items()}


def _given_model(model: nn.Module | None, event: str) -> nn.Module:
    """The model ``transformers.Trainer`` hands a callback event (it always does)."""
    if model is None:
        raise ValueError(f"RobustCallback.{event} needs the model: Trainer passes it as model=")
    return model


def _output_dir(args: TrainingArguments) -> str:
    """``TrainingArguments.output_dir`` (set by its own default when not given)."""
    if args.output_dir is None:
        raise ValueError("TrainingArguments(output_dir=None): RobustTrainer writes its EMA teacher there; give one")
    return str(args.output_dir)


def _label_column(dataset: Any) -> str | None:
    names = getattr(dataset, "column_names", None)
    if not isinstance(names, list):
        return None
    return next((c for c in ("labels", "label", "label_ids") if c in names), None)


def check_labels(model: nn.Module, datasets: dict[str, Any]) -> None:
    """Refuse, before training, a model whose ``num_labels`` does not fit a data set's labels (a
    ``ClassLabel`` with another class count, or a label outside ``0..num_labels-1``)."""
    import numpy as np

    num = getattr(getattr(unwrap(model), "config", None), "num_labels", None)
    if num is None:
        return
    for where, data in datasets.items():
        column = _label_column(data)
        if column is None:
            continue
        feature = getattr(data, "features", {}).get(column)
        classes = getattr(feature, "num_classes", None)
        if classes is not None and classes != num:
            raise ValueError(f"the model has num_labels={num} but the {where} column {column!r} has {classes} classes: "
                             f"build the model with num_labels={classes} (from_pretrained(..., num_labels={classes}))")
        values = np.asarray(data.with_format("numpy")[column]) if hasattr(data, "with_format") else np.asarray(
            data[column])
        if values.size and (values.min() < 0 or values.max() >= num):
            raise ValueError(f"the {where} column {column!r} has labels {int(values.min())}..{int(values.max())} but the "
                             f"model has num_labels={num} (labels 0..{num - 1}): build the model with "
                             f"num_labels={int(values.max()) + 1}, or drop unlabelled rows (label -1)")
        if values.size and classes is None and where.startswith("train") and int(values.max()) + 1 < num:
            raise ValueError(f"the model has num_labels={num} but the {where} column {column!r}'s labels are "
                             f"0..{int(values.max())}: build the model with num_labels={int(values.max()) + 1}, or cast "
                             f"the column to a ClassLabel with {num} names if the data lacks a class on purpose")


class RobustTrainer(Trainer):
    """``transformers.Trainer`` with a robust training loss (``robust=RobustConfig(...)``).

    Text models need ``processing_class`` (the tokenizer); image and audio models take their image
    processor or feature extractor there (the image task undoes its normalisation to attack raw pixels).
    Every evaluation's metrics also hold ``eval_clean_accuracy``, ``eval_robust_accuracy/<spec>`` for
    ``RobustConfig.eval_attacks``, ``eval_robust_num_examples`` and, with an EMA teacher, the EMA model's
    ``eval_ema_clean_accuracy`` / ``eval_ema_robust_accuracy/<spec>``; ``save_model`` also writes the EMA
    model (``<output_dir>/ema``, loadable with ``from_pretrained``; a PEFT adapter folder for a PEFT model).

    ``Trainer`` options that cannot apply to a robust loss are refused at construction:
    ``compute_loss_func``, ``label_smoothing_factor`` and ``use_legacy_prediction_loop``. The method's loss
    is a mean over the batch, so under gradient accumulation it is divided by the accumulation steps
    (``num_items_in_batch`` is not used, whatever the model's ``forward`` takes).
    """

    def __init__(self, *args: Any, robust: RobustConfig | None = None, **kwargs: Any):
        import inspect

        config = robust or RobustConfig()
        given = inspect.signature(Trainer.__init__).bind(self, *args, **kwargs).arguments
        self._refuse_options(config, given)  # before Trainer creates anything
        robust_part = None
        if given.get("model") is not None:  # bad settings fail here, before Trainer creates anything
            self._check_labels(given["model"], given)
            robust_part = RobustCallback(given["model"], given.get("processing_class"), config)
        super().__init__(*args, **kwargs)
        if robust_part is None:  # the model comes from model_init
            self._check_labels(self.student, given)
            robust_part = RobustCallback(self.student, self.processing_class, config)
        self.robust = robust_part
        self.add_callback(self.robust)
        # the method's loss is a per-batch mean: Trainer divides it by the accumulation steps only when this is off
        self.model_accepts_loss_kwargs = False
        self._robust_pending: tuple[Any, str] | None = None
        self._in_training = False
        self._eval_rounds = 0
        self._last_eval_step: int | None = None

    @staticmethod
    def _refuse_options(config: RobustConfig, given: dict[str, Any]) -> None:
        args = given.get("args")
        if given.get("compute_loss_func") is not None:
            raise ValueError("RobustTrainer(compute_loss_func=...): the training loss is the robust method's "
                             f"({config.method}); drop compute_loss_func, or use Trainer with RobustCallback")
        if args is None:
            return
        if args.label_smoothing_factor:
            raise ValueError(f"TrainingArguments(label_smoothing_factor={args.label_smoothing_factor}): the training "
                             f"loss is the robust method's ({config.method}), not Trainer's cross-entropy; set "
                             "label_smoothing_factor=0")
        if getattr(args, "use_legacy_prediction_loop", False):
            raise ValueError("TrainingArguments(use_legacy_prediction_loop=True): RobustTrainer adds its robust metrics "
                             "in evaluation_loop; set use_legacy_prediction_loop=False")
        metric = args.metric_for_best_model or ""
        if config.eval_every > 1 and any(k in metric for k in ("robust_accuracy", "clean_accuracy", "robust_num")):
            raise ValueError(f"metric_for_best_model={metric!r} is a robust metric, which RobustConfig(eval_every="
                             f"{config.eval_every}) leaves out of most evaluations: set eval_every=1")

    @staticmethod
    def _check_labels(model: nn.Module, given: dict[str, Any]) -> None:
        evals = given.get("eval_dataset")
        evals = evals if isinstance(evals, dict) else {"": evals}
        check_labels(model, {"train dataset's": given.get("train_dataset"),
                             **{f"eval dataset{f' {k!r}' if k else ''}'s": v for k, v in evals.items()}})

    @property
    def student(self) -> nn.Module:
        """The model being trained (``Trainer.model``)."""
        if self.model is None:
            raise ValueError("RobustTrainer has no model: give model= or model_init=")
        return self.model

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no checkpoint found in {self.args.output_dir} to resume from")
        self.robust.resume_from = str(resume_from_checkpoint) if resume_from_checkpoint else None
        self._in_training, self._eval_rounds, self._last_eval_step = True, 0, None
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self._in_training = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return self.robust.compute_loss(model, inputs, return_outputs)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:
            logs = {**logs, **self.robust.log_values()}
        super().log(logs, *args, **kwargs)

    # -- evaluation ----------------------------------------------------------------------------
    def _robust_due(self) -> bool:
        if not self._in_training:
            return True
        if self.state.global_step != self._last_eval_step:  # a new evaluation round (all eval sets of a step)
            self._last_eval_step = self.state.global_step
            self._eval_rounds += 1
        return self._eval_rounds % self.robust.config.eval_every == 0

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        chosen = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(chosen, dict):  # Trainer evaluates each set through this method, prefix eval_<name>
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if isinstance(chosen, str):
            if not isinstance(self.eval_dataset, dict):
                raise ValueError(f"evaluate(eval_dataset={chosen!r}) names an evaluation set, but eval_dataset is not a "
                                 "dict of named sets")
            dataset = self.eval_dataset[chosen]
        else:
            dataset = chosen
        self._robust_pending = (dataset, metric_key_prefix) if self._robust_due() else None
        try:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._robust_pending = None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        pending, self._robust_pending = self._robust_pending, None
        if pending is not None:  # before Trainer logs the metrics and hands them to on_evaluate
            if output.metrics is None:
                raise RuntimeError("Trainer.evaluation_loop returned no metrics dict to add the robust metrics to")
            output.metrics.update(self._robust_metrics(*pending))
        return output

    def robust_points(self, dataset: Any) -> Any:
        """The evaluation points of the robust metrics: ``RobustConfig.eval_samples`` of ``dataset``, a sample
        seeded by ``TrainingArguments.seed`` (the same at every evaluation), in dataset order; all without it."""
        k = self.robust.config.eval_samples
        n = len(dataset)
        if k is None or k >= n:
            return dataset
        generator = torch.Generator().manual_seed(int(self.args.seed))
        idx = sorted(torch.randperm(n, generator=generator)[:k].tolist())
        if hasattr(dataset, "select"):
            return dataset.select(idx)
        return torch.utils.data.Subset(dataset, idx)

    def _robust_metrics(self, dataset: Any, prefix: str) -> dict[str, float]:
        from .trainer import ModelSource, evaluate_models

        cfg, task = self.robust.config, self.robust.task
        if not cfg.eval_attacks and self.robust.ema is None:
            return {}
        points = self.robust_points(dataset)
        loader = self.get_eval_dataloader(points)
        if points is not dataset and hasattr(self, "_eval_dataloaders"):
            self._eval_dataloaders.pop("eval", None)  # never reuse the sample's loader for the full evaluation
        attacks = self.robust.eval_attacks
        models: dict[str, ModelSource] = {"": unwrap(self.student)}
        if self.robust.ema is not None:
            models["ema_"] = ema_model(self.robust.ema)
        # attacks seeded by the run's seed (per batch); training's random state is left as it was
        flat = evaluate_models(task, models, loader, attacks, self.accelerator, seed=int(self.args.seed))
        out: dict[str, float] = {f"{prefix}_robust_num_examples": float(len(points))}
        for tag in models:
            out[f"{prefix}_{tag}clean_accuracy"] = flat[f"{tag}clean_accuracy"]
            for name, acc in flat.get(f"{tag}robust_accuracy", {}).items():
                out[f"{prefix}_{tag}robust_accuracy/{name}"] = acc
        return out

    # -- saving ----------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if not _internal_call:
            self._save_ema(output_dir or _output_dir(self.args))

    def _save_ema(self, output_dir: str) -> None:
        ema = self.robust.ema
        if ema is None or not self.args.should_save:
            return
        folder = os.path.join(output_dir, "ema")
        with ema_model(ema) as model:  # a transformers or PEFT model: it has save_pretrained
            cast(Any, model).save_pretrained(folder, safe_serialization=True)
        note = {"from_checkpoint": self.robust.ema_source, "global_step": int(self.state.global_step),
                "num_updates": ema.num_updates, "decay": ema.decay,
                "weights": "adapter" if isinstance(ema, AdapterEMATeacher) else "model"}
        Path(folder, EMA_NOTE).write_text(json.dumps(note, indent=2) + "\n")

    def push_to_hub(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.push_to_hub`` (it uploads ``output_dir``) with the EMA model in ``output_dir/ema`` too."""
        self._save_ema(_output_dir(self.args))
        return super().push_to_hub(*args, **kwargs)
