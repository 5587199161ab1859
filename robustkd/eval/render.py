"""``report.html``: one self-contained page (numbers, sanity checks, embedded plots, the recipe's
sections), rendered from the Jinja2 template ``templates/report.html.j2`` with autoescaping on."""
from __future__ import annotations

import base64
import json
from collections.abc import Iterator, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

from .schema import report_sections

TEMPLATE = "report.html.j2"


def _num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "\u2014"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return str(v)


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("robustkd.eval", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _num
    return env


def flatten(section: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``("a.b", 1), ("c", [1, 2])``: a section as table rows."""
    for key, value in section.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from flatten(value, f"{name}.")
        else:
            yield name, value


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def companion_reports(report: Mapping[str, Any], out_dir: Path) -> list[tuple[str, Mapping[str, Any]]]:
    """``[("student", report), ("EMA", report)]`` of a recipe run: the page of either copy shows both side
    by side (the student's report points to ``ema/report.json``; the EMA's lives in ``RUN/ema``). A report
    with no companion (``robustkd eval`` of one model) gives itself alone."""
    which = report["model"].get("which")
    if which == "student" and isinstance(report.get("ema"), Mapping) and report["ema"].get("report"):
        other = _read(out_dir / report["ema"]["report"])
        if other is not None:
            return [("student", report), ("EMA", other)]
    if which == "ema" and out_dir.name == "ema":
        other = _read(out_dir.parent / "report.json")
        if other is not None and other["model"].get("which") == "student":
            return [("student", other), ("EMA", report)]
    label = {"ema": "EMA", "student": "student"}.get(str(which), report["model"]["name"])
    return [(label, report)]


def headline(reports: list[tuple[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Rows of the headline table: clean, each attack and the worst case (accuracy), clean ECE and the
    sanity checks, one column per model."""
    names = list(dict.fromkeys(n for _, r in reports for n in r["metrics"]["adversarial"]))
    rows = [{"name": "clean accuracy", "values": [r["metrics"]["clean"]["accuracy"] for _, r in reports],
             "bold": True}]
    rows += [{"name": f"{n} accuracy", "values": [(r["metrics"]["adversarial"].get(n) or {}).get("accuracy")
                                                  for _, r in reports], "bold": True} for n in names]
    if any("worst_case" in r["metrics"] for _, r in reports):
        rows.append({"name": "worst case (all attacks)", "bold": True,
                     "values": [(r["metrics"].get("worst_case") or {}).get("accuracy") for _, r in reports]})
    rows.append({"name": "clean ECE", "values": [r["metrics"]["clean"]["ece"] for _, r in reports], "bold": False})
    rows.append({"name": "sanity checks", "bold": False,
                 "values": ["passed" if r["sanity"]["passed"] else "FAILED" for _, r in reports]})
    return rows


def _figure(report: Mapping[str, Any], out_dir: Path, key: str) -> dict[str, str] | None:
    name = report["plots"].get(key)
    if name and (out_dir / name).exists():
        return {"key": key, "name": name, "data": base64.b64encode((out_dir / name).read_bytes()).decode()}
    return None


def render_html(report: Mapping[str, Any], out_dir: str | Path) -> str:
    """The page for ``report``; the PNGs named in ``report["plots"]`` are read from ``out_dir`` and embedded.
    A training run's page starts with the run (headline of the student and its EMA copy side by side,
    per-epoch curves, the schedule), then this model's evaluation; raw settings are folded at the end."""
    out_dir = Path(out_dir)
    m = report["metrics"]
    rows = [{"name": "clean", "d": m["clean"], "adversarial": False}]
    rows += [{"name": n, "d": d, "adversarial": True} for n, d in m["adversarial"].items()]
    if "worst_case" in m:
        rows.append({"name": "worst case (all attacks)", "d": m["worst_case"], "adversarial": True})
    training = [f for f in (_figure(report, out_dir, k) for k in ("training", "schedule", "training_curve")) if f]
    evaluation = [f for f in (_figure(report, out_dir, k) for k in ("reliability", "budget_curve")) if f]
    reports = companion_reports(report, out_dir)
    sections = [(name, list(flatten(section))) for name, section in report_sections(report).items() if name != "ema"]
    run = report.get("run") if isinstance(report.get("run"), Mapping) else {}
    from .plots import model_label

    return environment().get_template(TEMPLATE).render(
        report=report, task=report["task"], model=report["model"], rows=rows, sections=sections,
        training_figures=training, figures=evaluation, reports=reports, headline=headline(reports),
        label=model_label(report), run=run, is_run=bool(training) or len(reports) > 1)
