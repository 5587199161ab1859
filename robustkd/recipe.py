"""What every recipe shares: the common flags, the run, the final evaluation and the report.

A recipe is a few lines: make a parser with its defaults, add its own flags, and call
:func:`run_recipe`. The output directory then holds ``report.json``, ``metrics.jsonl``,
``training_curves.png``, ``schedule.png`` (when the method anneals anything), the final
weights (``model.safetensors``, ``ema.safetensors``) and resumable checkpoints.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from . import __version__
from .attacks.base import create_attack, split_attack_specs
from .distill.methods import METHODS, Method
from .eval.robustness import resolve_attacks
from .registry import TASKS, RegistryError
from .task import DataNotFoundError, Task
from .trainer import ConfigMismatchError, TrainConfig, Trainer
from .threat import eps_from_pixels


def common_parser(description: str, **defaults: Any) -> argparse.ArgumentParser:
    """The flags every recipe takes; ``defaults`` set a recipe's own (the paper's) values."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = {"dataset": "cifar10", "model": "resnet18", "method": "adr", "epochs": 200, "batch_size": 128, "lr": 0.1,
         "weight_decay": 5e-4, "eps": "8/255", "attack_step_size": "2/255", "attack_steps": 10,
         "eval_attacks": "pgd20", "final_attacks": "pgd20,autoattack", "output_dir": "runs/robustkd", **defaults}
    data = p.add_argument_group("data")
    data.add_argument("--dataset", default=d["dataset"], help=f"task name; registered: {', '.join(TASKS.names())}")
    data.add_argument("--data-dir", default=None, help="local copy of the data (needed offline); without it the "
                      "task loads its hub data set and fails at once, with this hint, when there is no network")
    data.add_argument("--task-kwargs", default=None, help='JSON options for the task, e.g. \'{"drop_empty": true}\', '
                      '\'{"image_column": "img"}\', \'{"downmix": true}\', \'{"encoding": "latin-1"}\'')
    data.add_argument("--max-train-samples", type=int, default=None, help="train on a seeded random subset")
    data.add_argument("--max-eval-samples", type=int, default=None, help="evaluate on a seeded random subset")
    model = p.add_argument_group("model and method")
    model.add_argument("--model", default=d["model"], help="model name for the task (e.g. small_cnn, resnet18, "
                       "preact_resnet18, wrn34_10, timm:<name>)")
    model.add_argument("--model-kwargs", default=None, help='JSON keyword arguments for the model factory, '
                       'e.g. \'{"width": 16}\' for small_cnn')
    model.add_argument("--method", default=d["method"], help=f"training method; registered: {', '.join(METHODS.names())}")
    model.add_argument("--awp", action="store_true", help="add adversarial weight perturbation (Wu et al. 2020)")
    model.add_argument("--awp-gamma", type=float, default=5e-3, help="AWP's relative weight-perturbation size")
    model.add_argument("--awp-warmup", type=int, default=0, help="epochs before AWP starts")
    model.add_argument("--ema-decay", type=float, default=None,
                       help="keep an EMA (weight-averaged) model with this decay; ADR uses 0.995 by default")
    model.add_argument("--ema-warmup", action="store_true", help="ramp the EMA decay as timm does, "
                       "min(decay, (1+t)/(10+t)), so short runs get a useful teacher (not in ADR's reference)")
    model.add_argument("--beta", type=float, default=6.0, help="TRADES' robustness weight (trades, adr_trades)")
    atk = p.add_argument_group("threat model")
    atk.add_argument("--eps", default=d["eps"], help="perturbation budget (8/255 or 0.031)")
    atk.add_argument("--norm", default="linf", choices=["linf", "l2"])
    atk.add_argument("--attack-steps", type=int, default=d["attack_steps"], help="PGD steps during training")
    atk.add_argument("--attack-step-size", default=d["attack_step_size"], help="PGD step size during training")
    atk.add_argument("--eval-attacks", default=d["eval_attacks"], help="attacks evaluated every --eval-every epochs "
                     "(comma-separated specs: pgd20, pgd:steps=50, fgsm, autoattack, ...)")
    atk.add_argument("--final-attacks", default=d["final_attacks"], help="attacks for the final report")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=d["epochs"])
    opt.add_argument("--batch-size", type=int, default=d["batch_size"])
    opt.add_argument("--eval-batch-size", type=int, default=256)
    opt.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    opt.add_argument("--lr", type=float, default=d["lr"])
    opt.add_argument("--momentum", type=float, default=0.9)
    opt.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    opt.add_argument("--lr-schedule", default="multistep", choices=["multistep", "cosine", "constant"])
    opt.add_argument("--milestones", default=None, help="LR decay epochs, comma-separated (default: 50%%,75%% of --epochs)")
    opt.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    opt.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    run = p.add_argument_group("run")
    run.add_argument("--output-dir", default=d["output_dir"])
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (0: only at the end)")
    run.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    run.add_argument("--overwrite", action="store_true", help="--output-dir holds another run: move it aside to "
                     "NAME.old-<time> (never deleted) and start afresh")
    run.add_argument("--max-nonfinite-steps", type=int, default=0, help="skip up to N steps whose loss is not "
                     "finite (normal with fp16); 0: stop at the first, keeping the last good checkpoint")
    run.add_argument("--log-with", default=None, help="an Accelerate tracker (tensorboard, wandb, ...)")
    run.add_argument("--cpu", action="store_true", help="force CPU even when a GPU is present")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def task_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``--task-kwargs`` as a dict (a JSON object), with a one-line error for anything else."""
    text = getattr(args, "task_kwargs", None)
    try:
        value = json.loads(text) if text else {}
    except ValueError as exc:
        raise ValueError(f"--task-kwargs {text!r} is not JSON ({exc}): write e.g. '{{\"drop_empty\": true}}'") from exc
    if not isinstance(value, dict):
        raise ValueError(f"--task-kwargs must be a JSON object like '{{\"drop_empty\": true}}', got {text!r}")
    return value


def build_task(args: argparse.Namespace, **kwargs: Any) -> Task:
    return TASKS.get(args.dataset)(data_dir=args.data_dir, **{**kwargs, **task_kwargs(args)})


def build_method(args: argparse.Namespace, task: Task, **kwargs: Any) -> Method:
    """The method with its training attack built from the threat-model flags."""
    from .attacks.pgd import PGD

    factory = METHODS.get(args.method)
    threat = task.threat_model(eps=eps_from_pixels(args.eps), norm=args.norm)
    step = eps_from_pixels(args.attack_step_size) if args.attack_step_size else None
    trades_like = args.method in ("trades", "adr_trades")
    attack = None
    if args.method != "standard":
        attack = PGD(task, threat, steps=args.attack_steps, step_size=step,
                     loss="kl" if trades_like else "ce", random_start="normal" if trades_like else "uniform")
    if trades_like:
        kwargs.setdefault("beta", args.beta)
    return factory(task, attack, **kwargs)


def train_config(args: argparse.Namespace) -> TrainConfig:
    milestones = [int(m) for m in args.milestones.split(",")] if args.milestones else None
    return TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size, optimizer=args.optimizer,
        lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, lr_schedule=args.lr_schedule,
        milestones=milestones, mixed_precision=args.mixed_precision, grad_accum=args.grad_accum,
        ema_decay=args.ema_decay, ema_warmup=getattr(args, "ema_warmup", False),
        awp_gamma=args.awp_gamma if args.awp else None, awp_warmup=args.awp_warmup,
        eval_every=args.eval_every, eval_attacks=_specs(args.eval_attacks), max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples, seed=args.seed, output_dir=args.output_dir, resume=args.resume,
        cpu=args.cpu, log_with=args.log_with, progress=not args.no_progress,
        overwrite=getattr(args, "overwrite", False), max_nonfinite_steps=getattr(args, "max_nonfinite_steps", 0))


_specs = split_attack_specs


def run_recipe(args: argparse.Namespace, task: Task | None = None, method: Method | None = None,
               model_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train, evaluate the final model (and EMA model) under ``--final-attacks``, write the report."""
    started = time.perf_counter()
    task = task or build_task(args)
    if model_kwargs is None:
        model_kwargs = json.loads(args.model_kwargs) if getattr(args, "model_kwargs", None) else {}
    model = task.build_model(args.model, **model_kwargs)
    method = method or build_method(args, task)
    final_attacks = resolve_attacks(_specs(args.final_attacks), task)  # typos fail now, not after training
    trainer = Trainer(task, model, method, train_config(args),
                      run_info={"model": args.model, "model_kwargs": model_kwargs, "dataset": args.dataset,
                                "data_dir": args.data_dir})
    history = trainer.fit()
    acc = trainer.accelerator
    final = trainer.evaluate_all(final_attacks, prefix_ema="ema/")
    report = build_report(args, trainer, final, history, final_attacks, time.perf_counter() - started)
    if acc.is_main_process:
        out = Path(args.output_dir)
        (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
        write_plots(out, history, trainer, title=f"{task.name} / {args.model} / {method.name}")
        acc.print(json.dumps({k: report[k] for k in ("method", "clean_accuracy", "robust_accuracy")} |
                             ({"ema": report["ema"]} if "ema" in report else {}), indent=1))
        acc.print(f"report: {out / 'report.json'}")
    return report


def build_report(args, trainer: Trainer, final: dict[str, Any], history: list[dict[str, Any]],
                 attacks: dict, seconds: float) -> dict[str, Any]:
    student = {k: v for k, v in final.items() if not k.startswith("ema/")}
    ema = {k[4:]: v for k, v in final.items() if k.startswith("ema/")}
    report: dict[str, Any] = {
        "robustkd_version": __version__, "task": trainer.task.name, "model": args.model,
        "method": trainer.method.name, "config": trainer.run_config(),
        **student,
        "attacks": {name: atk.describe() for name, atk in attacks.items()},
        "training": training_summary(history),
        "seconds": seconds, "torch_version": torch.__version__, "num_processes": trainer.accelerator.num_processes,
    }
    backends = {d.get("backend") for d in report["attacks"].values() if d.get("attack") == "autoattack"}
    if backends:
        report["autoattack_backend"] = backends.pop()
    if ema:
        report["ema"] = ema
    return report


def training_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Best vs final robust accuracy per evaluated attack: the robust-overfitting gap."""
    out: dict[str, Any] = {}
    for prefix in ("", "ema_"):
        rows = [h for h in history if f"{prefix}robust_accuracy" in h]
        if not rows:
            continue
        for name in rows[-1][f"{prefix}robust_accuracy"]:
            series = [(h["epoch"], h[f"{prefix}robust_accuracy"][name]) for h in rows if name in h[f"{prefix}robust_accuracy"]]
            best_epoch, best = max(series, key=lambda t: t[1])
            out[f"{prefix}{name}"] = {"best": best, "best_epoch": best_epoch, "final": series[-1][1],
                                      "overfitting_gap": best - series[-1][1]}
    return out


def write_plots(out: Path, history: list[dict[str, Any]], trainer: Trainer, title: str) -> None:
    from .eval.plots import plot_curves, plot_training_curves

    plot_training_curves(history, out / "training_curves.png", title)
    curve = getattr(trainer.method, "schedule_curve", None)
    if curve is not None:
        steps = list(range(0, trainer.total_steps + 1, max(1, trainer.total_steps // 200)))
        plot_curves(curve(steps, trainer.total_steps), steps, out / "schedule.png", "optimizer step",
                    f"{trainer.method.name} schedule")


def main_guard(main: Callable[[], Any]) -> None:
    """Run a recipe; known user errors print one clear line instead of a traceback."""
    try:
        main()
    except (DataNotFoundError, FileNotFoundError, RegistryError, ConfigMismatchError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
