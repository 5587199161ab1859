"""Studies: a grid of ordinary recipe runs (variants x grid values x seeds), resumable, and the
aggregate of their reports (mean, standard deviation and n per metric) as JSON, Markdown and plots.

A study is a YAML file (see ``studies/`` and docs/results.md)::

    description: PGD-AT vs ADR on the CIFAR-10 subset
    recipe: recipes/cifar_adr.py        # run as `python RECIPE --flag value ...`, one process per cell
    launcher: python                    # or `accelerate` (`accelerate launch [launch_args] RECIPE ...`)
    output_dir: runs/studies/cifar      # cells go to OUTPUT_DIR/<cell>/seed<k>
    results_dir: docs/results/cifar     # --report writes here (default: output_dir)
    seeds: [0, 1, 2]
    flags: {model: small_cnn, epochs: 30, data-dir: ../shared/data/cifar10/plain_text}
    variants:                           # a row of the table each: a method, a preset, any overrides
      pgd_at: {label: PGD-AT, flags: {method: pgd_at}}
      adr: {label: ADR, ema_label: ADR + WA, flags: {method: adr}}
    grid: {epochs: [5, 30]}             # optional: crossed with the variants

Flags are the recipe's own (``--method``, ``--preset``, ``--model-kwargs``, ...) and are passed
through as given: ``true`` is a bare switch, ``false``/``null`` leave the flag out, objects and lists
become JSON. The sweep owns ``--seed`` and ``--output-dir``. A cell is finished when its
``report.json`` is complete; a finished cell is never run again, and an interrupted one continues
from its last checkpoint (``--resume``).
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

STUDY_KEYS = {"description", "recipe", "launcher", "launch_args", "output_dir", "results_dir", "seeds", "flags",
              "variants", "grid", "pgd_metric", "title", "attack_columns", "baseline"}
VARIANT_KEYS = {"label", "ema_label", "flags", "after", "baseline", "runs"}
OWNED_FLAGS = {"seed", "output-dir"}
CELL_FILE = "sweep.json"
LOG_FILE = "sweep.log"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
SCATTER_PNG = "results_scatter.png"
CURVES_PNG = "results_curves.png"

# (key in results.json, column title); the table's columns in this order.
METRICS = [("clean", "clean"), ("pgd20", "PGD-20"), ("autoattack", "AutoAttack"), ("ece", "ECE (clean)"),
           ("consistency", "consistency (PGD-20 agreement)"), ("best_robust", "best robust (epoch-wise)"),
           ("best_epoch", "best epoch"), ("overfitting_gap", "best - final robust")]


class StudyError(ValueError):
    """A study file that cannot be run as written (the message names the key and the fix)."""


@dataclass
class Variant:
    name: str
    label: str
    flags: dict[str, Any]
    ema_label: str | None = None
    after: list[str] = field(default_factory=list)
    baseline: str | None = None  # the variant its paired differences are taken against (None: none)
    runs: Path | None = None  # runs made elsewhere (RUNS/seed<k>, e.g. another study's variant): read, never run


@dataclass
class Cell:
    """One run: a variant at one point of the grid with one seed, in its own output directory."""

    variant: Variant
    grid: dict[str, Any]
    seed: int
    dir: Path

    @property
    def key(self) -> str:
        return f"{self.dir.parent.name}/{self.dir.name}"

    @property
    def label(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.grid.items())
        return f"{self.variant.label} ({extra})" if extra else self.variant.label


@dataclass
class Study:
    path: Path
    recipe: Path
    output_dir: Path
    seeds: list[int]
    variants: list[Variant]
    flags: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    launcher: str = "python"
    launch_args: list[str] = field(default_factory=list)
    description: str = ""
    title: str = ""
    pgd_metric: str = "pgd20"
    results_dir: Path | None = None
    attack_columns: dict[str, str] = field(default_factory=dict)

    @property
    def pgd_title(self) -> str:
        return self.attack_columns.get(self.pgd_metric) or ("PGD-20" if self.pgd_metric == "pgd20" else self.pgd_metric)

    def columns(self) -> list[tuple[str, str]]:
        """(key, title) of the table's columns: clean, the PGD column, any ``attack_columns``, the rest, and the
        paired differences to the baseline when variants have one."""
        extra = [(f"attack:{spec}", title) for spec, title in self.attack_columns.items() if spec != self.pgd_metric]
        paired = ([("delta_clean", "Δ clean vs baseline (95 % CI)"), ("delta_pgd20", f"Δ {self.pgd_title} vs baseline "
                                                                                     "(95 % CI)")]
                  if any(v.baseline for v in self.variants) else [])
        rest = [(k, f"consistency ({self.pgd_title} agreement)" if k == "consistency" else t) for k, t in METRICS[2:]]
        return [METRICS[0], ("pgd20", self.pgd_title), *extra, *rest, *paired]

    def cells(self) -> list[Cell]:
        out = []
        points = [dict(zip(self.grid, values)) for values in itertools.product(*self.grid.values())] or [{}]
        # seed-major: a sweep stopped early has every row with some seeds rather than some rows complete
        for seed in self.seeds:
            for variant in self.variants:
                if variant.runs is not None:
                    out.append(Cell(variant, {}, seed, variant.runs / f"seed{seed}"))
                    continue
                for point in points:
                    out.append(Cell(variant, point, seed, self.output_dir / self.cell_name(variant.name, point)
                                    / f"seed{seed}"))
        return out

    @staticmethod
    def cell_name(variant: str, point: Mapping[str, Any]) -> str:
        return "__".join([variant, *(f"{_slug(k)}={_slug(v)}" for k, v in point.items())])


def _slug(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "x"


def _flag_name(key: str) -> str:
    return str(key).replace("_", "-").lstrip("-")


def _check_flags(flags: Any, where: str) -> dict[str, Any]:
    if flags is None:
        return {}
    if not isinstance(flags, Mapping):
        raise StudyError(f"{where} must be a mapping of recipe flag -> value (e.g. {{method: adr, epochs: 30}}), "
                         f"got {type(flags).__name__}")
    out = {_flag_name(k): v for k, v in flags.items()}
    if owned := OWNED_FLAGS & set(out):
        raise StudyError(f"{where} sets {', '.join('--' + f for f in sorted(owned))}: the sweep sets these per cell "
                         "(use `seeds:` and `output_dir:` instead)")
    return out


def _check_env(flags: Mapping[str, Any], where: str) -> None:
    for key, value in flags.items():
        for name in re.findall(r"\$\{?(\w+)\}?", value if isinstance(value, str) else ""):
            if name not in os.environ:
                raise StudyError(f"{where}.{key} uses ${{{name}}}, which is not set: export {name}=... (e.g. "
                                 f"ROBUSTKD_SHARED=../shared) or write the path")


def load_study(path: str | Path, output_dir: str | Path | None = None) -> Study:
    """Read and check a study file; every problem is a :class:`StudyError` raised before any work."""
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no study file at {path}: pass a YAML file such as studies/cifar_subset.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise StudyError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(raw, Mapping):
        raise StudyError(f"{path} must hold a mapping with at least `recipe`, `seeds` and `variants`")
    if unknown := set(raw) - STUDY_KEYS:
        raise StudyError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; a study takes "
                         f"{', '.join(sorted(STUDY_KEYS))}")
    for key in ("recipe", "seeds", "variants"):
        if key not in raw:
            raise StudyError(f"{path} has no `{key}`: a study names its recipe, its seeds and its variants")
    recipe = Path(str(raw["recipe"])).expanduser()
    if not recipe.is_absolute() and not recipe.exists() and (path.parent.parent / recipe).exists():
        recipe = path.parent.parent / recipe
    if not recipe.is_file():
        raise StudyError(f"{path}: recipe {raw['recipe']!r} does not exist (paths are relative to the directory you "
                         "run from, or to the study folder's parent)")
    seeds = raw["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds):
        raise StudyError(f"{path}: `seeds` must be a non-empty list of integers, e.g. [0, 1, 2]")
    if len(set(seeds)) != len(seeds):
        raise StudyError(f"{path}: `seeds` lists a seed twice")
    variants_raw = raw["variants"]
    if not isinstance(variants_raw, Mapping) or not variants_raw:
        raise StudyError(f"{path}: `variants` must map a name to {{label, flags}}, e.g. adr: {{flags: {{method: adr}}}}")
    variants = []
    for name, spec in variants_raw.items():
        spec = spec or {}
        if not isinstance(spec, Mapping) or (unknown := set(spec) - VARIANT_KEYS):
            raise StudyError(f"{path}: variant {name!r} takes {', '.join(sorted(VARIANT_KEYS))}"
                             + (f", not {', '.join(sorted(unknown))}" if isinstance(spec, Mapping) else ""))
        after = spec.get("after") or []
        if isinstance(after, str):
            after = [after]
        if not isinstance(after, list) or not all(isinstance(a, str) and a in variants_raw and a != name
                                                  for a in after):
            raise StudyError(f"{path}: variant {name!r}: `after` must name other variants of this study "
                             f"({', '.join(v for v in variants_raw if v != name)}), got {spec.get('after')!r}")
        baseline = spec.get("baseline", raw.get("baseline"))
        if baseline is not None and baseline not in variants_raw:
            raise StudyError(f"{path}: `baseline` {baseline!r} of variant {name!r} is not a variant of this study "
                             f"({', '.join(variants_raw)}); null for none")
        runs = spec.get("runs")
        if runs is not None and (not isinstance(runs, str) or spec.get("flags") or after or raw.get("grid")):
            raise StudyError(f"{path}: variant {name!r}: `runs` names a directory of runs made elsewhere "
                             "(RUNS/seed<k>/report.json); such a variant has no flags or `after` and the study no grid")
        variants.append(Variant(_slug(name), str(spec.get("label") or name),
                                _check_flags(spec.get("flags"), f"variants.{name}.flags"),
                                str(spec["ema_label"]) if spec.get("ema_label") else None,
                                [_slug(a) for a in after],
                                _slug(baseline) if baseline is not None and baseline != name else None,
                                Path(runs).expanduser() if runs is not None else None))
    if any(set(v.after) & {w.name for w in variants if w.after} for v in variants):
        raise StudyError(f"{path}: a variant's `after` names a variant that itself waits (`after`): one level only")
    grid_raw = raw.get("grid") or {}
    if not isinstance(grid_raw, Mapping) or not all(isinstance(v, list) and v for v in grid_raw.values()):
        raise StudyError(f"{path}: `grid` must map a recipe flag to a non-empty list of values, e.g. epochs: [5, 30]")
    grid = {_flag_name(k): list(v) for k, v in grid_raw.items()}
    if owned := OWNED_FLAGS & set(grid):
        raise StudyError(f"{path}: `grid` sets {', '.join(sorted(owned))}: use `seeds:` / `output_dir:`")
    _check_env(raw.get("flags") or {}, "flags")
    for v in variants:
        _check_env(v.flags, f"variants.{v.name}.flags")
    launcher = str(raw.get("launcher", "python"))
    if launcher not in ("python", "accelerate"):
        raise StudyError(f"{path}: launcher must be python or accelerate, not {launcher!r}")
    columns = raw.get("attack_columns") or {}
    if not isinstance(columns, Mapping) or not all(isinstance(v, str) for v in columns.values()):
        raise StudyError(f"{path}: `attack_columns` maps a final attack's spec to a column title, e.g. "
                         "{'pgd10:snr_db=40': 'SNR 40 dB'}")
    launch_args = raw.get("launch_args") or []
    if not isinstance(launch_args, list):
        raise StudyError(f"{path}: launch_args must be a list, e.g. [--num_processes, '2']")
    out = Path(output_dir or raw.get("output_dir") or Path("runs/studies") / path.stem).expanduser()
    results_dir = (out if output_dir else Path(raw["results_dir"]).expanduser()) if raw.get("results_dir") else out
    return Study(path=path, recipe=recipe, output_dir=out, seeds=list(seeds), variants=variants,
                 flags=_check_flags(raw.get("flags"), "flags"), grid=grid, launcher=launcher,
                 launch_args=[str(a) for a in launch_args], description=str(raw.get("description") or ""),
                 title=str(raw.get("title") or path.stem), pgd_metric=str(raw.get("pgd_metric") or "pgd20"),
                 results_dir=results_dir, attack_columns={str(k): v for k, v in columns.items()})


# -- checking the flags against the recipe ---------------------------------------------------------
def recipe_parser(recipe: str | Path) -> Any:
    """The argument parser of a recipe script, with argparse's abbreviations off (``--epoch`` is not
    ``--epochs``): the recipe's :class:`robustkd.config.Recipe` built into a parser, the script imported
    without running it. None when the script declares no ``Recipe`` (a script of the user's own)."""
    import importlib.util

    from .config import Recipe, build_parser

    path = Path(recipe)
    source = path.read_text(errors="replace")
    if "Recipe(" not in source or "robustkd.config" not in source:
        return None  # not a robustkd recipe: importing a script of unknown shape could run it
    spec = importlib.util.spec_from_file_location(f"_robustkd_sweep_recipe_{_slug(path.stem)}", path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - whatever the script raises on import, the study cannot be checked
        raise StudyError(f"the recipe {path} cannot be imported to check the study's flags "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})") from exc
    recipes = [v for v in vars(module).values() if isinstance(v, Recipe)]
    if len(recipes) != 1:
        return None
    parser = build_parser(recipes[0])
    parser.allow_abbrev = False
    return parser


def check_flags(study: Study) -> None:
    """Refuse, before any cell runs, a flag of the study or of a variant or grid point that the recipe does
    not take (a misspelt ``--epoch``, an abbreviation), a switch given a value or a valued flag given none:
    one :class:`StudyError` naming the variant, the flag and the recipe's nearest flags."""
    import argparse
    import difflib

    parser = recipe_parser(study.recipe)
    if parser is None:
        logger.warning("cannot check the study's flags: %s declares no robustkd.config.Recipe", study.recipe)
        return
    actions = {opt: a for a in parser._actions for opt in a.option_strings}
    points = [dict(zip(study.grid, values)) for values in itertools.product(*study.grid.values())] or [{}]
    for variant in (v for v in study.variants if v.runs is None):
        for point in points:
            for key, value in {**study.flags, **variant.flags, **point}.items():
                where = (f"variants.{variant.name}.flags" if key in variant.flags else
                         "grid" if key in point else "flags")
                action = actions.get(f"--{key}")
                if action is None:
                    near = difflib.get_close_matches(f"--{key}", [o for o in actions if o.startswith("--")], n=3)
                    raise StudyError(f"{study.path}: {where}: the recipe {study.recipe.name} has no flag --{key}"
                                     + (f" (did you mean {', '.join(near)}?)" if near else "")
                                     + f"; `python {study.recipe} --help` lists its flags")
                if value is None or value is False:
                    continue
                takes_value = action.nargs != 0 and not isinstance(action, (argparse._StoreTrueAction,
                                                                            argparse._StoreFalseAction,
                                                                            argparse._StoreConstAction))
                if value is True and takes_value and action.nargs != "?":
                    raise StudyError(f"{study.path}: {where}: --{key} takes a value, not `true`")
                if value is not True and not takes_value:
                    raise StudyError(f"{study.path}: {where}: --{key} is a switch: write `{key}: true` (or false)")
                if value is True or isinstance(value, (dict, list)) or re.search(r"[{$]", str(value)):
                    continue  # JSON values and placeholders ({seed}, $VAR) are the recipe's to check
                text = str(value)
                try:
                    converted = action.type(text) if callable(action.type) else text
                except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
                    raise StudyError(f"{study.path}: {where}: --{key} {text!r} is refused by the recipe "
                                     f"({str(exc) or type(exc).__name__})") from exc
                if action.choices is not None and converted not in action.choices:
                    raise StudyError(f"{study.path}: {where}: --{key} {text!r} is not one of "
                                     f"{', '.join(map(str, action.choices))}")


# -- running ---------------------------------------------------------------------------------------
def _expand(value: str, cell: Cell | None, study: Study | None) -> str:
    value = os.path.expandvars(value)
    if cell is not None:
        value = value.replace("{seed}", str(cell.seed))
    if study is not None:
        value = value.replace("{output_dir}", str(study.output_dir))
    return value


def _flag_args(flags: Mapping[str, Any], cell: Cell | None = None, study: Study | None = None) -> list[str]:
    """``{seed}`` in a value is the cell's seed and ``{output_dir}`` the study's output directory, so a variant
    can name another cell's run, e.g. ``robust-teacher: "{output_dir}/pgd_at/seed{seed}"``."""
    args: list[str] = []
    for key, value in flags.items():
        if value is None or value is False:
            continue
        if value is True:
            args.append(f"--{key}")
        elif isinstance(value, (dict, list)):
            args += [f"--{key}", json.dumps(value)]
        else:
            args += [f"--{key}", _expand(str(value), cell, study)]
    return args


def cell_command(study: Study, cell: Cell, resume: bool = False) -> list[str]:
    """The command line that runs ``cell``: study flags, then the variant's, then the grid point's."""
    flags = {**study.flags, **cell.variant.flags, **cell.grid}
    head = ([sys.executable, str(study.recipe)] if study.launcher == "python" else
            ["accelerate", "launch", *study.launch_args, str(study.recipe)])
    return [*head, *_flag_args(flags, cell, study), "--seed", str(cell.seed), "--output-dir", str(cell.dir),
            *(["--resume"] if resume else [])]


def read_cell_report(run_dir: str | Path) -> dict[str, Any] | None:
    """The cell's report when it is complete, else ``None``. Complete means: ``report.json`` parses and is
    either a valid schema-v1 report or a recipe's unversioned report with its final accuracies."""
    from .eval.schema import ReportSchemaError, validate_report

    path = Path(run_dir) / "report.json"
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return None
    if not isinstance(report, dict):
        return None
    if "schema_version" in report:
        try:
            validate_report(report)
        except ReportSchemaError:
            return None
        return report
    return report if "clean_accuracy" in report and "robust_accuracy" in report else None


LOCK_FILE = "sweep.lock"


def _locked_by_other(run_dir: Path) -> int | None:
    """The pid of a live process on this machine that holds the cell's lock (another sweep running it)."""
    try:
        pid = int((run_dir / LOCK_FILE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None  # a stale lock from a sweep that died
    except PermissionError:
        return pid
    return pid


def _run_cell(study: Study, cell: Cell, threads: int | None = None) -> tuple[Cell, int | None, float]:
    cell.dir.mkdir(parents=True, exist_ok=True)
    if read_cell_report(cell.dir) is not None or _locked_by_other(cell.dir):
        return cell, None, 0.0  # finished or taken by another sweep since the list was made
    resume = (cell.dir / "checkpoints").is_dir() and any((cell.dir / "checkpoints").iterdir())
    cmd = cell_command(study, cell, resume=resume)
    started = time.perf_counter()
    (cell.dir / LOCK_FILE).write_text(f"{os.getpid()}\n")  # this sweep runs the cell while it is alive
    with open(cell.dir / LOG_FILE, "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env).returncode
    (cell.dir / LOCK_FILE).unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    previous = _cell_meta(cell.dir)
    meta = {"command": shlex.join(cmd), "returncode": rc, "seconds": seconds,
            "seconds_total": previous.get("seconds_total", 0.0) + seconds, "resumed": resume,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (cell.dir / CELL_FILE).write_text(json.dumps(meta, indent=2))
    return cell, rc, seconds


def _cell_meta(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / CELL_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


@dataclass
class SweepOutcome:
    ran: list[str]
    skipped: list[str]
    failed: list[tuple[str, int, Path]]
    seconds: float


def run_sweep(study: Study, jobs: int = 1, dry_run: bool = False, progress: bool = True) -> SweepOutcome:
    """Run every unfinished cell (``jobs`` at a time); finished cells are skipped, never re-run."""
    from tqdm.auto import tqdm

    check_flags(study)  # a misspelt flag fails here, before any cell runs
    cells = study.cells()
    for cell in [c for c in cells if c.variant.runs is not None and read_cell_report(c.dir) is None]:
        logger.warning("no finished run at %s (variant %s reads runs made elsewhere; the sweep does not run it)",
                       cell.dir, cell.variant.name)
    cells = [c for c in cells if c.variant.runs is None]
    todo = [c for c in cells if read_cell_report(c.dir) is None]
    skipped = [c.key for c in cells if c not in todo]
    for key in skipped:
        logger.info("finished already, skipped: %s", key)
    for cell in [c for c in todo if _locked_by_other(c.dir)]:
        logger.info("being run by another process (%s), skipped: %s", cell.dir / LOCK_FILE, cell.key)
        todo.remove(cell)
        skipped.append(cell.key)
    if dry_run:
        for cell in todo:
            print(shlex.join(cell_command(study, cell)))
        return SweepOutcome([], skipped, [], 0.0)
    started = time.perf_counter()
    ran, failed = [], []
    # `jobs` processes share the machine: unless the user chose OMP_NUM_THREADS, each gets an equal share
    # of the cores instead of every process starting one thread per core (oversubscription is slower)
    threads = None if jobs <= 1 or "OMP_NUM_THREADS" in os.environ else max(1, (os.cpu_count() or 1) // jobs)
    # a variant with `after:` runs once the same-seed cells it names have finished: it is queued when the
    # last of them ends (behind the cells already queued), or at once when they finished in an earlier sweep
    by_name = {v.name: v for v in study.variants}

    def needs(cell: Cell) -> list[Path]:  # the same seed's (and grid point's) cells of the variants it runs after
        return [by_name[name].runs / cell.dir.name if by_name[name].runs is not None else
                study.output_dir / study.cell_name(name, cell.grid) / cell.dir.name for name in cell.variant.after]

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool, \
            tqdm(total=len(todo), desc=f"sweep {study.title}", unit="run", disable=not progress) as bar:
        pending = {c.dir for c in todo}  # cells this sweep has still to finish (queued, running or waiting)
        waiting = list(todo)
        futures: dict[Future, Cell] = {}

        def submit_ready() -> None:
            for cell in list(waiting):
                deps = needs(cell)
                if pending.intersection(deps):
                    continue  # a cell it runs after is still to run in this sweep
                waiting.remove(cell)
                if missing := [d for d in deps if read_cell_report(d) is None]:
                    bar.update(1)
                    failed.append((cell.key, -1, cell.dir / LOG_FILE))
                    logger.warning("NOT RUN %s: it runs after %s, which has no finished report", cell.key,
                                   ", ".join(f"{d.parent.name}/{d.name}" for d in missing))
                    pending.discard(cell.dir)
                else:
                    futures[pool.submit(_run_cell, study, cell, threads)] = cell

        submit_ready()
        while futures:
            done, _ = wait(futures, return_when=FIRST_COMPLETED)
            for future in done:
                cell, rc, seconds = future.result()
                del futures[future]
                pending.discard(cell.dir)
                bar.update(1)
                if rc is None:
                    skipped.append(cell.key)
                elif rc == 0 and read_cell_report(cell.dir) is not None:
                    ran.append(cell.key)
                    logger.info("finished %s in %.0f s", cell.key, seconds)
                else:
                    failed.append((cell.key, rc, cell.dir / LOG_FILE))
                    logger.warning("FAILED %s (exit %d): see %s", cell.key, rc, cell.dir / LOG_FILE)
            submit_ready()
    return SweepOutcome(ran, skipped, failed, time.perf_counter() - started)


# -- aggregating -----------------------------------------------------------------------------------
def _pick(adversarial: Mapping[str, Any], name: str) -> str | None:
    if name in adversarial:
        return name
    return next((k for k in adversarial if k.split(":")[0] == name), None)


def _first_auto(adversarial: Mapping[str, Any]) -> str | None:
    return next((k for k in adversarial if k.startswith("autoattack")), None)


def cell_metrics(report: Mapping[str, Any], view: str = "model", pgd: str = "pgd20",
                 run_dir: str | Path | None = None, attacks: Sequence[str] = ()) -> dict[str, float | None]:
    """The table's numbers for one cell: ``view`` is ``model`` (the trained model) or ``ema`` (its
    weight-averaged copy, from the run's ``ema/report.json``). Schema-v1 reports carry every metric; a
    recipe's unversioned report (robustkd before reports were unified) has no calibration or
    consistency, which then stay ``None`` (shown as not measured, never guessed)."""
    ema = view == "ema"
    out: dict[str, float | None] = {key: None for key, _ in METRICS}
    out.update({f"attack:{spec}": None for spec in attacks})
    if "schema_version" in report:
        source = report
        if ema:
            sub = read_cell_report(Path(run_dir) / "ema") if run_dir is not None else None
            if sub is None or "schema_version" not in sub:
                return {}
            source = sub
        metrics = source["metrics"]
        adversarial = metrics["adversarial"]
        out["clean"] = metrics["clean"]["accuracy"]
        out["ece"] = metrics["clean"]["ece"]
        if key := _pick(adversarial, pgd):
            out["pgd20"] = adversarial[key]["accuracy"]
            out["consistency"] = adversarial[key]["agreement"]
        if key := _first_auto(adversarial):
            out["autoattack"] = adversarial[key]["accuracy"]
        for spec in attacks:
            if spec in adversarial:
                out[f"attack:{spec}"] = adversarial[spec]["accuracy"]
        training = (report.get("training") or {}).get("robust_overfitting") or {}
    else:
        source = report.get("ema") if ema else report
        if not source:
            return {}
        robust = source.get("robust_accuracy") or {}
        out["clean"] = source.get("clean_accuracy")
        out["pgd20"] = robust.get(_pick(robust, pgd) or "")
        out["autoattack"] = robust.get(_first_auto(robust) or "")
        for spec in attacks:
            out[f"attack:{spec}"] = robust.get(spec)
        training = report.get("training") or {}
    series = [k for k in training if k.startswith("ema_") == ema]
    if series:
        gap = training[series[0]]
        out["best_robust"] = gap["best"]
        out["best_epoch"] = gap.get("best_epoch")
        out["overfitting_gap"] = gap["overfitting_gap"]
    return out


def attack_names(report: Mapping[str, Any]) -> list[str]:
    """The final attacks' specs of a cell's report (either format)."""
    if "schema_version" in report:
        return list(report["metrics"]["adversarial"])
    return list(report.get("robust_accuracy") or {})


def epoch_series(run_dir: Path, view: str = "model") -> tuple[str | None, list[tuple[int, float]]]:
    """(attack, [(epoch, robust accuracy)]) from the cell's metrics.jsonl."""
    from .eval.schema import load_history

    key = "ema_robust_accuracy" if view == "ema" else "robust_accuracy"
    rows = [h for h in (load_history(run_dir) or []) if h.get(key)]
    if not rows:
        return None, []
    name = next(iter(rows[-1][key]))
    return name, [(h["epoch"], h[key][name]) for h in rows if name in h[key]]


# Student's t 0.975 quantiles for 1..10 degrees of freedom (beyond: the normal 1.96 is within 4 % of t)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def summarize(values: Sequence[float | None]) -> dict[str, Any]:
    """mean, sample standard deviation (None for n < 2), the half-width of the 95 % t-interval of the mean
    (``ci95``; None for n < 2), n and the values themselves."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    std = statistics.stdev(vals) if len(vals) > 1 else None
    t = _T975[len(vals) - 2] if 1 < len(vals) <= len(_T975) + 1 else 1.96
    return {"mean": statistics.fmean(vals) if vals else None, "std": std,
            "ci95": t * std / math.sqrt(len(vals)) if std is not None else None, "n": len(vals), "values": vals}


def aggregate(study: Study) -> dict[str, Any]:
    """Every cell's numbers and, per table row (variant x grid point, and its EMA view), their summary."""
    cells_out, rows, curves = [], [], {}
    groups: dict[tuple[str, str], list[Cell]] = {}
    for cell in study.cells():
        groups.setdefault((cell.variant.name, cell.dir.parent.name), []).append(cell)
    baselines = {v.baseline for v in study.variants}
    order = sorted(groups, key=lambda k: k[0] not in baselines)  # baselines' cells first, for the pairing
    rows_at = {key: i for i, key in enumerate(groups)}
    for key in order:
        cells = groups[key]
        views = [("model", cells[0].label)]
        if cells[0].variant.ema_label:
            extra = ", ".join(f"{k}={v}" for k, v in cells[0].grid.items())
            views.append(("ema", f"{cells[0].variant.ema_label} ({extra})" if extra else cells[0].variant.ema_label))
        for view, label in views:
            per_cell, epoch_rows, attack = [], {}, None
            for cell in cells:
                report = read_cell_report(cell.dir)
                entry = {"row": label, "view": view, "variant": cell.variant.name, "grid": cell.grid,
                         "seed": cell.seed, "dir": str(cell.dir), "finished": report is not None}
                if report is not None:
                    entry["report_format"] = (f"schema v{report['schema_version']}" if "schema_version" in report
                                              else "recipe (unversioned)")
                    entry["metrics"] = cell_metrics(report, view, study.pgd_metric, cell.dir,
                                                    list(study.attack_columns))
                    entry["attacks"] = attack_names(report)
                    meta = _cell_meta(cell.dir)
                    entry["seconds"] = meta.get("seconds_total", report.get("seconds"))
                    name, series = epoch_series(cell.dir, view)
                    attack = attack or name
                    for epoch, acc in series:
                        epoch_rows.setdefault(epoch, []).append(acc)
                per_cell.append(entry)
                cells_out.append(entry)
            done = [e for e in per_cell if e["finished"] and e["metrics"]]
            for e in done:  # paired with the baseline's model at the same grid point and seed
                base = next((b for b in cells_out if b["variant"] == cells[0].variant.baseline and b["view"] == "model"
                             and b["grid"] == e["grid"] and b["seed"] == e["seed"] and b.get("metrics")), None)
                for delta, col in (("delta_clean", "clean"), ("delta_pgd20", "pgd20")):
                    if base is not None and None not in (e["metrics"].get(col), base["metrics"].get(col)):
                        e["metrics"][delta] = e["metrics"][col] - base["metrics"][col]
            rows.append({"order": (rows_at[key], view != "model"),
                         "label": label, "view": view, "variant": cells[0].variant.name, "grid": cells[0].grid,
                         "n_cells": len(cells), "n_finished": len(done),
                         "metrics": {key: summarize([e["metrics"].get(key) for e in done])
                                     for key, _ in study.columns()}})
            epochs = sorted(epoch_rows)
            stats = [summarize(epoch_rows[e]) for e in epochs]
            curves[label] = {"attack": attack, "epoch": epochs, "mean": [s["mean"] for s in stats],
                             "std": [s["std"] for s in stats], "n": [s["n"] for s in stats]}
    rows.sort(key=lambda r: r.pop("order"))  # back to the study's order
    curves = {r["label"]: curves[r["label"]] for r in rows}
    seconds = sum(e.get("seconds") or 0.0 for e in cells_out if e["view"] == "model")
    spans = []  # (start, end) of every finished cell's last process, from its sweep.json
    for cell in study.cells():
        meta = _cell_meta(cell.dir)
        try:
            end = datetime.strptime(meta["finished"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
            spans.append((end - float(meta["seconds"]), end))
        except (KeyError, ValueError, TypeError):
            continue
    return {"study": str(study.path), "title": study.title, "description": study.description,
            "recipe": str(study.recipe), "seeds": study.seeds, "flags": study.flags, "grid": study.grid,
            "metrics": dict(study.columns()), "columns": study.columns(), "rows": rows,
            "baselines": {v.label: next(w.label for w in study.variants if w.name == v.baseline)
                          for v in study.variants if v.baseline}, "cells": cells_out, "curves": curves,
            "compute_seconds": seconds,
            "wall_seconds": max(e for _, e in spans) - min(b for b, _ in spans) if spans else None,
            "finished_utc": (datetime.fromtimestamp(max(e for _, e in spans), timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
                             if spans else None)}


def _cell_text(s: Mapping[str, Any], key: str = "") -> str:
    if not s["n"]:
        return "—"
    if key == "best_epoch":  # an epoch per seed, in seed order: a mean of epochs says less than the list
        return ", ".join(f"{v:.0f}" for v in s["values"])
    if key.startswith("delta_"):  # a paired difference: its mean and 95 % t-interval
        if s["ci95"] is None:
            return f"{s['mean']:+.3f} (n={s['n']})"
        return f"{s['mean']:+.3f} [{s['mean'] - s['ci95']:+.3f}, {s['mean'] + s['ci95']:+.3f}] (n={s['n']})"
    if s["std"] is None:
        return f"{s['mean']:.3f} (n={s['n']})"
    return f"{s['mean']:.3f} ± {s['std']:.3f} (n={s['n']})"


def markdown_table(results: Mapping[str, Any]) -> str:
    """The results table: one row per variant (and EMA view), mean ± sample std (n) per metric; columns
    that no cell measured are left out and named under the table."""
    every = [tuple(c) for c in results.get("columns", METRICS)]
    columns = [(k, t) for k, t in every if any(r["metrics"][k]["n"] for r in results["rows"])]
    missing = [t for k, t in every if (k, t) not in columns]
    lines = ["| model | " + " | ".join(t for _, t in columns) + " |",
             "| --- |" + " --- |" * len(columns)]
    for row in results["rows"]:
        lines.append(f"| {row['label']} | " + " | ".join(_cell_text(row["metrics"][k], k) for k, _ in columns) + " |")
    if missing:
        lines.append("")
        lines.append(f"Not measured in these cells: {', '.join(missing)}.")
    if pairs := results.get("baselines"):
        lines.append("")
        by_base: dict[str, list[str]] = {}
        for row, base in pairs.items():
            by_base.setdefault(base, []).append(row)
        named = (f"the baseline, {next(iter(by_base))}" if len(by_base) == 1 else
                 "its baseline (" + "; ".join(f"{base} for {' / '.join(rows)}" for base, rows in by_base.items()) + ")")
        lines.append(f"Δ columns: each seed's model (or its EMA, in + WA rows) minus the same seed's model of {named}, "
                     "averaged over seeds, with the 95 % t-interval of that mean.")
    specs = sorted({a for e in results["cells"] for a in e.get("attacks", [])})
    if specs:
        lines.append("")
        lines.append("Final attacks: " + ", ".join(f"`{a}`" for a in specs) + ".")
    return "\n".join(lines)


def check_replaces(study: Study, out: Path, finished: int, total: int) -> None:
    """Refuse to write results that would replace measured ones with fewer: no finished cell at all, or
    fewer finished runs than the ``results.json`` already in ``out`` (e.g. the tables committed under
    docs/results/ on a fresh clone). Nothing is written then."""
    where = f"under {study.output_dir}"
    if finished == 0:
        raise StudyError(f"no run of {study.path} has finished {where} (0 of {total}): run `robustkd sweep "
                         f"{study.path}` first (or pass --output-dir where its runs are); nothing was written, "
                         f"{out} is unchanged")
    try:
        previous = json.loads((out / RESULTS_JSON).read_text())
        before = sum(bool(e.get("finished")) for e in previous.get("cells", []) if e.get("view") == "model")
    except (OSError, ValueError, AttributeError, TypeError):
        return
    if before > finished:
        raise StudyError(f"{out / RESULTS_JSON} holds {before} finished runs but only {finished} of {total} have "
                         f"finished {where}: nothing was written. Finish the sweep (`robustkd sweep {study.path}`), "
                         f"or pass --output-dir DIR to aggregate the runs in DIR into DIR instead")


def write_results(study: Study, command: str | None = None) -> dict[str, Path]:
    """``results.json``, ``results.md`` and the two plots into the study's output directory."""
    from .checkpoint import atomic_write_text
    from .eval.plots import band_figure, save_figure, scatter_figure

    results = aggregate(study)
    results["command"] = command or f"robustkd sweep {study.path} --report"
    out = study.results_dir or study.output_dir
    finished = sum(e["finished"] for e in results["cells"] if e["view"] == "model")
    total = sum(1 for e in results["cells"] if e["view"] == "model")
    check_replaces(study, out, finished, total)
    out.mkdir(parents=True, exist_ok=True)
    attack = next((c["attack"] for c in results["curves"].values() if c["attack"]), "robust")
    save_figure(scatter_figure(results["rows"], "clean", "pgd20", title=f"{study.title}\nPGD-20 vs clean"),
                out / SCATTER_PNG)
    has_curves = any(c["epoch"] for c in results["curves"].values())
    if has_curves:
        save_figure(band_figure(results["curves"], f"{attack} accuracy (held-out subset)",
                                title=f"{study.title}\nrobust accuracy per epoch, mean ± std over seeds"), out / CURVES_PNG)
    else:
        (out / CURVES_PNG).unlink(missing_ok=True)  # no per-epoch evaluation in these runs: no stale plot
    atomic_write_text(out / RESULTS_JSON, json.dumps(results, indent=2))
    md = [f"### {study.title}", "", results["description"].strip(), "",
          f"{finished} of {total} runs finished; seeds {', '.join(map(str, study.seeds))}; "
          f"compute {results['compute_seconds'] / 60:.1f} min (sum of the runs' wall time)"
          + (f", {results['wall_seconds'] / 60:.0f} min from the first run's start to the last one's end "
             f"(last: {results['finished_utc']})" if results.get("wall_seconds") else "") + ".", "",
          markdown_table(results), "",
          (f"Per-epoch robust accuracy is the recipe's `--eval-attacks` ({attack}) on the held-out subset; "
           if has_curves else "No per-epoch evaluation in these runs; ") +
          "± is the sample standard deviation over seeds; `results.json` has every value and the 95 % "
          "t-interval of each mean (`ci95`, its half-width).", "", "```bash", results["command"], "```", ""]
    atomic_write_text(out / RESULTS_MD, "\n".join(line for line in md if line is not None))
    return {"json": out / RESULTS_JSON, "markdown": out / RESULTS_MD, "scatter": out / SCATTER_PNG,
            **({"curves": out / CURVES_PNG} if has_curves else {})}


def document_block(doc: str | Path, study: Study) -> tuple[str, str, str, str]:
    """(text before, begin line, end line, text after) of the study's block in ``doc``; a
    :class:`StudyError` naming the fix when the page has no such block."""
    doc = Path(doc)
    if not doc.is_file():
        raise FileNotFoundError(f"--update-doc: no document at {doc}")
    text = doc.read_text()
    begin, end = f"<!-- sweep:{study.path.stem} -->", f"<!-- /sweep:{study.path.stem} -->"
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise StudyError(f"--update-doc: {doc} needs one '{begin}' line and one '{end}' line after it, around the "
                         "block the sweep may replace")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return head, begin, end, tail


def update_document(doc: str | Path, study: Study, markdown: str) -> Path:
    """Replace the block between ``<!-- sweep:NAME -->`` and ``<!-- /sweep:NAME -->`` in ``doc`` (NAME is
    the study file's stem) with ``markdown``, so a page's tables are regenerated rather than retyped."""
    from .checkpoint import atomic_write_text

    head, begin, end, tail = document_block(doc, study)
    atomic_write_text(Path(doc), f"{head}{begin}\n{markdown.strip()}\n{end}{tail}")
    return Path(doc)
