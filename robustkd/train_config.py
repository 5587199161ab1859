"""The trainer's settings: :class:`TrainConfig`, every setting declared once with its help text and
``--help`` group.

Each field is also a recipe flag (``--grad-accum``), a key of a ``--config`` file, of a run's
``config.yaml`` and of a preset: :mod:`robustkd.config` builds the flags from these fields. Adding a
training setting is one :func:`setting` field here plus the code that uses it.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field
from typing import Any, Literal, Optional

__all__ = ["MODEL", "OPTIM", "RUN", "SPEED", "THREAT", "TrainConfig", "setting"]


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
    bn_no_decay: bool = setting(False, "no weight decay on the batch-norm parameters (ADR's reference with extra "
                                "data; the parameters named 'batchnorm', as in the PreAct-ResNet and WRN models)",
                                group=OPTIM)
    bn_momentum_schedule: bool = setting(False, "batch-norm momentum 1.0 at the first optimizer step, then 0.01 (ADR's "
                                         "reference with extra data)", group=OPTIM)
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
    save_every_steps: int = setting(0, "also write a checkpoint every N optimizer steps within an epoch (0: at "
                                    "epoch ends only); --resume continues from it exactly; SIGINT/SIGTERM write one "
                                    "after the current step whatever this is", group=RUN)
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

