"""What every recipe shares: the run, the final evaluation and the report.

A recipe is a few lines: declare a :class:`~robustkd.config.Recipe` (its description, default
preset, own defaults and extra flag groups), resolve the settings with
:func:`robustkd.config.parse`, and call :func:`run_recipe`. The output directory then holds
``config.yaml`` (the resolved settings, the preset and the overrides), ``metrics.jsonl``, the final
weights (``model.safetensors``, ``ema.safetensors``), resumable checkpoints and the versioned
``report.json`` of :func:`robustkd.eval.suite.run_evaluation` (the same as ``robustkd eval``
writes) for the model, with ``ema/report.json`` for its EMA copy, ``schedule.png`` when the
method anneals anything.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from .config import ConfigError, RunConfig, build_attacks, build_method, eval_attack_defaults, train_config
from .distill.methods import Method
from .eval.robustness import resolve_attacks
from .registry import TASKS, RegistryError
from .task import DataNotFoundError, Task
from .trainer import ConfigMismatchError, Trainer

#: A recipe's extra report sections: ``(trainer, which, model, attacks) -> {section: value}``; a value
#: may be a callable, called after the evaluation (e.g. statistics the attacks gathered).
Sections = Callable[[Trainer, str, nn.Module, Mapping[str, Any]], Mapping[str, Any]]


def build_task(s: Mapping[str, Any], **kwargs: Any) -> Task:
    return TASKS.get(s["dataset"])(data_dir=s["data_dir"], **{**kwargs, **(s.get("task_kwargs") or {})})


def run_recipe(cfg: RunConfig, task: Task | None = None, method: Method | None = None, *,
               threat: Any = None, relative_step: bool = False, sections: Sections | None = None,
               attack_wrapper: Callable[[Any], Any] | None = None, eval_threat: Mapping[str, Any] | None = None,
               run_info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Train, then evaluate the model (and its EMA copy) under ``final_attacks`` with the evaluation
    suite; returns the model's report (with an ``ema`` summary when the run kept one).

    ``threat`` is the training attack's threat model (default: ``eps`` and ``norm``);
    ``eval_threat`` the same as threat-model options (e.g. ``{"snr_db": 30}``), the budget of
    every evaluation attack whose spec names none (default: ``eps`` and ``norm``)."""
    trainer = build_trainer(cfg, task, method, threat=threat, relative_step=relative_step, eval_threat=eval_threat,
                            run_info=run_info)
    if trainer.accelerator.is_main_process:
        cfg.write(cfg.settings["output_dir"])
    trainer.fit()
    return final_report(cfg, trainer, sections=sections, attack_wrapper=attack_wrapper)


def build_trainer(cfg: RunConfig, task: Task | None = None, method: Method | None = None, *, threat: Any = None,
                  relative_step: bool = False, eval_threat: Mapping[str, Any] | None = None,
                  run_info: Mapping[str, Any] | None = None) -> Trainer:
    """The run's task, model, method and :class:`Trainer`, built from the settings and nothing else,
    after seeding every random number generator with ``seed``: the same settings build the same
    initial weights, data order, augmentation and attack starts (bit for bit on a CPU)."""
    from accelerate.utils import set_seed

    s = cfg.settings
    set_seed(s["seed"])  # before the model exists: its initial weights are drawn here
    task = task or build_task(s)
    set_seed(s["seed"])  # a task may draw random numbers while it loads; the model starts from the seed
    model = task.build_model(s["model"], **s["model_kwargs"])
    method = method or build_method(s, task, threat=threat, relative_step=relative_step)
    resolve_attacks(s["final_attacks"], task, **(eval_threat or eval_attack_defaults(s)))  # typos fail now
    info = {"model": s["model"], "model_kwargs": s["model_kwargs"], "dataset": s["dataset"],
            "data_dir": s["data_dir"], "preset": cfg.preset, **dict(run_info or {})}
    return Trainer(task, model, method, train_config(s, eval_threat), run_info=info)


def final_report(cfg: RunConfig, trainer: Trainer, *, sections: Sections | None = None,
                 attack_wrapper: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """The final evaluation of a trained run through :func:`robustkd.eval.suite.run_evaluation`:
    ``report.json`` for the model, ``ema/report.json`` for the EMA copy, each with the run's
    configuration and threat models; the main process evaluates, the others wait."""
    from .cli import summary_text
    from .eval.suite import run_evaluation
    from .teachers import unwrap

    s, acc, task, method = cfg.settings, trainer.accelerator, trainer.task, trainer.method
    out = Path(s["output_dir"])
    report: dict[str, Any] = {}
    if acc.is_main_process:
        defaults = dict(trainer.config.eval_threat or eval_attack_defaults(s))
        train_threat = getattr(getattr(method, "attack", None), "threat", None)
        threat_section = {"train": train_threat.describe() if train_threat is not None else None,
                          "eval_default": {**defaults, "note": "evaluation attacks use this budget unless their "
                                                               "spec names one or the attack has its own norm"}}
        models = [("student", unwrap(trainer.model))]
        if trainer.ema is not None:
            models.insert(0, ("ema", trainer.ema.model))  # first, so the model's report can point to it
        reports: dict[str, dict[str, Any]] = {}
        write_schedule(out, trainer)  # before the reports: the run's report.html shows it
        for which, net in models:
            attacks = build_attacks(s["final_attacks"], task, defaults)
            if attack_wrapper is not None:
                attacks = {spec: attack_wrapper(a) for spec, a in attacks.items()}
            extra: dict[str, Any] = {"run": cfg.to_dict(), "threat_models": threat_section,
                                     "method": method.describe()}
            if sections is not None:
                extra.update(sections(trainer, which, net, attacks))
            if which == "student" and "ema" in reports:
                extra["ema"] = {**_headline(reports["ema"]), "report": "ema/report.json"}
            ev = run_evaluation(
                task, net, attacks, max_samples=s["max_eval_samples"], batch_size=s["eval_batch_size"],
                seed=s["seed"], curve_steps=s["curve_steps"], output_dir=out if which == "student" else out / "ema",
                model_meta={"name": s["model"], "checkpoint": str(out), "which": which, "method": method.name,
                            "epochs": s["epochs"], "preset": cfg.preset},
                history=trainer.state.history, data_dir=s["data_dir"], progress=not s["no_progress"],
                sections=extra)
            reports[which] = ev.report
            acc.print(f"{which}: {summary_text(ev.report)}")
        report = reports["student"]
        acc.print(f"report: {out / 'report.json'}")
    acc.wait_for_everyone()
    return report


def _headline(report: Mapping[str, Any]) -> dict[str, Any]:
    m = report["metrics"]
    return {"clean_accuracy": m["clean"]["accuracy"],
            "robust_accuracy": {name: d["accuracy"] for name, d in m["adversarial"].items()}}


def write_schedule(out: Path, trainer: Trainer) -> None:
    """``schedule.png``: what the method anneals over the run (ADR's tau and lambda), when it does."""
    from .eval.plots import plot_curves

    curve = getattr(trainer.method, "schedule_curve", None)
    if curve is not None:
        steps = list(range(0, trainer.total_steps + 1, max(1, trainer.total_steps // 200)))
        plot_curves(curve(steps, trainer.total_steps), steps, out / "schedule.png", "optimizer step",
                    f"{trainer.method.name} schedule")


def main_guard(main: Callable[[], Any]) -> None:
    """Run a recipe with its status lines shown (robustkd's logger on stderr); known user errors print one
    clear line instead of a traceback, exit status 2; Ctrl-C one line, exit status 130. Under
    ``accelerate launch`` the launcher turns any non-zero status into its own 1 (with ``-q``, without its
    traceback): see the README's notes."""
    from .console import EXIT_INTERRUPTED, EXIT_USER_ERROR, configure_logging, fail

    configure_logging()
    try:
        main()
    except (ConfigError, DataNotFoundError, FileNotFoundError, RegistryError, ConfigMismatchError, ValueError) as exc:
        fail(str(exc), EXIT_USER_ERROR)
    except KeyboardInterrupt:
        fail("interrupted: the last finished epoch's checkpoint is kept; continue with --resume", EXIT_INTERRUPTED)
