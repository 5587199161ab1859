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
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from robustkd.attacks.base import create_attack
from robustkd.attacks.pgd import PGD
from robustkd.attacks.speech import MeasuredAttack
from robustkd.distill.methods import METHODS, Method
from robustkd.eval.robustness import evaluate, resolve_attacks
from robustkd.recipe import build_report, common_parser, main_guard, task_kwargs, train_config, write_plots
from robustkd.registry import TASKS
from robustkd.task import Task
from robustkd.teachers import unwrap
from robustkd.threat import eps_from_pixels
from robustkd.trainer import Trainer

FINAL_ATTACKS = "pgd20:snr_db=40,pgd20:snr_db=30,pgd20:snr_db=20,pgd20:eps=0.002"


def _specs(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()] if text else []


def parser() -> argparse.ArgumentParser:
    p = common_parser(__doc__.split("\n\n")[0], dataset="fsdd", model="mel_cnn", method="adr", epochs=30,
                      batch_size=64, lr=0.05, weight_decay=5e-4, eps="0.002", attack_step_size=None,
                      attack_steps=10, eval_attacks="pgd10:snr_db=30", final_attacks=FINAL_ATTACKS,
                      output_dir="runs/speech_adr")
    audio = p.add_argument_group("audio")
    audio.add_argument("--sample-rate", type=int, default=None,
                       help="rate the model sees (default: the data set's own: 8000 FSDD, 16000 Speech Commands)")
    audio.add_argument("--resample", action="store_true", help="resample files whose rate differs from --sample-rate")
    audio.add_argument("--clip-seconds", type=float, default=1.0, help="fixed input length (centred pad / crop)")
    audio.add_argument("--cache-dir", default=None, help="also cache decoded waveforms on disk here")
    audio.add_argument("--train-threat", default="snr", choices=["snr", "linf"],
                       help="training attack's ball: SNR (--train-snr-db) or amplitude L-inf/L2 (--eps, --norm)")
    audio.add_argument("--train-snr-db", type=float, default=30.0, help="training SNR budget in dB")
    audio.add_argument("--width", type=int, default=None, help="model width (mel_cnn, m5)")
    audio.add_argument("--weights", default=None, help="local pretrained weights (wav2vec2)")
    audio.add_argument("--clean-teacher", default=None, help="MTARD's clean teacher (a checkpoint folder or spec)")
    audio.add_argument("--robust-teacher", default=None, help="MTARD's robust teacher, or 'ema'")
    return p


def build_speech_task(args: argparse.Namespace) -> Task:
    kwargs: dict[str, Any] = {"clip_seconds": args.clip_seconds, "resample": args.resample,
                              "cache_dir": args.cache_dir}
    if args.sample_rate is not None:
        kwargs["sample_rate"] = args.sample_rate
    kwargs.update(task_kwargs(args))  # --task-kwargs: e.g. {"downmix": true}
    task = TASKS.get(args.dataset)(data_dir=args.data_dir, **kwargs)
    if task.modality != "audio":
        raise ValueError(f"--dataset {args.dataset!r} is a {task.modality} task; this recipe trains audio tasks "
                         f"({', '.join(n for n in TASKS.names() if n in ('fsdd', 'speech_commands', 'wavfolder'))})")
    return task


def build_speech_method(args: argparse.Namespace, task: Task) -> Method:
    """The method with its training attack in the waveform threat model the flags name."""
    if args.train_threat == "snr":
        threat = task.threat_model(snr_db=args.train_snr_db)
    else:
        threat = task.threat_model(eps=eps_from_pixels(args.eps), norm=args.norm)
    step = eps_from_pixels(args.attack_step_size) if args.attack_step_size else None
    trades_like = args.method in ("trades", "adr_trades")
    kwargs: dict[str, Any] = {}
    attack = None
    if args.method != "standard":
        attack = PGD(task, threat, steps=args.attack_steps, step_size=step, loss="kl" if trades_like else "ce",
                     random_start="normal" if trades_like or args.method == "mtard" else "uniform")
    if trades_like:
        kwargs["beta"] = args.beta
    if args.method == "mtard":
        kwargs.update(_mtard_teachers(args, task))
    return METHODS.get(args.method)(task, attack, **kwargs)


def _mtard_teachers(args: argparse.Namespace, task: Task) -> dict[str, Any]:
    if not args.clean_teacher or not args.robust_teacher:
        raise ValueError("--method mtard needs --clean-teacher and --robust-teacher (a checkpoint or 'ema')")
    from robustkd import teachers

    load = getattr(teachers, "load_teacher", None)
    if load is None:
        raise ValueError("this robustkd build has no robustkd.teachers.load_teacher to load MTARD's teachers")
    robust = "ema" if args.robust_teacher == "ema" else load(args.robust_teacher, task)
    return {"clean_teacher": load(args.clean_teacher, task), "robust_teacher": robust}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train, evaluate under ``--final-attacks`` measuring achieved SNR, and write the report
    (the common recipe flow, plus an ``achieved_snr`` section per attack)."""
    started = time.perf_counter()
    task = build_speech_task(args)
    model_kwargs = {k: v for k, v in (("width", args.width), ("weights", args.weights)) if v is not None}
    model = task.build_model(args.model, **model_kwargs)
    method = build_speech_method(args, task)
    resolve_attacks(_specs(args.final_attacks), task)  # typos fail now, not after training
    trainer = Trainer(task, model, method, train_config(args),
                      run_info={"model": args.model, "model_kwargs": model_kwargs, "dataset": args.dataset,
                                "data_dir": args.data_dir, "sample_rate": task.sample_rate,
                                "clip_seconds": args.clip_seconds, "train_threat": getattr(getattr(method.attack, "threat", None), "describe", dict)()})
    history = trainer.fit()
    acc = trainer.accelerator
    attacks = {spec: create_attack(spec, task) for spec in _specs(args.final_attacks)}
    student = {spec: MeasuredAttack(a) for spec, a in attacks.items()}
    final = evaluate(task, unwrap(trainer.model), trainer.eval_loader, student, accelerator=acc)
    ema_attacks: dict[str, MeasuredAttack] = {}
    if trainer.ema is not None:  # measured separately from the student's attacks
        ema_attacks = {spec: MeasuredAttack(a) for spec, a in attacks.items()}
        final.update({f"ema/{k}": v for k, v in
                      evaluate(task, trainer.ema.model, trainer.eval_loader, ema_attacks, accelerator=acc).items()})
    report = build_report(args, trainer, final, history, attacks, time.perf_counter() - started)
    report["achieved_snr"] = {spec: a.meter.summary() for spec, a in student.items()}
    if ema_attacks:
        report["ema"]["achieved_snr"] = {spec: a.meter.summary() for spec, a in ema_attacks.items()}
    report["data"] = {"sample_rate": task.sample_rate, "clip_seconds": args.clip_seconds,
                      "num_train": len(task.dataset("train")), "num_test": len(task.dataset("test"))}
    if acc.is_main_process:
        out = Path(args.output_dir)
        (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
        write_plots(out, history, trainer, title=f"{task.name} / {args.model} / {method.name}")
        summary = {k: report[k] for k in ("method", "clean_accuracy", "robust_accuracy")}
        if "ema" in report:
            summary["ema"] = {k: report["ema"][k] for k in ("clean_accuracy", "robust_accuracy")}
        acc.print(json.dumps(summary, indent=1))
        acc.print(f"report: {out / 'report.json'}")
    return report


def main() -> None:
    run(parser().parse_args())


if __name__ == "__main__":
    main_guard(main)
