"""``robustkd sweep``: a study -- a grid of ordinary recipe runs (variants x grid values x seeds) --
run resumably, and the aggregate of their reports (mean, standard deviation and n per metric) as
JSON, Markdown and plots.

The work is split along its seams, and every name is importable from here as well:

* :mod:`robustkd.study`: the study file's schema and checks (:func:`load_study`, :class:`Study`,
  :class:`Variant`, :class:`Cell`, :func:`check_flags`) and when a cell is finished
  (:func:`read_cell_report`); the study file format is described there and in docs/results.md;
* :mod:`robustkd.study_runner`: running the cells (:func:`run_sweep`, :func:`cell_command`, the
  cells' locks);
* :mod:`robustkd.study_results`: aggregating the cells' reports (:func:`cell_metrics`,
  :func:`summarize`, :func:`aggregate`, :func:`markdown_table`, :func:`write_results`) and writing the
  table into a page (:func:`update_document`).
"""
from __future__ import annotations

from .study import (
    CELL_FILE,
    METRICS,
    OWNED_FLAGS,
    STUDY_KEYS,
    VARIANT_KEYS,
    Cell,
    Study,
    StudyError,
    Variant,
    cell_meta,
    check_flags,
    load_study,
    read_cell_report,
    recipe_parser,
)
from .study_results import (
    CURVES_PNG,
    RESULTS_JSON,
    RESULTS_MD,
    SCATTER_PNG,
    aggregate,
    attack_names,
    cell_metrics,
    check_replaces,
    document_block,
    epoch_series,
    markdown_table,
    summarize,
    update_document,
    write_results,
)
from .study_runner import LOCK_FILE, LOG_FILE, SweepOutcome, cell_command, run_sweep

__all__ = ["CELL_FILE", "CURVES_PNG", "LOCK_FILE", "LOG_FILE", "METRICS", "OWNED_FLAGS", "RESULTS_JSON", "RESULTS_MD",
           "SCATTER_PNG", "STUDY_KEYS", "VARIANT_KEYS", "Cell", "Study", "StudyError", "SweepOutcome", "Variant",
           "aggregate", "attack_names", "cell_command", "cell_meta", "cell_metrics", "check_flags", "check_replaces",
           "document_block", "epoch_series", "load_study", "markdown_table", "read_cell_report", "recipe_parser",
           "run_sweep", "summarize", "update_document", "write_results"]
