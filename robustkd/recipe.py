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

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .callbacks import TrainerCallback
from .config import ConfigError, RunConfig, build_attacks, build_method, train_config
from .distill.methods import Method
from .eval.robustness import resolve_attacks
from .registry import TASKS, RegistryError
from .task import DataNotFoundError, Task
from .trainer import ConfigMismatchError, Trainer, for_each_model

#: report sections the final report writes itself; a callback's ``on_report`` may not give them
OWN_SECTIONS = ("run", "threat_models", "method", "ema")


def build_task(s: Mapping[str, Any], **kwargs: Any) -> Task:
    return TASKS.get(s["dataset"])(data_dir=s["data_dir"], **{**kwargs, **(s.get("task_kwargs") or {})})


def run_recipe(cfg: RunConfig, task: Task | None = None, method: Method | None = None, *,
               callbacks: Sequence[TrainerCallback] = ()) -> dict[str, Any]:
    """Train, then evaluate the model (and its EMA copy) under ``final_attacks`` with the evaluation
    suite; returns the model's report (with an ``ema`` summary when the run kept one).

    The run's threat model is ``cfg.threat`` (:attr:`robustkd.config.RunConfig.threat`, resolved once
    from the settings): the training attack's ball and the budget of every evaluation attack whose
    spec names none. ``callbacks`` (:class:`~robustkd.callbacks.TrainerCallback`) see the training
    events and the final report's: ``on_build_attacks`` (e.g. wrap each attack to measure it) and
    ``on_report`` (extra report sections)."""
    trainer = build_trainer(cfg, task, method, callbacks=callbacks)
    if trainer.accelerator.is_main_process:
        cfg.write(cfg.settings["output_dir"])
    trainer.fit()
    return final_report(cfg, trainer)


def build_trainer(cfg: RunConfig, task: Task | None = None, method: Method | None = None, *,
                  callbacks: Sequence[TrainerCallback] = ()) -> Trainer:
    """The run's task, model, method and :class:`Trainer`, built from the settings and nothing else,
    after seeding every random number generator with ``seed``: the same settings build the same
    initial weights, data order, augmentation and attack starts (bit for bit on a CPU). The threat
    model (``cfg.threat``) goes to the method's training attack and to the trainer's evaluation
    attacks; the final attacks are built here once to check them (a typo fails before training)."""
    from accelerate.utils import set_seed

    s = cfg.settings
    threat = cfg.threat_options()
    set_seed(s["seed"])  # before the model exists: its initial weights are drawn here
    task = task or build_task(s)
    set_seed(s["seed"])  # a task may draw random numbers while it loads; the model starts from the seed
    model = task.build_model(s["model"], **s["model_kwargs"])
    method = method or build_method(s, task, threat=threat)
    resolve_attacks(s["final_attacks"], task, **threat)  # typos fail now
    info = {"model": s["model"], "model_kwargs": s["model_kwargs"], "dataset": s["dataset"],
            "data_dir": s["data_dir"], "preset": cfg.preset}
    return Trainer(task, model, method, train_config(s, threat), run_info=info, callbacks=list(callbacks))


def final_report(cfg: RunConfig, trainer: Trainer) -> dict[str, Any]:
    """The final evaluation of a trained run through :func:`robustkd.eval.suite.run_evaluation`:
    ``report.json`` for the model, ``ema/report.json`` for the EMA copy (evaluated first, so the
    model's report points to it), each with the run's configuration and threat models and the
    sections of the trainer's callbacks (``on_build_attacks``, ``on_report``); the main process
    evaluates, the others wait."""
    from .cli import summary_text
    from .eval.suite import run_evaluation

    s, acc, task, method = cfg.settings, trainer.accelerator, trainer.task, trainer.method
    out = Path(s["output_dir"])
    report: dict[str, Any] = {}
    if acc.is_main_process:
        defaults = dict(trainer.config.eval_threat if trainer.config.eval_threat is not None else cfg.threat_options())
        train_threat = getattr(getattr(method, "attack", None), "threat", None)
        threat_section = {"train": train_threat.describe() if train_threat is not None else None,
                          "eval_default": {**defaults, "note": "evaluation attacks use this budget unless their "
                                                               "spec names one or the attack has its own norm"}}
        models = dict(reversed(list(trainer.models().items())))  # the EMA copy first
        reports: dict[str, dict[str, Any]] = {}
        write_schedule(out, trainer)  # before the reports: the run's report.html shows it

        def evaluate(which: str, net: nn.Module) -> dict[str, Any]:
            # each model's own attacks: they gather its statistics (AutoAttack's checks, measured budgets)
            attacks = trainer.callbacks.build_attacks(trainer, which, build_attacks(s["final_attacks"], task, defaults))
            extra: dict[str, Any] = {"run": cfg.to_dict(), "threat_models": threat_section,
                                     "method": method.describe()}
            sections = trainer.callbacks.report_sections(trainer, which, net, attacks)
            clash = sorted(set(sections) & set(OWN_SECTIONS))
            if clash:
                raise ValueError(f"a callback's on_report gives the report section(s) {', '.join(clash)}, which the "
                                 "report writes itself: rename them")
            extra.update(sections)
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
            return ev.report

        for_each_model(models, evaluate)
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
