"""The ``report.json`` schema (see docs/evaluation.md): building a report, validating it, reading it.

The schema is versioned by ``schema_version``; :func:`validate_report` checks a report against it
(every writer validates before writing, every reader after reading), so a report that loads is one
whose fields mean what the documentation says. A recipe adds its own parts (MTARD's balance, the
achieved SNR, the run's configuration) as ``sections``: extra top-level keys, each a JSON object,
that may not replace the schema's own fields; the schema checks their shape, the HTML page shows
each as a table and ``robustkd compare`` compares them.
"""
from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
REPORT_FILE = "report.json"
HTML_FILE = "report.html"
PLOT_FILES = {"reliability": "reliability.png", "budget_curve": "budget_curve.png",
              "training_curve": "training_curve.png"}


class ReportSchemaError(ValueError):
    """A report that does not follow the documented schema (the message names the field)."""


class UnversionedReportError(ReportSchemaError):
    """A report without ``schema_version`` (an older robustkd recipe wrote it): refused by :func:`read_report`,
    the message says how to measure the run again."""


NUM = (int, float)
OPT_NUM = (int, float, type(None))
OPT_STR = (str, type(None))
RELIABILITY = {"edges": list, "count": list, "confidence": list, "accuracy": list}
DISTRIBUTION = {"accuracy": NUM, "ece": NUM, "confidence_correct": OPT_NUM, "confidence_wrong": OPT_NUM,
                "reliability": RELIABILITY}
ADVERSARIAL = {**DISTRIBUTION, "kl_clean_adv": NUM, "agreement": NUM}
CHECK = {"name": str, "status": str, "detail": str, "values": dict}
SCHEMA: dict[str, Any] = {
    "schema_version": int,
    "robustkd_version": str,
    "created": str,
    "seed": int,
    "task": {"name": str, "modality": str, "num_classes": int, "split": str, "num_examples": int,
             "data_dir": OPT_STR, "threat_model": dict},
    "model": {"name": str, "class": str, "num_parameters": int},
    "attacks": {"*": {"attack": str}},
    "metrics": {"num_examples": int, "clean": DISTRIBUTION, "adversarial": {"*": ADVERSARIAL},
                "worst_case?": ADVERSARIAL},
    "curve": {"axis": str, "default_x": OPT_NUM, "attack": dict, "clean_accuracy": NUM,
              "points": [{"factor": NUM, "x": OPT_NUM, "threat": dict, "accuracy": NUM}],
              "large_budget": (dict, type(None))},
    "sanity": {"passed": bool, "checks": [CHECK]},
    "training": (dict, type(None)),
    "plots": dict,
    "environment": {"torch": str, "python": str, "device": str},
    "seconds": NUM,
}
CHECK_STATUSES = ("pass", "fail", "n/a")
JSON_LEAF = (str, int, float, bool, type(None))


def _validate(value: Any, spec: Any, where: str) -> None:
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise ReportSchemaError(f"{where} must be an object, got {type(value).__name__}")
        for key, sub in spec.items():
            if key == "*":
                for k, v in value.items():
                    _validate(v, sub, f"{where}.{k}")
                continue
            optional = key.endswith("?")
            key = key.rstrip("?")
            if key not in value:
                if optional:
                    continue
                raise ReportSchemaError(f"{where}.{key} is missing")
            _validate(value[key], sub, f"{where}.{key}")
    elif isinstance(spec, list):
        if not isinstance(value, list):
            raise ReportSchemaError(f"{where} must be a list, got {type(value).__name__}")
        for i, item in enumerate(value):
            _validate(item, spec[0], f"{where}[{i}]")
    else:
        types = spec if isinstance(spec, tuple) else (spec,)
        if isinstance(value, bool) and bool not in types:
            raise ReportSchemaError(f"{where} must be {'/'.join(t.__name__ for t in types)}, got bool")
        if not isinstance(value, types):
            raise ReportSchemaError(f"{where} must be {'/'.join(t.__name__ for t in types)}, "
                                    f"got {type(value).__name__} ({value!r:.60})")


def _validate_json_values(value: Any, where: str) -> None:
    """A section holds plain JSON: objects with string keys, lists, strings, numbers, booleans, null."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ReportSchemaError(f"{where} has a non-string key {k!r}")
            _validate_json_values(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _validate_json_values(v, f"{where}[{i}]")
    elif not isinstance(value, JSON_LEAF) or (isinstance(value, float) and not math.isfinite(value)):
        raise ReportSchemaError(f"{where} must be a JSON value, got {type(value).__name__} ({value!r:.60})")


def validate_report(report: Mapping[str, Any]) -> None:
    """Raise :class:`ReportSchemaError` unless ``report`` follows schema version :data:`SCHEMA_VERSION`."""
    if not isinstance(report, Mapping):
        raise ReportSchemaError("a report is a JSON object")
    version = report.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ReportSchemaError(f"schema_version is {version!r}; this robustkd reads version {SCHEMA_VERSION}")
    _validate(dict(report), SCHEMA, "report")
    for i, check in enumerate(report["sanity"]["checks"]):
        if check["status"] not in CHECK_STATUSES:
            raise ReportSchemaError(f"report.sanity.checks[{i}].status must be one of {CHECK_STATUSES}")
    if report["sanity"]["passed"] != (not any(c["status"] == "fail" for c in report["sanity"]["checks"])):
        raise ReportSchemaError("report.sanity.passed disagrees with the checks' statuses")
    for name, section in report_sections(report).items():
        if not isinstance(section, dict):
            raise ReportSchemaError(f"report.{name} is not a schema field, so it is a section and must be an "
                                    f"object, got {type(section).__name__}")
        _validate_json_values(section, f"report.{name}")


def report_sections(report: Mapping[str, Any]) -> dict[str, Any]:
    """The report's sections: every top-level key the schema does not define, in order."""
    own = {k.rstrip("?") for k in SCHEMA}
    return {k: v for k, v in report.items() if k not in own}


def _finite(obj: Any) -> Any:
    """JSON has no inf/nan: they become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def build_report(*, task: Any, model: dict[str, Any], attacks: Mapping[str, Any], metrics: dict[str, Any],
                 sweep: Any, checks: Sequence[Any], seed: int, split: str, seconds: float, device: str,
                 version: str, history: list[dict[str, Any]] | None = None, data_dir: str | None = None,
                 sections: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Assemble a schema-valid report from the evaluation's parts; ``sections`` are a recipe's own
    named JSON objects (``{"mtard_balance": {...}, "run": {...}}``), added as top-level keys."""
    import torch

    own = {k.rstrip("?") for k in SCHEMA}
    if sections is not None and not isinstance(sections, Mapping):
        raise ReportSchemaError(f"sections must be a mapping of name -> JSON object, got {type(sections).__name__}")
    if clash := sorted(set(sections or {}) & own):
        raise ReportSchemaError(f"report sections {clash} would replace the report's own fields: rename them")
    report = {
        "schema_version": SCHEMA_VERSION,
        "robustkd_version": version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seed": int(seed),
        "task": {"name": task.name, "modality": task.modality, "num_classes": int(task.num_classes),
                 "split": split, "num_examples": int(metrics["num_examples"]),
                 "data_dir": data_dir if data_dir is not None else getattr(task, "data_dir", None),
                 "threat_model": task.threat_model().describe()},
        "model": model,
        "attacks": {name: atk.describe() for name, atk in attacks.items()},
        "metrics": metrics,
        "curve": sweep.to_dict(),
        "sanity": {"passed": not any(c.failed for c in checks), "checks": [c.to_dict() for c in checks]},
        "training": training_analysis(history) if history else None,
        "plots": {},
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "device": device},
        "seconds": float(seconds),
    }
    report.update({str(k): v for k, v in (sections or {}).items()})
    report = _finite(json.loads(json.dumps(report, default=str)))
    validate_report(report)
    return report


def read_report(path: str | Path) -> dict[str, Any]:
    """A validated report from ``report.json`` or the run / evaluation directory holding it.

    A report without ``schema_version`` (:class:`UnversionedReportError`; a recipe of robustkd before
    reports were unified wrote such reports) and a run directory that has no report yet are refused with a
    message saying what to do instead. This is the one place that tells such reports apart."""
    path = Path(path).expanduser()
    if path.is_dir():
        run_dir, path = path, path / REPORT_FILE
        if not path.exists():
            if (run_dir / "robustkd.json").exists() or (run_dir / "checkpoints").exists():
                raise FileNotFoundError(f"{run_dir} is a run directory without {REPORT_FILE} (the run has not "
                                        f"finished, or stopped early): evaluate its weights with `robustkd eval "
                                        f"--checkpoint {run_dir} --output-dir EVAL_DIR` and compare EVAL_DIR")
            raise FileNotFoundError(f"no {REPORT_FILE} in {run_dir}: pass a recipe's --output-dir, the --output-dir "
                                    "of `robustkd eval`, or a report.json")
    elif not path.exists():
        raise FileNotFoundError(f"no evaluation report at {path}: pass a recipe's --output-dir, the --output-dir of "
                                "`robustkd eval`, or a report.json")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReportSchemaError(f"{path} is not valid JSON (an interrupted write?): {exc}") from exc
    if isinstance(report, Mapping) and "schema_version" not in report:
        raise UnversionedReportError(
            f"{path} is an unversioned report (no schema_version; an older robustkd recipe wrote it), which this "
            f"robustkd does not read: re-evaluate the run with `robustkd eval --checkpoint {path.parent} "
            "--output-dir EVAL_DIR` and use EVAL_DIR, or re-run the recipe with this robustkd")
    validate_report(report)
    return report


def load_history(run_dir: str | Path) -> list[dict[str, Any]] | None:
    """A recipe run's ``metrics.jsonl`` rows (``None`` when the directory has none)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def robust_overfitting(history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Best vs final robust accuracy per evaluated attack (the robust-overfitting gap), model and EMA
    (``ema_`` prefix), from a run's per-epoch history."""
    out: dict[str, Any] = {}
    for prefix in ("", "ema_"):
        rows = [h for h in history if f"{prefix}robust_accuracy" in h]
        if not rows:
            continue
        for name in rows[-1][f"{prefix}robust_accuracy"]:
            series = [(h["epoch"], h[f"{prefix}robust_accuracy"][name]) for h in rows
                      if name in h[f"{prefix}robust_accuracy"]]
            best_epoch, best = max(series, key=lambda t: t[1])
            out[f"{prefix}{name}"] = {"best": best, "best_epoch": best_epoch, "final": series[-1][1],
                                      "overfitting_gap": best - series[-1][1]}
    return out


def training_analysis(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's ``training`` field: epochs and the robust-overfitting gap per series."""
    return {"epochs": len(history), "robust_overfitting": robust_overfitting(history)}
