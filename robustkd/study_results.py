"""A study's results (``robustkd sweep STUDY --report``): every finished cell's numbers from its
``report.json``, per table row (variant x grid point, and its EMA view) their mean, sample standard
deviation, 95 % t-interval and n, paired differences against a baseline variant, and the outputs:
``results.json``, ``results.md``, two plots, and the table written into a documentation page."""
from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .study import METRICS, Cell, Study, StudyError, cell_meta, read_cell_report

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
SCATTER_PNG = "results_scatter.png"
CURVES_PNG = "results_curves.png"


def _pick(adversarial: Mapping[str, Any], name: str) -> str | None:
    if name in adversarial:
        return name
    return next((k for k in adversarial if k.split(":")[0] == name), None)


def _first_auto(adversarial: Mapping[str, Any]) -> str | None:
    return next((k for k in adversarial if k.startswith("autoattack")), None)


def cell_metrics(report: Mapping[str, Any], view: str = "model", pgd: str = "pgd20",
                 run_dir: str | Path | None = None, attacks: Sequence[str] = ()) -> dict[str, float | None]:
    """The table's numbers for one cell's report: ``view`` is ``model`` (the trained model) or ``ema`` (its
    weight-averaged copy, from the run's ``ema/report.json``; empty when the run kept none). A metric the
    report does not hold (no AutoAttack among its final attacks, no per-epoch evaluation) stays ``None``:
    shown as not measured, never guessed."""
    out: dict[str, float | None] = {key: None for key, _ in METRICS}
    out.update({f"attack:{spec}": None for spec in attacks})
    source: Mapping[str, Any] = report
    if view == "ema":
        ema = read_cell_report(Path(run_dir) / "ema") if run_dir is not None else None
        if ema is None:
            return {}
        source = ema
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
    series = [k for k in training if k.startswith("ema_") == (view == "ema")]
    if series:
        gap = training[series[0]]
        out["best_robust"] = gap["best"]
        out["best_epoch"] = gap.get("best_epoch")
        out["overfitting_gap"] = gap["overfitting_gap"]
    return out


def attack_names(report: Mapping[str, Any]) -> list[str]:
    """The final attacks' specs of a cell's report."""
    return list(report["metrics"]["adversarial"])


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
    cells_out: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    curves: dict[str, dict[str, Any]] = {}
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
            per_cell: list[dict[str, Any]] = []
            epoch_rows: dict[int, list[float]] = {}
            attack: str | None = None
            for cell in cells:
                report = read_cell_report(cell.dir)
                entry: dict[str, Any] = {"row": label, "view": view, "variant": cell.variant.name, "grid": cell.grid,
                         "seed": cell.seed, "dir": str(cell.dir), "finished": report is not None}
                if report is not None:
                    entry["report_format"] = f"schema v{report['schema_version']}"
                    entry["metrics"] = cell_metrics(report, view, study.pgd_metric, cell.dir,
                                                    list(study.attack_columns))
                    entry["attacks"] = attack_names(report)
                    meta = cell_meta(cell.dir)
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
    spans: list[tuple[float, float]] = []  # (start, end) of every finished cell's last process, from its sweep.json
    for cell in study.cells():
        meta = cell_meta(cell.dir)
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


def _markers(study: Study) -> tuple[str, str]:
    return f"<!-- sweep:{study.path.stem} -->", f"<!-- /sweep:{study.path.stem} -->"


def document_block(doc: str | Path, study: Study) -> tuple[str, str]:
    """(text before, text after) the study's block in ``doc``; a :class:`StudyError` naming the fix when
    the page has no such block."""
    from .checkpoint import marked_block

    return marked_block(doc, *_markers(study), "the block the sweep may replace", StudyError)


def update_document(doc: str | Path, study: Study, markdown: str) -> Path:
    """Replace the block between ``<!-- sweep:NAME -->`` and ``<!-- /sweep:NAME -->`` in ``doc`` (NAME is
    the study file's stem) with ``markdown``, so a page's tables are regenerated rather than retyped."""
    from .checkpoint import replace_marked_block

    return replace_marked_block(doc, *_markers(study), markdown, "the block the sweep may replace", StudyError)
