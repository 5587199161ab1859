"""The ``robustkd`` command line: one subcommand per job, each a ``add_<name>_parser`` /
``cmd_<name>`` pair registered in :data:`SUBCOMMANDS` (add yours there).

    robustkd eval --task cifar10 --data-dir DIR --checkpoint RUN --attacks pgd20,autoattack --output-dir EVAL
    robustkd compare EVAL_A EVAL_B

Known user errors (missing data or checkpoint, unknown attack, mismatched model) print one
``error:`` line and exit 2; failed sanity checks exit 3 after writing the report.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .console import EXIT_INTERRUPTED, EXIT_SANITY_FAILED, EXIT_USER_ERROR, HelpFormatter, configure_logging

__all__ = ["EXIT_SANITY_FAILED", "EXIT_USER_ERROR", "build_parser", "configure_logging", "main"]


# -- eval ----------------------------------------------------------------------------------------
def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a trained model: robustness, calibration, consistency, sanity checks",
                       formatter_class=HelpFormatter,
                       description="Evaluate a model and write report.json, PNG plots and report.html to --output-dir. "
                                   "A recipe's run folder is evaluated through its EMA (weight-averaged) copy when the "
                                   "run kept one, else its student (--which chooses); a run that has not finished "
                                   "(no final weights) is evaluated from its last checkpoint, which is said. Exit "
                                   "status 2 for bad input, 3 when a sanity check fails (the report is written).")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="RUN", help="a recipe's --output-dir (finished or not), or one of its "
                        "checkpoints, RUN/checkpoints/epoch-N")
    source.add_argument("--model", help="a pretrained model the task loads: autoattack-example:resnet18, "
                        "robustbench:NAME (robustbench:L2/NAME), ARCH:WEIGHTS.pt (e.g. preact_resnet18:w.pt), "
                        "timm:NAME, a Hugging Face model directory (image or text classifier); needs --task")
    p.add_argument("--model-dir", default=None, help="robustbench:NAME only: where RobustBench models live "
                   "(MODEL_DIR/<dataset>/<threat>/<name>.pt, RobustBench's layout); offline, a missing file is an "
                   "error naming it")
    p.add_argument("--no-normalize", action="store_true", help="ARCH:WEIGHTS.pt only: the weights expect raw "
                   "[0, 1] pixels (no standardisation layer in front)")
    p.add_argument("--robustbench", action="store_true", help="RobustBench's leaderboard protocol: AutoAttack "
                   "standard at the leaderboard budget (--threat-model) on the first --max-eval-samples test points "
                   "(default: all 10,000); finished batches are kept under --output-dir, so a rerun resumes")
    p.add_argument("--threat-model", default=None, choices=["Linf", "L2"], help="with --robustbench or "
                   "robustbench:NAME: the leaderboard (default: Linf)")
    p.add_argument("--task", default=None, help="task name (robustkd list tasks); default: the one the run recorded")
    p.add_argument("--data-dir", default=None, help="local data; default: the one the run recorded")
    p.add_argument("--attacks", default=None, help="comma-separated attack specs, e.g. pgd20,autoattack or "
                   "pgd:steps=50,eps=4/255,autoattack (options after ':' belong to their attack; ';' also "
                   "separates); default: the task's evaluation attacks (images: pgd20,autoattack)")
    p.add_argument("--split", default="test", help="which split of the data to evaluate on")
    p.add_argument("--max-eval-samples", type=int, default=None, help="evaluate a random subset of this many "
                   "examples of the split, drawn with --seed (default: the whole split)")
    p.add_argument("--batch-size", type=int, default=128, help="examples per forward/attack batch: memory, "
                   "not results (the random starts are seeded per batch)")
    p.add_argument("--output-dir", required=True, help="where report.json, the PNGs and report.html go; a folder "
                   "holding another run or evaluation is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="move what --output-dir holds aside to "
                   "NAME.old-<time> (nothing is deleted) instead of refusing")
    p.add_argument("--seed", type=int, default=0, help="seeds the subset of --max-eval-samples and the attacks' "
                   "random starts: the same seed gives the same numbers")
    p.add_argument("--which", default="auto", choices=["auto", "student", "ema"],
                   help="--checkpoint only: which weights; auto takes the EMA copy when the run kept one, else the "
                        "student")
    p.add_argument("--curve-steps", type=int, default=10, help="PGD steps per budget of the accuracy-vs-budget curve")
    p.add_argument("--curve-factors", default=None,
                   help="budgets of the curve as multiples of the task's default (default: 0,0.25,0.5,1,1.5,2,4)")
    p.add_argument("--cpu", action="store_true", help="evaluate on the CPU even when a GPU is present")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from .checkpoint import (
        checkpoint_meta,
        eval_dir_lock,
        load_training_checkpoint,
        prepare_eval_dir,
        read_meta,
        training_checkpoint,
    )
    from .eval.schema import load_history
    from .eval.suite import load_checkpoint, run_evaluation, split_attack_specs
    from .registry import TASKS

    # a file, read-only or full location, another run's folder or one in use fails now, not after the evaluation
    moved = prepare_eval_dir(args.output_dir, overwrite=args.overwrite, checkpoint=args.checkpoint)
    if moved is not None:
        print(f"moved what {args.output_dir} held aside to {moved} (--overwrite)", file=sys.stderr)
    if args.checkpoint:
        for flag, given in (("--model-dir", args.model_dir), ("--no-normalize", args.no_normalize),
                            ("--threat-model", args.threat_model and not args.robustbench)):
            if given:
                raise ValueError(f"{flag} goes with --model (a pretrained model), not with --checkpoint: drop it")
    elif args.which != "auto":
        raise ValueError("--which chooses the weights of a --checkpoint run; a --model has one set: drop --which")
    ckpt = training_checkpoint(args.checkpoint) if args.checkpoint else None
    meta = (checkpoint_meta(ckpt) if ckpt is not None else read_meta(args.checkpoint)) if args.checkpoint else {}
    task_name = args.task or meta.get("task")
    if not task_name:
        raise ValueError("--model needs --task (e.g. --task cifar10 --data-dir DIR)" if args.model else
                         f"{args.checkpoint} records no task: pass --task")
    data_dir = args.data_dir if args.data_dir is not None else meta.get("data_dir")
    if args.checkpoint and (args.task is None or args.data_dir is None):
        print(f"using task {task_name!r} and data {data_dir!r} recorded in {args.checkpoint}", file=sys.stderr)
    task = TASKS.get(task_name)(data_dir=data_dir)
    loader = None
    attacks = split_attack_specs(args.attacks) if args.attacks is not None else None
    if attacks == []:  # `--attacks ""` must not mean "the default set"
        raise ValueError(f"--attacks {args.attacks!r} names no attack: give at least one (e.g. --attacks pgd20), or "
                         "leave --attacks out for the task's evaluation attacks")
    if args.robustbench:
        attacks, loader = robustbench_protocol(args, task)
    history = None
    if args.model:
        model, which = load_pretrained_model(task, args.model, args.model_dir, args.threat_model,
                                             no_normalize=args.no_normalize), None
        model_meta = {"name": args.model, "which": None, "pretrained": args.model,
                      **({"source": model.robustkd_source} if hasattr(model, "robustkd_source") else {})}
    elif ckpt is not None:
        model, which, history = load_training_checkpoint(ckpt, task, args.which)
        epoch = meta.get("checkpoint_epoch")
        print(f"{args.checkpoint}: evaluating the training checkpoint {ckpt} (epoch {epoch} of "
              f"{meta.get('epochs')}, {'EMA copy' if which == 'ema' else 'student'})"
              + ("" if Path(args.checkpoint).expanduser() == ckpt else ": the run has no final weights (not finished)"),
              file=sys.stderr)
        model_meta = {"name": meta.get("model", type(model).__name__), "checkpoint": str(ckpt), "which": which,
                      "method": meta.get("method"), "epochs": epoch, "planned_epochs": meta.get("epochs"),
                      **({"preset": meta["preset"]} if meta.get("preset") else {})}
    else:
        model, which = load_checkpoint(args.checkpoint, task, args.which)
        history = load_history(args.checkpoint)
        model_meta = {"name": meta.get("model", type(model).__name__), "checkpoint": str(Path(args.checkpoint)),
                      "which": which, "method": meta.get("method"), "epochs": meta.get("epochs"),
                      **({"preset": meta["preset"]} if meta.get("preset") else {})}
        if which == "ema":
            print(f"evaluating the run's EMA copy ({args.checkpoint}/ema.safetensors); --which student for the student",
                  file=sys.stderr)
    # under `accelerate launch` / torchrun this joins the process group: the points are split over processes
    import torch
    from accelerate import PartialState

    from .eval.curves import DEFAULT_FACTORS

    state = PartialState(cpu=args.cpu or not torch.cuda.is_available())
    device = state.device
    factors = ([float(f) for f in args.curve_factors.split(",")] if args.curve_factors else DEFAULT_FACTORS)
    with eval_dir_lock(args.output_dir, state.is_main_process):  # a second evaluation into it is refused
        ev = run_evaluation(
            task, model, attacks, loader=loader, split=args.split, max_samples=args.max_eval_samples,
            batch_size=args.batch_size, seed=args.seed, device=device, curve_factors=factors,
            curve_steps=args.curve_steps, output_dir=args.output_dir, history=history,
            data_dir=data_dir, model_meta=model_meta, progress=not args.no_progress,
            sections={"points": lambda: eval_points(task, args.split, args.max_eval_samples, args.seed,
                                                    first=args.threat_model if args.robustbench else None)})
    if not state.is_main_process:
        return 0  # the main process reports (and sets the exit status; a launcher turns 3 into its own failure)
    print(summary_text(ev.report))
    print(f"report: {ev.files['report']}\npage:   {ev.files['html']}")
    return 0 if ev.passed else EXIT_SANITY_FAILED


def load_pretrained_model(task, spec: str, model_dir: str | None, threat_model: str | None,
                          normalize: bool | None = None, no_normalize: bool = False):
    """``task.load_pretrained(spec)`` with only the options the user gave, or a clear error when the task
    does not know the spec or the spec takes none of them."""
    options: dict[str, Any] = {k: v for k, v in (("model_dir", model_dir), ("threat_model", threat_model))
                               if v is not None}
    if normalize is not None or no_normalize:
        options["normalize"] = False if no_normalize else normalize
    try:
        model = task.load_pretrained(spec, **options)
    except TypeError as exc:
        if not options:
            raise
        flags = ", ".join({"model_dir": "--model-dir", "threat_model": "--threat-model",
                           "normalize": "--no-normalize"}[k] for k in options)
        raise ValueError(f"the model {spec!r} of task {task.name!r} takes no {flags}: drop it ({exc})") from exc
    if model is None:
        raise ValueError(f"the task {task.name!r} does not know the model {spec!r}: pass autoattack-example:resnet18, "
                         "robustbench:NAME, ARCH:WEIGHTS.pt, timm:NAME or a Hugging Face model directory "
                         "(or --checkpoint for a robustkd run)")
    return model.eval()


def eval_points(task, split: str, max_samples: int | None, seed: int, first: str | None = None) -> dict:
    """The report's ``points`` section: how the evaluated points were chosen (the first N of RobustBench's
    protocol for the threat model ``first``, a seeded sample, all)."""
    from .robustbench import PROTOCOL, points_section

    total = len(task.dataset(split))
    if first is not None:
        n_ex = PROTOCOL.get((task.name, first), {}).get("n_ex", total)
        return points_section(split, total, min(max_samples or n_ex, total), how="first")
    if max_samples is not None and max_samples < total:
        return points_section(split, total, max_samples, how="seeded_sample", seed=seed)
    return points_section(split, total, total, how="all")


def robustbench_protocol(args: argparse.Namespace, task):
    """RobustBench's leaderboard protocol for ``robustkd eval --robustbench``: AutoAttack standard at the
    leaderboard budget on the *first* test points (not a random subset), in order."""
    from torch.utils.data import DataLoader, Subset

    from .robustbench import PROTOCOL

    args.threat_model = args.threat_model or "Linf"
    key = (task.name, args.threat_model)
    if key not in PROTOCOL:
        raise ValueError(f"RobustBench has no {args.threat_model} leaderboard for {task.name!r}; leaderboards: "
                         f"{', '.join(f'{d}/{t}' for d, t in PROTOCOL)}")
    if args.attacks is not None:
        raise ValueError("--robustbench fixes the attack (AutoAttack standard): drop --attacks")
    proto = PROTOCOL[key]
    data = task.dataset(args.split)
    n = min(args.max_eval_samples or proto["n_ex"], len(data))
    loader = DataLoader(Subset(data, range(n)), batch_size=args.batch_size, shuffle=False,
                        collate_fn=task.collate_fn(args.split))
    norm = {"Linf": "linf", "L2": "l2"}[args.threat_model]
    resume = Path(args.output_dir) / "autoattack-resume"
    print(f"RobustBench protocol: AutoAttack standard, {args.threat_model} eps={proto['eps']:.6g}, first {n} "
          f"{args.split} points (finished batches kept in {resume})", file=sys.stderr)
    from .attacks.autoattack import AutoAttack

    return {"autoattack": AutoAttack(task, eps=proto["eps"], norm=norm, resume_dir=resume)}, loader


def summary_text(report: dict) -> str:
    """The few numbers a person wants on the terminal."""
    m = report["metrics"]
    lines = [f"{report['task']['name']} / {report['model']['name']}: {report['task']['num_examples']} examples",
             f"  clean        accuracy {m['clean']['accuracy']:.4f}  ECE {m['clean']['ece']:.4f}"]
    for name, d in m["adversarial"].items():
        lines.append(f"  {name:<12} accuracy {d['accuracy']:.4f}  ECE {d['ece']:.4f}  KL {d['kl_clean_adv']:.4f}  "
                     f"agreement {d['agreement']:.4f}")
    if "worst_case" in m:
        lines.append(f"  worst case   accuracy {m['worst_case']['accuracy']:.4f}  ECE {m['worst_case']['ece']:.4f}")
    lines.append(f"  sanity checks: {'all passed' if report['sanity']['passed'] else 'FAILED'}")
    return "\n".join(lines)


# -- compare -------------------------------------------------------------------------------------
def add_compare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="print a table of the differences between two reports (run or eval directories)",
                       description="Compare two reports: a recipe's --output-dir, the --output-dir of `robustkd eval`, "
                                   "or a report.json, in any combination. Settings that differ are listed first.")
    p.add_argument("a", help="a run directory, an eval directory or a report.json")
    p.add_argument("b", help="a run directory, an eval directory or a report.json")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from .eval.compare import compare, describe, format_comparison, matching_view
    from .eval.schema import read_report

    first, second = read_report(args.a), read_report(args.b)
    a, note_a = matching_view(args.a, first, second)
    b, note_b = matching_view(args.b, second, first)
    print(f"A = {args.a}: {describe(a)}\nB = {args.b}: {describe(b)}")
    for note in (note_a, note_b):
        if note:
            print(f"(compared like with like: {note})")
    print()
    settings, metrics = compare(a, b)
    print(format_comparison(settings, metrics))
    return 0


# -- sweep ---------------------------------------------------------------------------------------
def add_sweep_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="run a study (variants x grid x seeds of a recipe), resumably; --report "
                       "aggregates it", formatter_class=HelpFormatter,
                       description="Run every unfinished cell of a study file (one recipe run per cell, each an "
                                   "ordinary run directory under the study's output_dir); finished cells are "
                                   "skipped and interrupted ones resume. With --report, aggregate the cells' "
                                   "report.json files into results.json, results.md (mean ± std, n) and plots "
                                   "instead. See docs/results.md and studies/*.yaml.")
    p.add_argument("study", help="the study's YAML file, e.g. studies/cifar_subset.yaml")
    p.add_argument("--report", action="store_true", help="aggregate the finished cells; run nothing")
    p.add_argument("--update-doc", action="append", default=None, metavar="FILE.md", help="with --report: also put "
                   "the table into FILE.md between the lines <!-- sweep:STUDY --> and <!-- /sweep:STUDY --> (STUDY: the "
                   "file's stem); repeat it for several pages")
    p.add_argument("--output-dir", default=None, help="where the cells and results go (default: the study's "
                   "output_dir, else runs/studies/<study name>)")
    p.add_argument("--jobs", type=int, default=1, help="cells run at the same time (each is one process, or one "
                   "`accelerate launch`)")
    p.add_argument("--dry-run", action="store_true", help="print the command of every unfinished cell and exit")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    import shlex

    from .sweep import document_block, load_study, run_sweep, update_document, write_results

    if args.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
    if args.update_doc and not args.report:
        raise ValueError("--update-doc goes with --report")
    study = load_study(args.study, args.output_dir)
    if args.report:
        command = shlex.join(["robustkd", "sweep", str(args.study), "--report",
                              *(["--output-dir", args.output_dir] if args.output_dir else []),
                              *[a for doc in args.update_doc or [] for a in ("--update-doc", doc)]])
        for doc in args.update_doc or []:
            document_block(doc, study)  # every page is checked before anything is written
        files = write_results(study, command)
        for i, doc in enumerate(args.update_doc or []):
            files[f"document{i + 1 if i else ''}"] = update_document(doc, study, files["markdown"].read_text())
        print(files["markdown"].read_text())
        print("\n".join(f"{k}: {v}" for k, v in files.items()))
        return 0
    outcome = run_sweep(study, jobs=args.jobs, dry_run=args.dry_run, progress=not args.no_progress)
    if args.dry_run:
        return 0
    print(f"{len(outcome.ran)} run, {len(outcome.skipped)} already finished (skipped), {len(outcome.failed)} failed "
          f"in {outcome.seconds:.0f} s; cells in {study.output_dir}")
    for key, rc, log in outcome.failed:
        print(f"  FAILED {key} (exit {rc}): {log}", file=sys.stderr)
    if not outcome.failed:
        print(f"aggregate: robustkd sweep {args.study} --report")
    return 1 if outcome.failed else 0


# -- list ----------------------------------------------------------------------------------------
REGISTRY_KINDS = ("tasks", "attacks", "methods", "models")


def add_list_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="show every registered task, attack, method and model and where it came from",
                       description="Every registered task, attack, method and model with a one-line description "
                                   "and its source (built-in or the plug-in package), then any plug-in that "
                                   "failed to load or registers a name another one already has.")
    p.add_argument("kinds", nargs="*", metavar="KIND", help=f"only these: {', '.join(REGISTRY_KINDS)}")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--strict", action="store_true", help="exit 1 when a plug-in failed to load (for plug-in CI)")
    p.set_defaults(func=cmd_list)


def registry_listing(kinds: Sequence[str] = REGISTRY_KINDS) -> dict:
    """``{kind: [{name, description, source}], "problems": [...]}`` after discovering every plug-in."""
    import warnings

    from . import registry
    from .attacks import base as _attacks  # noqa: F401 - registers the built-in attacks
    from .distill import methods as _methods  # noqa: F401 - registers the built-in methods

    registries = {"tasks": registry.TASKS, "attacks": registry.ATTACKS, "methods": registry.METHODS,
                  "models": registry.MODELS}
    if unknown := [k for k in kinds if k not in registries]:
        raise ValueError(f"unknown kind(s) {unknown}: choose from {', '.join(REGISTRY_KINDS)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # load errors are listed under "problems" instead
        for reg in registries.values():  # tasks first: task plug-ins also register their models
            reg.discover()
    out: dict = {k: [{"name": e.name, "description": e.description, "source": e.source}
                     for e in registries[k].entries()] for k in kinds}
    out["problems"] = [f"{reg.group}: {msg}" for reg in registries.values()
                       for msg in list(reg.load_errors.values())]
    out["problems"] += [f"{reg.group}: the name {name!r} is refused: {msg}" for reg in registries.values()
                        for name, msg in reg.conflicts.items() if msg not in reg.load_errors.values()]
    return out


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3].rstrip() + "..."


def cmd_list(args: argparse.Namespace) -> int:
    import json

    listing = registry_listing(args.kinds or REGISTRY_KINDS)
    if args.json:
        print(json.dumps(listing, indent=2))
    else:
        for kind in args.kinds or REGISTRY_KINDS:
            rows = listing[kind]
            print(f"{kind} ({len(rows)}; entry-point group robustkd.{kind})")
            w_name = max([len(r["name"]) for r in rows] + [4])
            w_src = max([len(r["source"]) for r in rows] + [6])
            for r in rows:
                print(f"  {r['name']:<{w_name}}  {r['source']:<{w_src}}  {_clip(r['description'], 110)}")
            print()
        if listing["problems"]:
            print(f"plug-ins that failed to load ({len(listing['problems'])}; the others above are usable)")
            for line in listing["problems"]:
                print(f"  {line}")
    return 1 if (args.strict and listing["problems"]) else 0


# -- presets -------------------------------------------------------------------------------------
def add_presets_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list the reference configurations (presets) recipes can start from",
                       description="Every reference configuration as a preset: each ADR config file and MTARD / "
                                   "B-MTARD CIFAR script, with its source file and settings. Start a recipe from "
                                   "one with --preset NAME; a flag given with it overrides one setting.")
    p.add_argument("name", nargs="?", default=None, help="show this preset's every setting (or a prefix, e.g. "
                   "adr/cifar100, to list those)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_presets)


def cmd_presets(args: argparse.Namespace) -> int:
    import json

    from .presets import get_preset, list_presets

    if args.name and not args.name.endswith("/") and not list_presets(args.name + "/"):
        preset = get_preset(args.name)
        if args.json:
            print(json.dumps(preset.to_dict(), indent=2))
            return 0
        print(f"{preset.name}: {preset.description}\nsource: {preset.source}")
        width = max(len(k) for k in preset.settings)
        for key, value in preset.settings.items():
            print(f"  {key:<{width}}  {json.dumps(value)}" + (f"    # {preset.lines[key]}" if key in preset.lines else ""))
        for kw in ("tau", "lam", "eta", "beta", "kl_scale", "temp_lr", "t_min", "t_max", "decay"):
            if kw in preset.lines:
                print(f"  {'':<{width}}  method_kwargs.{kw}: line {preset.lines[kw]}")
        if "attack" in preset.lines:
            print(f"  attack: {preset.lines['attack']}")
        for title, items in (("teachers", [f"{k}: {v}" for k, v in preset.teachers.items()]),
                             ("notes", preset.notes), ("not reproduced by robustkd", preset.unsupported)):
            if items:
                print(f"{title}:")
                for item in items:
                    print(f"  - {item}")
        return 0
    presets = list_presets(args.name.rstrip("/") + "/" if args.name else "")
    if args.json:
        print(json.dumps([{"name": p.name, "source": p.source, "description": p.description,
                           "settings": p.settings} for p in presets], indent=2))
        return 0
    width = max(len(p.name) for p in presets)
    for p in presets:
        print(f"{p.name:<{width}}  {p.source}")
        print(f"{'':<{width}}  {p.key_settings()}" + ("  [differs: see robustkd presets NAME]" if p.unsupported else ""))
    print(f"\n{len(presets)} presets; `robustkd presets NAME` shows every setting with its source line.")
    return 0


# -- export ------------------------------------------------------------------------------------
def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write an evaluation in another project's format (robustbench: model_info JSON)",
                       description="robustkd export robustbench EVAL_DIR writes RobustBench's "
                                   "model_info/<dataset>/<threat>/<name>.json from a `robustkd eval --robustbench` report.")
    p.add_argument("format", choices=["robustbench"])
    p.add_argument("eval_dir", help="the --output-dir of `robustkd eval --robustbench` (or its report.json)")
    p.add_argument("--name", default=None, help="the leaderboard entry's model name (file name); default: the eval "
                   "directory's name")
    p.add_argument("--paper", default="", help="the entry's title (RobustBench's 'name' field)")
    p.add_argument("--link", default="")
    p.add_argument("--authors", default="")
    p.add_argument("--venue", default="")
    p.add_argument("--architecture", default="", help="e.g. WideResNet-34-10; default: the model's name")
    p.add_argument("--additional-data", action="store_true", help="trained with data beyond the training split")
    p.add_argument("--allow-failed-sanity", action="store_true", help="export an evaluation whose sanity checks "
                   "failed (refused otherwise), with the failed checks named in the footnote")
    p.add_argument("--output-dir", default=None, help="where model_info/ goes; default: EVAL_DIR")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    import json

    from .eval.report import read_report
    from .robustbench import model_info, write_model_info

    report = read_report(args.eval_dir)
    base = Path(args.eval_dir)
    base = base.parent if base.is_file() else base
    info, threat, notes = model_info(report, name=args.paper, link=args.link, authors=args.authors, venue=args.venue,
                                     architecture=args.architecture, additional_data=args.additional_data,
                                     allow_failed_sanity=args.allow_failed_sanity)
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    path = write_model_info(info, args.output_dir or base, args.name or base.name, threat)
    print(json.dumps(info, indent=2))
    print(f"wrote {path}")
    return 0


# -- push ----------------------------------------------------------------------------------------
def add_push_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="put a run on the Hugging Face Hub: weights, robustkd.json, reports, model card",
                       description="Write a Hub folder for a recipe's output directory (model.safetensors, "
                                   "ema.safetensors, robustkd.json, report.json, README.md model card with the measured "
                                   "accuracies in model-index metadata) and push it. Offline (HF_HUB_OFFLINE=1) it only "
                                   "writes the folder and says how to push it later.")
    p.add_argument("run", help="a recipe's --output-dir")
    p.add_argument("--repo-id", required=True, help="the Hub repository, e.g. me/cifar10-adr")
    p.add_argument("--eval", default=None, help="the --output-dir of `robustkd eval` for this run: its accuracies and "
                   "ECE go into the model card")
    p.add_argument("--folder", default=None, help="where the Hub folder is written; default: RUN/hub. A folder "
                   "holding another run is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="move what --folder holds aside to NAME.old-<time> "
                   "(nothing is deleted) instead of refusing")
    p.add_argument("--private", action="store_true")
    p.set_defaults(func=cmd_push)


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_run

    folder, url = push_run(args.run, args.repo_id, eval_dir=args.eval, folder=args.folder,
                           private=args.private or None, overwrite=args.overwrite)
    files = ", ".join(sorted(p.name for p in folder.iterdir()))
    if url is None:
        print(f"offline (HF_HUB_OFFLINE=1): wrote a ready-to-push folder {folder} ({files}). Push it when online with:\n"
              f"  robustkd push {args.run} --repo-id {args.repo_id}\n"
              f"  (or: huggingface-cli upload {args.repo_id} {folder} .)")
    else:
        print(f"pushed {folder} ({files}) to {args.repo_id}: {url}")
    return 0


# -- the parser ----------------------------------------------------------------------------------
from .fidelity import add_fidelity_parser  # noqa: E402  (robustkd fidelity: the reference comparison)

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_eval_parser, add_compare_parser,
                                                                  add_list_parser, add_presets_parser, add_export_parser,
                                                                  add_push_parser, add_sweep_parser,
                                                                  add_fidelity_parser]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="robustkd", description="Adversarially robust training through "
                                     "knowledge distillation: evaluate and inspect models.")
    parser.add_argument("--version", action="version", version=f"robustkd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def _is_network_error(exc: BaseException) -> bool:
    """A failed connection of requests/urllib3/httpx/huggingface_hub (no network, no DNS, a timeout)."""
    for e in (exc, exc.__cause__, exc.__context__):
        if e is None:
            continue
        module = type(e).__module__.split(".")[0]
        name = type(e).__name__
        if module in ("requests", "urllib3", "httpx", "huggingface_hub", "httpcore") and any(
                k in name for k in ("Connect", "Timeout", "Offline", "NameResolution", "MaxRetry")):
            return True
    return False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``robustkd`` console script; returns the exit status."""
    from .registry import RegistryError
    from .task import DataNotFoundError

    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"error: interrupted: robustkd {args.command} stopped before it finished (run it again; a sweep "
              "and --robustbench continue where they stopped)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (DataNotFoundError, FileNotFoundError, RegistryError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TypeError as exc:
        if not str(exc).startswith("bad options for attack"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:  # noqa: BLE001 - only network failures are turned into one line; others re-raise
        if not _is_network_error(exc):
            raise
        print(f"error: robustkd {args.command} could not reach the network ({type(exc).__name__}). Offline, "
              "set HF_HUB_OFFLINE=1 (robustkd push then writes a ready-to-push folder and says how to push it "
              "later) and pass local paths", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
