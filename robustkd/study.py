"""The study file: its schema (:class:`Study`, :class:`Variant`, :class:`Cell`), :func:`load_study`, the check
of its flags against the recipe's own parser (:func:`check_flags`), and when a cell is finished
(:func:`read_cell_report`). Running a study's cells is :mod:`robustkd.study_runner`, aggregating their
reports :mod:`robustkd.study_results`; ``robustkd sweep`` (:mod:`robustkd.sweep`) uses both.

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
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

STUDY_KEYS = {"description", "recipe", "launcher", "launch_args", "output_dir", "results_dir", "seeds", "flags",
              "variants", "grid", "pgd_metric", "title", "attack_columns", "baseline"}
VARIANT_KEYS = {"label", "ema_label", "flags", "after", "baseline", "runs"}
OWNED_FLAGS = {"seed", "output-dir"}
CELL_FILE = "sweep.json"

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



def read_cell_report(run_dir: str | Path) -> dict[str, Any] | None:
    """The cell's report when it is complete, else ``None``: complete means ``report.json`` is a valid
    report of the current schema (:func:`robustkd.eval.schema.read_report`). A report without
    ``schema_version`` is refused by that loader, with what to do, rather than read as unfinished."""
    from .eval.schema import ReportSchemaError, UnversionedReportError, read_report

    path = Path(run_dir) / "report.json"
    if not path.is_file():
        return None
    try:
        return read_report(path)
    except UnversionedReportError:
        raise
    except (ReportSchemaError, OSError):
        return None  # written in part (an interrupted run) or not yet valid: the cell is not finished


def cell_meta(run_dir: Path) -> dict[str, Any]:
    """What the sweep recorded of the cell's last process (its ``sweep.json``); empty when none."""
    try:
        meta = json.loads((run_dir / CELL_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}
