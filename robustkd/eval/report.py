"""Evaluation reports people can read: ``report.json`` (a stable schema, see docs/evaluation.md),
PNG plots, a one-page HTML summary, and :func:`compare` for two reports.

The JSON schema is versioned by ``schema_version``; :func:`validate_report` checks a report
against it (every writer validates before writing, every reader after reading), so a report
that loads is one whose fields mean what the documentation says.
"""
from __future__ import annotations

import base64
import html
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402,F401

from ..attacks.base import Attack  # noqa: E402
from ..checkpoint import atomic_write_text  # noqa: E402
from ..task import Task  # noqa: E402

SCHEMA_VERSION = 1
REPORT_FILE = "report.json"
HTML_FILE = "report.html"
PLOT_FILES = {"reliability": "reliability.png", "budget_curve": "budget_curve.png",
              "training_curve": "training_curve.png"}


class ReportSchemaError(ValueError):
    """A report that does not follow the documented schema (the message names the field)."""


# -- the schema ------------------------------------------------------------------------------
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


# -- building, writing, reading --------------------------------------------------------------
def _finite(obj: Any) -> Any:
    """JSON has no inf/nan: they become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def build_report(*, task: Task, model: dict[str, Any], attacks: Mapping[str, Attack], metrics: dict[str, Any],
                 sweep: Any, checks: Sequence[Any], seed: int, split: str, seconds: float, device: str,
                 version: str, history: list[dict[str, Any]] | None = None, data_dir: str | None = None,
                 sections: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Assemble a schema-valid report from the evaluation's parts; ``sections`` add top-level sections
    (a recipe's run configuration, ...) that may not replace the schema's own."""
    import torch

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
    clash = sorted(set(sections or {}) & set(report))
    if clash:
        raise ValueError(f"report sections {clash} would replace the report's own")
    report.update(sections or {})
    report = _finite(json.loads(json.dumps(report, default=str)))
    validate_report(report)
    return report


def write_report(report: dict[str, Any], output_dir: str | Path,
                 history: list[dict[str, Any]] | None = None) -> dict[str, Path]:
    """``report.json``, the PNG plots and ``report.html`` into ``output_dir``; returns their paths."""
    out = Path(output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    files = {"reliability": plot_reliability(report, out / PLOT_FILES["reliability"]),
             "budget_curve": plot_budget_curve(report, out / PLOT_FILES["budget_curve"])}
    if history:
        files["training_curve"] = plot_training(history, report.get("training") or {},
                                                out / PLOT_FILES["training_curve"])
    report["plots"] = {k: p.name for k, p in files.items()}
    validate_report(report)
    atomic_write_text(out / REPORT_FILE, json.dumps(report, indent=2))
    files["report"] = out / REPORT_FILE
    atomic_write_text(out / HTML_FILE, render_html(report, out))
    files["html"] = out / HTML_FILE
    return files


def read_report(path: str | Path) -> dict[str, Any]:
    """A validated report from ``report.json`` or the directory holding it."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / REPORT_FILE
    if not path.exists():
        raise FileNotFoundError(f"no evaluation report at {path}: pass the --output-dir of `robustkd eval` "
                                "or its report.json")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReportSchemaError(f"{path} is not valid JSON: {exc}") from exc
    validate_report(report)
    return report


def load_history(run_dir: str | Path) -> list[dict[str, Any]] | None:
    """A recipe run's ``metrics.jsonl`` rows (``None`` when the directory has none)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_analysis(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Best vs final robust accuracy per evaluated attack (the robust-overfitting gap), student and EMA."""
    from ..recipe import training_summary

    return {"epochs": len(history), "robust_overfitting": training_summary(history)}


# -- plots -----------------------------------------------------------------------------------
def _short(name: str, width: int = 28) -> str:
    """Attack specs can be long (``autoattack:version=custom,...``): shorten them for plot labels."""
    return name if len(name) <= width else name[:width - 3] + "..."


def _reliability_panel(ax: Any, dist: Mapping[str, Any], title: str) -> None:
    rel = dist["reliability"]
    edges = rel["edges"]
    width = edges[1] - edges[0]
    centers = [lo + width / 2 for lo in edges[:-1]]
    acc = [a if a is not None else 0.0 for a in rel["accuracy"]]
    conf = [c if c is not None else lo + width / 2 for c, lo in zip(rel["confidence"], edges[:-1])]
    filled = [n > 0 for n in rel["count"]]
    ax.bar([c for c, f in zip(centers, filled) if f], [a for a, f in zip(acc, filled) if f], width=width,
           edgecolor="black", color="#4C72B0", label="accuracy")
    ax.bar([c for c, f in zip(centers, filled) if f],
           [cf - a for cf, a, f in zip(conf, acc, filled) if f], bottom=[a for a, f in zip(acc, filled) if f],
           width=width, edgecolor="#C44E52", color="#C44E52", alpha=0.3, hatch="//", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")
    ax.set_title(f"{title}\naccuracy {dist['accuracy']:.3f}, ECE {dist['ece']:.3f}", fontsize=9)
    ax.legend(loc="upper left", fontsize=7)
    ax.grid(alpha=0.3)
    inset = ax.inset_axes([0.58, 0.06, 0.38, 0.22])
    inset.bar(centers, rel["count"], width=width, color="grey")
    inset.set_xlim(0, 1)
    inset.set_title("examples per bin", fontsize=7)
    inset.tick_params(labelsize=6)


def plot_reliability(report: Mapping[str, Any], path: str | Path) -> Path:
    """Reliability diagrams of the clean and the worst-case adversarial predictions, side by side."""
    m = report["metrics"]
    panels = [(m["clean"], "clean")]
    if "worst_case" in m:
        names = ", ".join(_short(n) for n in report["attacks"])
        panels.append((m["worst_case"], f"adversarial, worst case of\n{names}"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.8), squeeze=False)
    for ax, (dist, title) in zip(axes[0], panels):
        _reliability_panel(ax, dist, title)
    fig.suptitle(f"{report['task']['name']} / {report['model']['name']}: reliability", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _threat_label(threat: Mapping[str, Any]) -> str:
    if threat.get("snr_db") is not None:
        return f"SNR {threat['snr_db']:g} dB"
    return f"{threat.get('norm')} eps {threat.get('eps'):g}"


def plot_budget_curve(report: Mapping[str, Any], path: str | Path) -> Path:
    """Robust accuracy against the budget; the task's default budget and each evaluated attack marked."""
    curve = report["curve"]
    pts = [p for p in curve["points"] if p["x"] is not None]
    snr = curve["axis"].startswith("SNR")
    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    ax.plot([p["x"] for p in pts], [p["accuracy"] for p in pts], "o-",
            label=f"PGD-{curve['attack'].get('steps')} ({curve['attack'].get('norm')})")
    ax.axhline(curve["clean_accuracy"], color="green", ls=":", label=f"clean {curve['clean_accuracy']:.3f}")
    if curve["default_x"] is not None:
        ax.axvline(curve["default_x"], color="grey", ls="--", lw=1, label="task's default budget")
        adv = report["metrics"]["adversarial"]
        for name, marker in zip(adv, "s^vDP*"):
            ax.plot([curve["default_x"]], [adv[name]["accuracy"]], marker, ms=8,
                    label=f"{_short(name)} {adv[name]['accuracy']:.3f}")
    if curve.get("large_budget"):
        large = curve["large_budget"]
        ok = large["accuracy"] <= 0.05
        ax.text(0.02, 0.97, f"whole-domain budget ({_threat_label(large['threat'])}): accuracy {large['accuracy']:.3f}",
                transform=ax.transAxes, fontsize=7, va="top", color="black" if ok else "#c0392b",
                fontweight="normal" if ok else "bold")
    if snr:
        ax.invert_xaxis()
    ax.set(xlabel=curve["axis"], ylabel="accuracy", ylim=(-0.02, 1.02),
           title=f"accuracy vs budget ({report['task']['name']}, {report['task']['num_examples']} examples)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_training(history: Sequence[Mapping[str, Any]], analysis: Mapping[str, Any], path: str | Path) -> Path:
    """Robust accuracy per epoch from metrics.jsonl, best epoch marked: robust overfitting at a glance."""
    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    gaps = analysis.get("robust_overfitting", {})
    for prefix, style in (("", "-"), ("ema_", "--")):
        rows = [h for h in history if f"{prefix}robust_accuracy" in h]
        who = "EMA " if prefix else ""
        if rows and f"{prefix}clean_accuracy" in rows[0]:
            ax.plot([h["epoch"] for h in rows], [h[f"{prefix}clean_accuracy"] for h in rows], style, color="green",
                    alpha=0.6, label=f"{who}clean")
        for name in (rows[-1][f"{prefix}robust_accuracy"] if rows else {}):
            series = [(h["epoch"], h[f"{prefix}robust_accuracy"][name]) for h in rows
                      if name in h[f"{prefix}robust_accuracy"]]
            line, = ax.plot(*zip(*series), style, marker="o", ms=3, label=f"{who}{name}")
            g = gaps.get(f"{prefix}{name}")
            if g:
                ax.plot([g["best_epoch"]], [g["best"]], "*", ms=12, color=line.get_color())
                ax.annotate(f"best {g['best']:.3f} @ {g['best_epoch']}\nfinal {g['final']:.3f} "
                            f"(gap {g['overfitting_gap']:.3f})", (g["best_epoch"], g["best"]), fontsize=7,
                            xytext=(5, 5), textcoords="offset points")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel="accuracy (held-out subset)", ylim=(0, 1),
           title="training: best vs final robust accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


# -- HTML ------------------------------------------------------------------------------------
def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "&mdash;"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def render_html(report: Mapping[str, Any], out_dir: Path) -> str:
    """One self-contained page: the numbers, the sanity checks, the plots side by side (embedded)."""
    m, t, mod = report["metrics"], report["task"], report["model"]
    rows = [("clean", m["clean"], None)] + [(n, d, d) for n, d in m["adversarial"].items()]
    if "worst_case" in m:
        rows.append(("worst case (all attacks)", m["worst_case"], m["worst_case"]))
    table = "".join(
        f"<tr><td>{html.escape(name)}</td><td><b>{_fmt(d['accuracy'])}</b></td><td>{_fmt(d['ece'])}</td>"
        f"<td>{_fmt(d['confidence_correct'])}</td><td>{_fmt(d['confidence_wrong'])}</td>"
        f"<td>{_fmt(a['kl_clean_adv']) if a else '&mdash;'}</td><td>{_fmt(a['agreement']) if a else '&mdash;'}</td></tr>"
        for name, d, a in rows)
    checks = "".join(
        f"<li class='{c['status'].replace('/', '')}'><b>{c['status'].upper()}</b> {html.escape(c['name'])}: "
        f"{html.escape(c['detail'])}</li>" for c in report["sanity"]["checks"])
    banner = ("<div class='ok'>all sanity checks passed</div>" if report["sanity"]["passed"] else
              "<div class='bad'>SANITY CHECKS FAILED: do not trust the robust accuracy below "
              "(gradient masking or a broken setup)</div>")
    images = ""
    for key in ("reliability", "budget_curve", "training_curve"):
        name = report["plots"].get(key)
        if name and (out_dir / name).exists():
            data = base64.b64encode((out_dir / name).read_bytes()).decode()
            images += f"<figure><img src='data:image/png;base64,{data}' alt='{key}'><figcaption>{name}</figcaption></figure>"
    attacks = "".join(f"<tr><td>{html.escape(n)}</td><td><code>{html.escape(json.dumps(d))}</code></td></tr>"
                      for n, d in report["attacks"].items())
    training = ""
    if report.get("training"):
        training = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v['best'])} (epoch {v['best_epoch']})</td>"
                           f"<td>{_fmt(v['final'])}</td><td>{_fmt(v['overfitting_gap'])}</td></tr>"
                           for k, v in report["training"]["robust_overfitting"].items())
        training = ("<h2>Robust overfitting</h2><table><tr><th>series</th><th>best</th><th>final</th><th>gap</th></tr>"
                    f"{training}</table>")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>robustkd eval: {html.escape(t['name'])} / {html.escape(mod['name'])}</title>
<style>body{{font:14px sans-serif;margin:16px;max-width:1700px}} table{{border-collapse:collapse;margin:6px 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}} td:first-child,th:first-child{{text-align:left}}
.ok{{background:#d9f2d9;padding:6px}} .bad{{background:#c0392b;color:white;padding:8px;font-size:16px;font-weight:bold}}
li.fail{{color:#c0392b}} li.pass{{color:#1e7b34}} li.na{{color:#777}} .figs{{display:flex;flex-wrap:wrap;gap:8px}}
figure{{margin:0}} img{{max-height:420px}} code{{font-size:11px}} .meta{{color:#555}}</style></head><body>
<h1>{html.escape(t['name'])} / {html.escape(mod['name'])}</h1>
<p class="meta">robustkd {html.escape(report['robustkd_version'])} &middot; {t['num_examples']} examples of the {html.escape(t['split'])} split
&middot; seed {report['seed']} &middot; {html.escape(str(mod.get('checkpoint') or ''))} {html.escape(str(mod.get('which') or ''))}
&middot; {html.escape(report['created'])} &middot; {report['seconds']:.0f} s on {html.escape(report['environment']['device'])}</p>
{banner}
<div class="figs">{images}</div>
<table><tr><th>predictions</th><th>accuracy</th><th>ECE</th><th>conf. correct</th><th>conf. wrong</th><th>KL(clean||adv)</th><th>agreement</th></tr>{table}</table>
<h2>Sanity checks</h2><ul>{checks}</ul>
{training}
<details><summary>attack parameters</summary><table>{attacks}</table></details>
</body></html>"""


# -- comparing two reports -------------------------------------------------------------------
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
    return out


def _settings(report: Mapping[str, Any]) -> dict[str, Any]:
    return {"task": report["task"]["name"], "model": report["model"]["name"],
            "checkpoint": report["model"].get("checkpoint"), "examples": report["task"]["num_examples"],
            "seed": report["seed"], "robustkd version": report["robustkd_version"],
            "curve PGD steps": report["curve"]["attack"].get("steps"),
            **{f"attack {n}": json.dumps(d, sort_keys=True) for n, d in report["attacks"].items()}}


def compare(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[list[Row], list[Row]]:
    """(settings rows, metric rows) of reports A and B; a metric missing in one report shows as None."""
    sa, sb = _settings(a), _settings(b)
    settings = [Row(k, sa.get(k), sb.get(k)) for k in dict.fromkeys([*sa, *sb])]
    na, nb = _numbers(a), _numbers(b)
    metrics = [Row(k, na.get(k), nb.get(k)) for k in dict.fromkeys([*na, *nb])]
    return settings, metrics


def format_comparison(settings: list[Row], metrics: list[Row], name_a: str = "A", name_b: str = "B") -> str:
    """A plain-text table: differing settings first (they make numbers incomparable), then every metric."""
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = []
    differing = [r for r in settings if r.a != r.b]
    if differing:
        lines.append("settings that differ:")
        for r in differing:
            lines.append(f"  {r.metric}: {name_a}={cell(r.a)}  {name_b}={cell(r.b)}")
        lines.append("")
    width = max([len(r.metric) for r in metrics] + [6])
    lines.append(f"{'metric':<{width}}  {name_a:>10}  {name_b:>10}  {'B - A':>9}")
    lines.append("-" * (width + 35))
    for r in metrics:
        d = r.diff
        lines.append(f"{r.metric:<{width}}  {cell(r.a):>10}  {cell(r.b):>10}  "
                     f"{(f'{d:+.4f}' if isinstance(d, float) else (f'{d:+d}' if isinstance(d, int) else '-')):>9}")
    return "\n".join(lines)
