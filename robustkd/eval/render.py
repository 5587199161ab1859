"""``report.html``: one self-contained page (numbers, sanity checks, embedded plots, the recipe's
sections), rendered from the Jinja2 template ``templates/report.html.j2`` with autoescaping on."""
from __future__ import annotations

import base64
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Mapping

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


def render_html(report: Mapping[str, Any], out_dir: str | Path) -> str:
    """The page for ``report``; the PNGs named in ``report["plots"]`` are read from ``out_dir`` and embedded."""
    out_dir = Path(out_dir)
    m = report["metrics"]
    rows = [{"name": "clean", "d": m["clean"], "adversarial": False}]
    rows += [{"name": n, "d": d, "adversarial": True} for n, d in m["adversarial"].items()]
    if "worst_case" in m:
        rows.append({"name": "worst case (all attacks)", "d": m["worst_case"], "adversarial": True})
    figures = []
    for key in ("reliability", "budget_curve", "training_curve"):
        name = report["plots"].get(key)
        if name and (out_dir / name).exists():
            figures.append({"key": key, "name": name,
                            "data": base64.b64encode((out_dir / name).read_bytes()).decode()})
    sections = [(name, list(flatten(section))) for name, section in report_sections(report).items()]
    return environment().get_template(TEMPLATE).render(
        report=report, task=report["task"], model=report["model"], rows=rows, figures=figures, sections=sections)
