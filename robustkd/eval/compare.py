"""``robustkd compare``: two reports side by side, settings that differ first (they make numbers
incomparable), then every metric with B - A. Reports come from :func:`~robustkd.eval.schema.read_report`,
so any run or evaluation directory works, and a report that loader refuses is refused here too."""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .render import flatten
from .schema import report_sections

# Sections that describe how a number was made (a run's configuration, threat models, the method, the
# evaluation points), not what was measured: their numbers are settings, not metrics.
SETTING_SECTIONS = {"run", "threat_models", "method", "points", "ema"}


@dataclass
class Row:
    """One line of a comparison: a metric (or setting) in report A and B."""

    metric: str
    a: Any
    b: Any

    @property
    def diff(self) -> float | None:
        if isinstance(self.a, (int, float)) and isinstance(self.b, (int, float)) \
                and not isinstance(self.a, bool) and not isinstance(self.b, bool):
            return self.b - self.a
        return None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _numbers(report: Mapping[str, Any]) -> dict[str, Any]:
    m = report["metrics"]
    out: dict[str, Any] = {"clean accuracy": m["clean"]["accuracy"], "clean ECE": m["clean"]["ece"],
                           "clean confidence (correct)": m["clean"]["confidence_correct"],
                           "clean confidence (wrong)": m["clean"]["confidence_wrong"]}
    groups = [(f"{name}", d) for name, d in m["adversarial"].items()]
    if "worst_case" in m:
        groups.append(("worst case", m["worst_case"]))
    for name, d in groups:
        out[f"{name} accuracy"] = d["accuracy"]
        out[f"{name} ECE"] = d["ece"]
        out[f"{name} KL(clean||adv)"] = d["kl_clean_adv"]
        out[f"{name} agreement"] = d["agreement"]
    for p in report["curve"]["points"]:
        out[f"PGD at {p['factor']:g}x budget"] = p["accuracy"]
    out["sanity checks failed"] = sum(c["status"] == "fail" for c in report["sanity"]["checks"])
    for k, v in ((report.get("training") or {}).get("robust_overfitting") or {}).items():
        out[f"training {k} overfitting gap"] = v["overfitting_gap"]
    for name, section in report_sections(report).items():
        if name not in SETTING_SECTIONS:
            out.update({f"{name}.{k}": v for k, v in flatten(section) if _is_number(v)})
    return out


def _settings(report: Mapping[str, Any]) -> dict[str, Any]:
    out = {"task": report["task"]["name"], "model": report["model"]["name"],
           "checkpoint": report["model"].get("checkpoint"), "examples": report["task"]["num_examples"],
           "seed": report["seed"], "robustkd version": report["robustkd_version"],
           "curve PGD steps": report["curve"]["attack"].get("steps"),
           **{f"attack {n}": json.dumps(d, sort_keys=True) for n, d in report["attacks"].items()}}
    for name, section in report_sections(report).items():
        out.update({f"{name}.{k}": (v if isinstance(v, (str, bool, type(None), int, float)) else json.dumps(v))
                    for k, v in flatten(section) if name in SETTING_SECTIONS or not _is_number(v)})
    return out


def compare(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[list[Row], list[Row]]:
    """(settings rows, metric rows) of reports A and B; a metric missing in one report shows as None.
    Numbers in the recipes' sections are metrics, everything else in them is a setting."""
    sa, sb = _settings(a), _settings(b)
    settings = [Row(k, sa.get(k), sb.get(k)) for k in dict.fromkeys([*sa, *sb])]
    na, nb = _numbers(a), _numbers(b)
    metrics = [Row(k, na.get(k), nb.get(k)) for k in dict.fromkeys([*na, *nb])]
    return settings, metrics


def describe(report: Mapping[str, Any]) -> str:
    """``small_cnn (EMA copy), 64 examples of cifar10/test, seed 0``: what a report measured."""
    model = report["model"]
    which = {"ema": "EMA copy", "student": "student"}.get(str(model.get("which")))
    return (f"{model['name']}{f' ({which})' if which else ''}, {report['task']['num_examples']} examples of "
            f"{report['task']['name']}/{report['task'].get('split', 'test')}, seed {report['seed']}")


def matching_view(path: str | Path, report: Mapping[str, Any], other: Mapping[str, Any]
                  ) -> tuple[Mapping[str, Any], str | None]:
    """A run directory's report for the same weights as ``other``: a run folder's ``report.json`` is its
    student's, ``ema/report.json`` its EMA copy's; when ``other`` measured the other copy (``robustkd eval``
    takes the EMA by default), the run's matching one is taken instead. Returns it and a note, or the
    report as it is and None."""
    from .schema import read_report

    path = Path(path).expanduser()
    mine, theirs = report["model"].get("which"), other["model"].get("which")
    if not path.is_dir() or mine == theirs or None in (mine, theirs):
        return report, None
    if mine == "student" and theirs == "ema" and (path / "ema" / "report.json").exists():
        return read_report(path / "ema"), f"{path}: its EMA copy ({path / 'ema' / 'report.json'}), as the other side"
    if mine == "ema" and theirs == "student" and path.name == "ema" and (path.parent / "report.json").exists():
        return read_report(path.parent), f"{path.parent}: its student, as the other side"
    return report, None


def format_comparison(settings: list[Row], metrics: list[Row], name_a: str = "A", name_b: str = "B") -> str:
    """A plain-text table: the settings both reports have that differ, one line for those only one has,
    then every metric."""
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = []
    differing = [r for r in settings if r.a != r.b and r.a is not None and r.b is not None]
    if differing:
        lines.append("settings that differ:")
        for r in differing:
            lines.append(f"  {r.metric}: {name_a}={_clip(cell(r.a))}  {name_b}={_clip(cell(r.b))}")
    for name, only in ((name_a, [r.metric for r in settings if r.a is not None and r.b is None]),
                       (name_b, [r.metric for r in settings if r.b is not None and r.a is None])):
        if only:
            groups = list(dict.fromkeys(m.split(".", 1)[0] for m in only))
            lines.append(f"only {name} records {len(only)} setting{'s' * (len(only) != 1)} "
                         f"({', '.join(groups[:6])}{', ...' if len(groups) > 6 else ''}): see its report.json")
    if lines:
        lines.append("")
    width = max([len(r.metric) for r in metrics] + [6])
    lines.append(f"{'metric':<{width}}  {name_a:>10}  {name_b:>10}  {'B - A':>9}")
    lines.append("-" * (width + 35))
    for r in metrics:
        d = r.diff
        lines.append(f"{r.metric:<{width}}  {cell(r.a):>10}  {cell(r.b):>10}  "
                     f"{(f'{d:+.4f}' if isinstance(d, float) else (f'{d:+d}' if isinstance(d, int) else '-')):>9}")
    return "\n".join(lines)


def _clip(text: str, width: int = 70) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."
