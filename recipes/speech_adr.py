"""ADR on spoken words: robust digit / keyword recognition against waveform attacks.

    accelerate launch recipes/speech_adr.py --dataset fsdd --data-dir ../shared/data/fsdd
    accelerate launch recipes/speech_adr.py --dataset speech_commands --data-dir ROOT

Trains a classifier on the raw waveform (the log-mel front-end is inside ``mel_cnn``) with
PGD against an SNR ball (``--train-snr-db``, default 30 dB) or, with ``--train-threat linf``, an
amplitude ball (``--eps``). Reports clean accuracy and PGD-20 robust accuracy at SNR 40 / 30 /
20 dB and at an L-inf amplitude budget (``--final-attacks``), with the SNR each adversarial
example actually achieved. ``--method`` picks standard, pgd_at, trades, adr, adr_trades, or
mtard (with ``--clean-teacher`` and ``--robust-teacher``).
"""
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from robustkd.attacks.speech import MeasuredAttack
from robustkd.callbacks import TrainerCallback
from robustkd.config import ConfigError, Recipe, parse
from robustkd.recipe import main_guard, run_recipe
from robustkd.registry import TASKS
from robustkd.task import Task

FINAL_ATTACKS = "pgd20:snr_db=40,pgd20:snr_db=30,pgd20:snr_db=20,pgd20:eps=0.002"


@dataclass
class AudioArgs:
    _argument_group_name = "audio"
    sample_rate: Optional[int] = field(default=None, metadata={
        "help": "rate the model sees (default: the data set's own: 8000 FSDD, 16000 Speech Commands)"})
    resample: bool = field(default=False, metadata={"help": "resample files whose rate differs from --sample-rate"})
    clip_seconds: float = field(default=1.0, metadata={"help": "fixed input length (centred pad / crop)"})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "also cache decoded waveforms on disk here"})
    train_threat: Literal["snr", "linf"] = field(default="snr", metadata={
        "help": "training attack's ball: SNR (--train-snr-db) or amplitude L-inf/L2 (--eps, --norm)"})
    train_snr_db: float = field(default=30.0, metadata={"help": "training SNR budget in dB"})
    width: Optional[int] = field(default=None, metadata={"help": "model width (mel_cnn, m5)"})
    weights: Optional[str] = field(default=None, metadata={"help": "local pretrained weights (wav2vec2)"})


def finalize(s: dict[str, Any]) -> None:
    """--width and --weights are model options."""
    s["model_kwargs"].update({k: s[k] for k in ("width", "weights") if s.get(k) is not None})


def training_threat(s: dict[str, Any]) -> dict[str, Any] | None:
    """The run's threat model: the SNR ball of --train-snr-db, or (--train-threat linf) --eps and --norm."""
    return {"snr_db": s["train_snr_db"]} if s["train_threat"] == "snr" else None


RECIPE = Recipe(__doc__.split("\n\n")[0], defaults=dict(
    dataset="fsdd", model="mel_cnn", method="adr", epochs=30, batch_size=64, lr=0.05, weight_decay=5e-4, eps="0.002",
    attack_step_size=None, attack_steps=10, eval_attacks="pgd10:snr_db=30", final_attacks=FINAL_ATTACKS,
    output_dir="runs/speech_adr"), extra=(AudioArgs,), finalize=finalize, threat=training_threat)


def build_speech_task(s: dict[str, Any]) -> Task:
    kwargs: dict[str, Any] = {"clip_seconds": s["clip_seconds"], "resample": s["resample"], "cache_dir": s["cache_dir"]}
    if s["sample_rate"] is not None:
        kwargs["sample_rate"] = s["sample_rate"]
    if s["train_threat"] == "snr":  # the task's own SNR ball: the budget of attacks whose spec names none
        if "snr_db" in (s.get("task_kwargs") or {}):
            raise ConfigError("--task-kwargs snr_db: the run's SNR budget is --train-snr-db; drop snr_db from "
                              "--task-kwargs")
        kwargs["snr_db"] = s["train_snr_db"]
    kwargs.update(s.get("task_kwargs") or {})  # --task-kwargs: e.g. {"downmix": true}
    task = TASKS.get(s["dataset"])(data_dir=s["data_dir"], **kwargs)
    if getattr(task, "sample_rate", None) is None:
        raise ConfigError(f"--dataset {s['dataset']!r} is not a waveform task; this recipe trains audio tasks "
                          "(fsdd, speech_commands, wavfolder)")
    return task


class SpeechReport(TrainerCallback):
    """The run's sample rate and clip length in its checkpoints and saved model; the report's
    ``achieved_snr`` (the SNR each final attack's examples actually reached, measured while the
    evaluation runs) and, in the model's report, ``data``."""

    def __init__(self, clip_seconds: float):
        self.clip_seconds = clip_seconds

    def on_init_end(self, trainer) -> None:
        trainer.run_info.update(sample_rate=trainer.task.sample_rate, clip_seconds=self.clip_seconds)

    def on_build_attacks(self, trainer, which: str, attacks):
        return {spec: MeasuredAttack(a) for spec, a in attacks.items()}

    def on_report(self, trainer, which: str, model, attacks) -> dict[str, Any]:
        sections: dict[str, Any] = {"achieved_snr": lambda: {spec: a.meter.summary() for spec, a in attacks.items()}}
        if which == "student":
            task = trainer.task
            sections["data"] = {"sample_rate": task.sample_rate, "clip_seconds": trainer.run_info.get("clip_seconds"),
                                "num_train": len(task.dataset("train")), "num_test": len(task.dataset("test"))}
        return sections


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse(RECIPE, argv)
    s = cfg.settings
    return run_recipe(cfg, task=build_speech_task(s), callbacks=[SpeechReport(s["clip_seconds"])])


if __name__ == "__main__":
    main_guard(main)
