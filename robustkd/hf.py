"""Robust fine-tuning inside ``transformers.Trainer``.

``RobustTrainer`` is a ``Trainer`` whose training loss is a robustkd :class:`~robustkd.distill.Method`
(ADR, PGD-AT, TRADES, MTARD, ...) run through a task built around the model and its processor;
everything else (evaluation, saving, ``resume_from_checkpoint``, ``accelerate launch``, logging)
is the ``Trainer``'s own. The EMA teacher, when the method keeps one, is saved in every checkpoint
folder and restored on resume.

Any Hugging Face classification model works whose task is registered: the task is the registered one
named by ``RobustConfig.task``, or else the one registered with ``hf_input=<the model's main_input_name>``
(the built-in plug-ins register ``hf_text`` for ``input_ids``, ``hf_image`` for ``pixel_values`` and
``hf_audio`` for ``input_values``). This module knows no modality itself.

For a ``Trainer`` subclass of your own, add :class:`RobustCallback` to its callbacks and call
``callback.compute_loss(model, inputs)`` from your ``compute_loss``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.trainer_utils import get_last_checkpoint

from .attacks.base import Attack, build_attacks, create_attack, parse_attack_spec
from .distill.methods import Method, Progress, create_method
from .registry import TASKS, RegistryError
from .task import Task
from .teachers import EMATeacher, unwrap

EMA_FILE = "robustkd_ema.safetensors"
STATE_FILE = "robustkd_state.pt"


@dataclass
class RobustConfig:
    """What to train robustly with: a registered method and attack spec, and the threat model.

    ``task`` names a registered task to build around the model (default: the one registered for the
    model's ``main_input_name``), with ``task_options`` (e.g. ``{"snr_db": 30}`` for audio);
    ``eps`` / ``norm`` set the task's threat model (for text: the per-token embedding ball, relative to
    each token embedding's norm) and so the default budget of the training and evaluation attacks;
    ``attack`` is an attack spec (default: the task's ``default_train_attack``); ``attack_steps`` the
    training attack's steps unless the spec names them; ``eval_attacks`` are run by ``evaluate()`` and
    reported as ``eval_robust_accuracy/<spec>``; ``method_kwargs`` go to the method (e.g. MTARD's
    ``clean_teacher``/``robust_teacher``).
    """

    method: str = "adr"
    attack: str | None = None
    eps: float | None = None
    norm: str | None = None
    task: str | None = None
    task_options: dict[str, Any] = field(default_factory=dict)
    attack_steps: int = 10
    ema_decay: float | None = None  # default 0.995 when the method needs an EMA teacher
    max_length: int = 512
    eval_attacks: tuple[str, ...] = ()
    method_kwargs: dict[str, Any] = field(default_factory=dict)


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


def _build_attack(config: RobustConfig, task: Task) -> Attack | None:
    """The method's training attack: ``config.attack`` with the method's own objective and start
    (robustkd/presets/methods.yaml, the one table of them); None for a method without one."""
    from .presets import method_defaults

    own = method_defaults(config.method).get("attack")
    if own is None:
        return None
    spec = config.attack or task.default_train_attack
    defaults: dict[str, Any] = {"steps": config.attack_steps}
    if parse_attack_spec(spec)[0] in ("embedding_pgd", "pgd"):
        defaults.update({k: own[k] for k in ("loss", "random_start", "init_std") if k in own})
    return create_attack(spec, task, **defaults)


class RobustCallback(TrainerCallback):
    """The robust part of training as a ``TrainerCallback``: builds the method, keeps the EMA
    teacher up to date after each optimizer step, saves it into each checkpoint and restores it on
    resume. ``compute_loss`` gives the method's loss for a batch."""

    def __init__(self, model: nn.Module, processor: Any = None, config: RobustConfig | None = None,
                 task: Task | None = None):
        from .presets import method_defaults

        self.config = config or RobustConfig()
        self.task = task or task_for_model(model, processor, self.config)
        own = method_defaults(self.config.method)  # the method's own attack mode and settings
        mode = {"attack_mode": own["attack"]["mode"]} if own.get("attack") else {}
        self.method: Method = create_method(self.config.method, self.task, _build_attack(self.config, self.task),
                                            **{**own["method_kwargs"], **mode, **self.config.method_kwargs})
        decay = self.config.ema_decay if self.config.ema_decay is not None else (0.995 if self.method.needs_ema else None)
        self.ema_decay = decay
        self.ema: EMATeacher | None = None
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
            self.ema = EMATeacher(model, self.ema_decay).to(device)
        for teacher in getattr(self.method, "teachers", []):
            teacher.to(device)
        self.method.setup(model, self.ema)
        self._ready = True

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, **kwargs: Any) -> None:
        self.state = state
        self._ready = False
        self.setup(model)
        path = self.resume_from
        if path is None and state.global_step > 0:
            candidate = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            path = str(candidate) if candidate.is_dir() else None
            if path is None:
                raise FileNotFoundError(f"training resumes at step {state.global_step} but {candidate} does not exist: "
                                        "set callback.resume_from to the checkpoint folder so its EMA teacher is restored")
        if path is not None:
            self.load(path)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: nn.Module | None = None, **kwargs: Any) -> None:
        if self.ema is not None:
            self.ema.update(model)
        self.method.after_step(model, self.progress(state))

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if args.should_save:
            self.save(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    # -- state ----------------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        """Write the EMA weights (safetensors) and the method / EMA counters into ``folder``."""
        from safetensors.torch import save_model

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.ema is not None:
            save_model(self.ema.model, str(folder / EMA_FILE))
        state = {"method": self.method.state_dict(),
                 "ema": {"num_updates": self.ema.num_updates, "decay": self.ema.decay} if self.ema else None}
        torch.save(state, folder / STATE_FILE)

    def load(self, folder: str | Path) -> None:
        """Restore what :meth:`save` wrote; a checkpoint without it is refused (no silent fresh EMA)."""
        from safetensors.torch import load_model

        folder = Path(folder)
        if not (folder / STATE_FILE).exists():
            raise FileNotFoundError(f"{folder} has no {STATE_FILE}: it was not written by RobustTrainer/RobustCallback, "
                                    "so the EMA teacher and method state cannot be restored")
        state = torch.load(folder / STATE_FILE, weights_only=True)
        if self.ema is not None:
            if not (folder / EMA_FILE).exists() or state["ema"] is None:
                raise FileNotFoundError(f"{folder} has no EMA teacher ({EMA_FILE}) but the method "
                                        f"{self.method.name!r} keeps one")
            missing, unexpected = load_model(self.ema.model, str(folder / EMA_FILE), strict=False)
            if missing or unexpected:
                raise ValueError(f"the EMA weights in {folder} do not fit the model (missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]})")
            self.ema.num_updates = int(state["ema"]["num_updates"])
        self.method.load_state_dict(state["method"])

    # -- the loss -------------------------------------------------------------------------
    def progress(self, state: TrainerState | None = None) -> Progress:
        state = state or self.state
        if state is None:
            return Progress()
        return Progress(step=int(state.global_step), total_steps=max(int(state.max_steps or 1), 1),
                        epoch=int(state.epoch or 0))

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any],
                     return_outputs: bool = False) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The method's robust loss in training; the plain cross-entropy (and logits) otherwise."""
        task = self.task
        if not model.training or not torch.is_grad_enabled():
            logits = task.logits(model, inputs)
            loss = torch.nn.functional.cross_entropy(logits, inputs["labels"]) if "labels" in inputs else None
            return (loss, SequenceClassifierOutput(loss=loss, logits=logits)) if return_outputs else loss
        self.setup(model)
        progress = self.progress()
        prepared = self.method.prepare(unwrap(model), inputs, progress)  # the attack sets the victim's mode
        loss, logs = self.method.loss(model, inputs, prepared, progress)
        self.last_logs = logs  # detached tensors: no host sync per step (read them at logging time)
        if return_outputs:
            return loss, SequenceClassifierOutput(loss=loss, logits=None)
        return loss

    def log_values(self) -> dict[str, float]:
        return {f"robust/{k}": float(v) for k, v in self.method.log_values(self.progress()).items()}


class RobustTrainer(Trainer):
    """``transformers.Trainer`` with a robust training loss (``robust=RobustConfig(...)``).

    Text models need ``processing_class`` (the tokenizer); image and audio models take their image processor
    or feature extractor there (the image task undoes its normalisation to attack raw pixels). ``evaluate()`` adds the EMA model's clean accuracy
    and ``eval_robust_accuracy/<spec>`` for ``RobustConfig.eval_attacks``; ``save_model`` also writes
    the EMA model (``<output_dir>/ema``, loadable with ``from_pretrained``).
    """

    def __init__(self, *args: Any, robust: RobustConfig | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.robust = RobustCallback(self.model, self.processing_class, robust)
        self.add_callback(self.robust)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no checkpoint found in {self.args.output_dir} to resume from")
        self.robust.resume_from = str(resume_from_checkpoint) if resume_from_checkpoint else None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return self.robust.compute_loss(model, inputs, return_outputs)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:
            logs = {**logs, **self.robust.log_values()}
        super().log(logs, *args, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        extra = self._robust_metrics(eval_dataset, metric_key_prefix)
        if extra:
            metrics.update(extra)
            self.log(extra)
        return metrics

    def _robust_metrics(self, eval_dataset: Any, prefix: str) -> dict[str, float]:
        from .eval.robustness import evaluate as robust_evaluate

        cfg, task = self.robust.config, self.robust.task
        if not cfg.eval_attacks and self.robust.ema is None:
            return {}
        loader = self.get_eval_dataloader(eval_dataset)
        attacks = build_attacks(cfg.eval_attacks, task)
        out: dict[str, float] = {}
        student = robust_evaluate(task, unwrap(self.model), loader, attacks, accelerator=self.accelerator)
        out[f"{prefix}_clean_accuracy"] = student["clean_accuracy"]
        for name, acc in student.get("robust_accuracy", {}).items():
            out[f"{prefix}_robust_accuracy/{name}"] = acc
        if self.robust.ema is not None:
            ema = robust_evaluate(task, self.robust.ema.model, loader, attacks, accelerator=self.accelerator)
            out[f"{prefix}_ema_clean_accuracy"] = ema["clean_accuracy"]
            for name, acc in ema.get("robust_accuracy", {}).items():
                out[f"{prefix}_ema_robust_accuracy/{name}"] = acc
        return out

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if not _internal_call:
            self._save_ema(output_dir or self.args.output_dir)

    def _save_ema(self, output_dir: str) -> None:
        if self.robust.ema is not None and self.args.should_save:
            self.robust.ema.model.save_pretrained(os.path.join(output_dir, "ema"), safe_serialization=True)

    def push_to_hub(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.push_to_hub`` (it uploads ``output_dir``) with the EMA model in ``output_dir/ema`` too."""
        self._save_ema(self.args.output_dir)
        return super().push_to_hub(*args, **kwargs)
