"""Evaluation reports people can read: ``report.json`` (a versioned schema, see docs/evaluation.md),
PNG plots and a one-page HTML summary, written together by :func:`write_report`.

The parts live in their own modules: :mod:`.schema` (the schema, building, validating, reading),
:mod:`.plots` (figures, no global matplotlib backend switch), :mod:`.render` (the HTML template) and
:mod:`.compare` (two reports side by side); their public names are re-exported here.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_write_text
from .compare import Row, compare, format_comparison
from .plots import model_label, plot_budget_curve, plot_reliability, plot_training, plot_training_run
from .render import render_html
from .schema import (
    HTML_FILE,
    PLOT_FILES,
    REPORT_FILE,
    SCHEMA,
    SCHEMA_VERSION,
    ReportSchemaError,
    UnversionedReportError,
    build_report,
    load_history,
    read_report,
    training_analysis,
    validate_report,
)

TRAINING_PLOT = "training.png"
SCHEDULE_PLOT = "schedule.png"

__all__ = ["model_label", "HTML_FILE", "PLOT_FILES", "REPORT_FILE", "SCHEMA", "SCHEMA_VERSION", "ReportSchemaError", "Row",
           "UnversionedReportError", "build_report", "compare", "format_comparison", "load_history", "read_report", "render_html",
           "training_analysis", "validate_report", "write_report"]


def write_report(report: dict[str, Any], output_dir: str | Path,
                 history: list[dict[str, Any]] | None = None) -> dict[str, Path]:
    """``report.json``, the PNG plots and ``report.html`` into ``output_dir``; returns their paths."""
    out = Path(output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    files = {"reliability": plot_reliability(report, out / PLOT_FILES["reliability"]),
             "budget_curve": plot_budget_curve(report, out / PLOT_FILES["budget_curve"])}
    if history:
        files["training"] = plot_training_run(history, out / TRAINING_PLOT,
                                              title=f"{report['task']['name']} / {report['model']['name']}: the "
                                                    f"training run, {len(history)} epoch{'s' * (len(history) != 1)}")
        files["training_curve"] = plot_training(history, report.get("training") or {},
                                                out / PLOT_FILES["training_curve"])
    report["plots"] = {k: p.name for k, p in files.items()}
    if (out / SCHEDULE_PLOT).exists():  # a recipe's schedule.png (what the method anneals, per step)
        report["plots"]["schedule"] = SCHEDULE_PLOT
    validate_report(report)
    atomic_write_text(out / REPORT_FILE, json.dumps(report, indent=2))
    files["report"] = out / REPORT_FILE
    atomic_write_text(out / HTML_FILE, render_html(report, out))
    files["html"] = out / HTML_FILE
    companion = (report.get("ema") or {}).get("report") if isinstance(report.get("ema"), dict) else None
    if companion and (out / companion).exists():  # the EMA copy's page was written first: now it can show both
        ema_dir = (out / companion).parent
        atomic_write_text(ema_dir / HTML_FILE, render_html(read_report(ema_dir), ema_dir))
    return files
