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
from pathlib import Path
from typing import Callable, Sequence

EXIT_USER_ERROR = 2
EXIT_SANITY_FAILED = 3


# -- eval ----------------------------------------------------------------------------------------
def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a trained model: robustness, calibration, consistency, sanity checks",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Evaluate a recipe's output directory and write report.json, PNG plots and "
                                   "report.html. Exit status 3 when a sanity check fails.")
    p.add_argument("--checkpoint", required=True, help="a recipe's --output-dir (robustkd.json + model weights)")
    p.add_argument("--task", default=None, help="task name; default: the one recorded in the checkpoint")
    p.add_argument("--data-dir", default=None, help="local data; default: the one recorded in the checkpoint")
    p.add_argument("--attacks", default=None, help="comma-separated attack specs, e.g. pgd20,autoattack or "
                   "pgd:steps=50,eps=4/255,autoattack (options after ':' belong to their attack; ';' also "
                   "separates); default: the task's evaluation attacks")
    p.add_argument("--split", default="test")
    p.add_argument("--max-eval-samples", type=int, default=None, help="a seeded random subset of the split")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--output-dir", required=True, help="where report.json, the PNGs and report.html go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--which", default="auto", choices=["auto", "student", "ema"],
                   help="which weights: auto takes the EMA model when the run kept one")
    p.add_argument("--curve-steps", type=int, default=10, help="PGD steps per budget of the accuracy-vs-budget curve")
    p.add_argument("--curve-factors", default=None,
                   help="budgets of the curve as multiples of the task's default, e.g. 0,0.5,1,2,4")
    p.add_argument("--cpu", action="store_true", help="evaluate on the CPU even when a GPU is present")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import read_meta
    from .eval.curves import DEFAULT_FACTORS
    from .eval.report import load_history
    from .eval.suite import load_checkpoint, run_evaluation, split_attack_specs
    from .registry import TASKS

    from .checkpoint import check_writable

    check_writable(args.output_dir)  # a file, read-only or full location fails now, not after the evaluation
    meta = read_meta(args.checkpoint)
    task_name = args.task or meta.get("task")
    if not task_name:
        raise ValueError(f"{args.checkpoint} records no task: pass --task")
    data_dir = args.data_dir if args.data_dir is not None else meta.get("data_dir")
    if args.task is None or args.data_dir is None:
        print(f"using task {task_name!r} and data {data_dir!r} recorded in {args.checkpoint}", file=sys.stderr)
    task = TASKS.get(task_name)(data_dir=data_dir)
    model, which = load_checkpoint(args.checkpoint, task, args.which)
    device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    factors = ([float(f) for f in args.curve_factors.split(",")] if args.curve_factors else DEFAULT_FACTORS)
    attacks = split_attack_specs(args.attacks) if args.attacks else None
    ev = run_evaluation(
        task, model, attacks, split=args.split, max_samples=args.max_eval_samples, batch_size=args.batch_size,
        seed=args.seed, device=device, curve_factors=factors, curve_steps=args.curve_steps,
        output_dir=args.output_dir, history=load_history(args.checkpoint), data_dir=data_dir,
        model_meta={"name": meta.get("model", type(model).__name__), "checkpoint": str(Path(args.checkpoint)),
                    "which": which, "method": meta.get("method"), "epochs": meta.get("epochs")},
        progress=not args.no_progress)
    print(summary_text(ev.report))
    print(f"report: {ev.files['report']}\npage:   {ev.files['html']}")
    return 0 if ev.passed else EXIT_SANITY_FAILED


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
    p = sub.add_parser("compare", help="print a table of the differences between two evaluation reports")
    p.add_argument("a", help="report.json or the --output-dir of `robustkd eval`")
    p.add_argument("b", help="report.json or the --output-dir of `robustkd eval`")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from .eval.report import compare, format_comparison, read_report

    settings, metrics = compare(read_report(args.a), read_report(args.b))
    print(f"A = {args.a}\nB = {args.b}\n")
    print(format_comparison(settings, metrics))
    return 0


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


# -- the parser ----------------------------------------------------------------------------------
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_eval_parser, add_compare_parser,
                                                                  add_list_parser]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="robustkd", description="Adversarially robust training through "
                                     "knowledge distillation: evaluate and inspect models.")
    parser.add_argument("--version", action="version", version=f"robustkd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``robustkd`` console script; returns the exit status."""
    from .registry import RegistryError
    from .task import DataNotFoundError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (DataNotFoundError, FileNotFoundError, RegistryError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TypeError as exc:
        if not str(exc).startswith("bad options for attack"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
