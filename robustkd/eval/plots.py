"""Plots people would rather look at than read: training curves, method schedules, reliability
diagrams, accuracy-vs-budget curves, and the sweep's study plots.

Every ``*_figure`` function returns a :class:`matplotlib.figure.Figure` built without pyplot, so
importing this module never switches matplotlib's backend and never touches a user's open figures;
:func:`save_figure` writes one to disk. The ``plot_*`` functions are the save-to-a-path shorthands.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` (any format matplotlib knows from the suffix) and return the path."""
    fig.savefig(path, dpi=dpi)
    return Path(path)


def _short(name: str, width: int = 28) -> str:
    """Attack specs can be long (``autoattack:version=custom,...``): shorten them for plot labels."""
    return name if len(name) <= width else name[:width - 3] + "..."


# -- training ------------------------------------------------------------------------------------
def training_curves_figure(history: Sequence[Mapping[str, Any]], title: str = "") -> Figure:
    """Clean and robust accuracy (model and EMA) and training loss per epoch."""
    evaluated = [h for h in history if "clean_accuracy" in h]
    fig = Figure(figsize=(11, 4), layout="tight")
    ax_acc, ax_loss = fig.subplots(1, 2)
    for prefix, style in (("", "-"), ("ema_", "--")):
        rows = [h for h in evaluated if f"{prefix}clean_accuracy" in h]
        if not rows:
            continue
        who = "EMA" if prefix else "student"
        epochs = [h["epoch"] for h in rows]
        ax_acc.plot(epochs, [h[f"{prefix}clean_accuracy"] for h in rows], style, marker="o", label=f"{who} clean")
        for name in rows[-1].get(f"{prefix}robust_accuracy", {}):
            ax_acc.plot(epochs, [h[f"{prefix}robust_accuracy"].get(name) for h in rows], style, marker="s",
                        label=f"{who} {name}")
    for ax in (ax_acc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    ax_acc.grid(alpha=0.3)
    if evaluated:
        ax_acc.legend(fontsize=8)
    ax_loss.plot([h["epoch"] for h in history], [h["train_loss"] for h in history], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    ax_loss.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


# The keys of a metrics.jsonl row that are not a method's own per-epoch values (its schedule).
_RUN_KEYS = {"epoch", "step", "lr", "train_loss", "epoch_seconds", "num_examples", "clean_accuracy",
             "robust_accuracy", "worst_case_accuracy", "run_id"}


def schedule_keys(history: Sequence[Mapping[str, Any]]) -> list[str]:
    """The numbers a method logs per epoch (ADR's ``adr_tau``, ``adr_lambda``, ...): what it anneals."""
    keys: dict[str, None] = {}
    for h in history:
        for k, v in h.items():
            if (k not in _RUN_KEYS and not k.startswith("ema_") and isinstance(v, (int, float))
                    and not isinstance(v, bool)):
                keys[k] = None
    return list(keys)


def training_run_figure(history: Sequence[Mapping[str, Any]], title: str = "") -> Figure:
    """The run at a glance, from its metrics.jsonl: training loss, learning rate, clean and robust
    accuracy of the student and of the EMA copy (per-epoch evaluation), and what the method anneals.
    A one-epoch run is marked as such (its numbers written next to the single point), not drawn as a
    lone dot that looks like a curve."""
    history = [h for h in history if "epoch" in h]
    keys = schedule_keys(history)
    panels = ["loss", "lr", "clean", "robust"] + (["schedule"] if keys else [])
    ncols = 3 if len(panels) > 4 else 2
    fig = Figure(figsize=(4.6 * ncols, 3.4 * 2), layout="tight")
    grid = fig.subplots(2, ncols, squeeze=False).ravel()
    axes = dict(zip(panels, grid))
    for ax in grid[len(panels):]:
        ax.set_visible(False)
    one = len(history) == 1
    epochs = [h["epoch"] for h in history]

    values_of: dict[int, list[str]] = {}  # one epoch: the panel's numbers, written out instead of a lone dot

    def series(ax: Any, values: Sequence[Any], label: str | None = None, style: str = "-", **kw: Any) -> None:
        pts = [(e, v) for e, v in zip(epochs, values) if v is not None]
        if not pts:
            return
        if one:
            values_of.setdefault(id(ax), []).append(f"{label + ': ' if label else ''}{pts[0][1]:.4g}")
            return
        ax.plot(*zip(*pts), style, marker="o", ms=4, label=label, **kw)

    series(axes["loss"], [h.get("train_loss") for h in history], color="#444")
    axes["loss"].set(title="training loss (student)", ylabel="loss")
    series(axes["lr"], [h.get("lr") for h in history], color="#8172B2")
    axes["lr"].set(title="learning rate (end of epoch)", ylabel="LR")
    names = list(dict.fromkeys(n for h in history for p in ("", "ema_") for n in (h.get(f"{p}robust_accuracy") or {})))
    for who, prefix, style in (("student", "", "-"), ("EMA", "ema_", "--")):  # same colour, EMA dashed
        series(axes["clean"], [h.get(f"{prefix}clean_accuracy") for h in history], who, style, color="C2")
        for i, name in enumerate(names):
            series(axes["robust"], [(h.get(f"{prefix}robust_accuracy") or {}).get(name) for h in history],
                   f"{who} {_short(name, 24)}", style, color=f"C{(3 + i) % 10}")
    axes["clean"].set(title="clean accuracy (held-out subset)", ylabel="accuracy", ylim=(0, 1))
    axes["robust"].set(title="robust accuracy (held-out subset)", ylabel="accuracy", ylim=(0, 1))
    if not history:
        return fig
    for key in keys:
        series(axes["schedule"], [h.get(key) for h in history], key)
    if keys:
        axes["schedule"].set(title="what the method anneals (end of epoch)")
    for name, ax in axes.items():
        if one:  # a single epoch: its numbers, plainly, and why there is no curve
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_ylim(0, 1)
            lines = values_of.get(id(ax))
            ax.text(0.5, 0.58, "\n".join(lines) if lines else "not evaluated", transform=ax.transAxes,
                    ha="center", va="center", fontsize=10 if lines and len(lines) < 4 else 8)
            ax.text(0.5, 0.1, f"epoch {epochs[0]} only: a curve needs two epochs", transform=ax.transAxes,
                    ha="center", fontsize=8, color="#777", style="italic")
            continue
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if name in ("clean", "robust", "schedule") and ax.lines and any(line.get_label()[:1] != "_"
                                                                        for line in ax.lines):
            ax.legend(fontsize=7)
        if not ax.lines:
            ax.text(0.5, 0.5, "not evaluated per epoch (--eval-every 0)", transform=ax.transAxes, ha="center",
                    fontsize=8, color="#777")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_training_run(history: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    return save_figure(training_run_figure(history, title), path, dpi=100)


def plot_training_curves(history: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    return save_figure(training_curves_figure(history, title), path, dpi=110)


def curves_figure(curves: Mapping[str, Sequence[float]], x: Sequence[float], xlabel: str, title: str) -> Figure:
    """One panel per named curve (e.g. ADR's temperature and interpolation factor per step)."""
    fig = Figure(figsize=(5 * len(curves), 3.5), layout="tight")
    axes = fig.subplots(1, len(curves), squeeze=False)
    for ax, (name, values) in zip(axes[0], curves.items()):
        ax.plot(x, values)
        ax.set(xlabel=xlabel, title=name)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return fig


def plot_curves(curves: Mapping[str, Sequence[float]], x: Sequence[float], path: str | Path, xlabel: str,
                title: str) -> Path:
    return save_figure(curves_figure(curves, x, xlabel, title), path, dpi=110)


def robust_overfitting_figure(history: Sequence[Mapping[str, Any]], analysis: Mapping[str, Any]) -> Figure:
    """Robust accuracy per epoch from metrics.jsonl, best epoch marked: robust overfitting at a glance."""
    fig = Figure(figsize=(5.6, 4.4), layout="tight")
    ax = fig.subplots()
    gaps = analysis.get("robust_overfitting", {})
    for prefix, style in (("", "-"), ("ema_", "--")):
        rows = [h for h in history if f"{prefix}robust_accuracy" in h]
        who = "EMA " if prefix else "student "
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
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel="accuracy (held-out subset)", ylim=(0, 1),
           title="training: best vs final robust accuracy\n(student: solid, EMA: dashed)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    return fig


# -- evaluation report -----------------------------------------------------------------------------
def model_label(report: Mapping[str, Any]) -> str:
    """``small_cnn (EMA)``, ``small_cnn (student)`` or the pretrained model's name: which weights a plot shows."""
    model = report["model"]
    which = {"ema": "EMA", "student": "student"}.get(str(model.get("which")), None)
    return f"{model['name']} ({which})" if which else str(model["name"])


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


def reliability_figure(report: Mapping[str, Any]) -> Figure:
    """Reliability diagrams of the clean and the worst-case adversarial predictions, side by side."""
    m = report["metrics"]
    panels = [(m["clean"], "clean")]
    if "worst_case" in m:
        names = ", ".join(_short(n) for n in report["attacks"])
        panels.append((m["worst_case"], f"adversarial, worst case of\n{names}"))
    fig = Figure(figsize=(5.2 * len(panels), 4.8), layout="tight")
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (dist, title) in zip(axes[0], panels):
        _reliability_panel(ax, dist, title)
    fig.suptitle(f"{report['task']['name']} / {model_label(report)}: reliability", fontsize=10)
    return fig


def _threat_label(threat: Mapping[str, Any]) -> str:
    if threat.get("snr_db") is not None:
        return f"SNR {threat['snr_db']:g} dB"
    return f"{threat.get('norm')} eps {threat.get('eps'):g}"


def budget_curve_figure(report: Mapping[str, Any]) -> Figure:
    """Robust accuracy against the budget; the task's default budget and each evaluated attack marked."""
    curve = report["curve"]
    pts = [p for p in curve["points"] if p["x"] is not None]
    fig = Figure(figsize=(5.6, 4.4), layout="tight")
    ax = fig.subplots()
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
    if curve["axis"].startswith("SNR"):
        ax.invert_xaxis()
    ax.set(xlabel=curve["axis"], ylabel="accuracy", ylim=(-0.02, 1.02),
           title=f"{model_label(report)}: accuracy vs budget\n({report['task']['name']}, "
                 f"{report['task']['num_examples']} examples)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    return fig


def plot_reliability(report: Mapping[str, Any], path: str | Path) -> Path:
    return save_figure(reliability_figure(report), path)


def plot_budget_curve(report: Mapping[str, Any], path: str | Path) -> Path:
    return save_figure(budget_curve_figure(report), path)


def plot_training(history: Sequence[Mapping[str, Any]], analysis: Mapping[str, Any], path: str | Path) -> Path:
    return save_figure(robust_overfitting_figure(history, analysis), path)


# -- studies (robustkd sweep --report) ---------------------------------------------------------------
def scatter_figure(rows: Sequence[Mapping[str, Any]], x: str, y: str, title: str = "") -> Figure:
    """Robust vs clean accuracy, one point per study row at its mean, error bars one std over seeds.

    ``rows`` are ``{"label", "metrics": {name: {"mean", "std", "n"}}}``; rows missing either metric are
    left out."""
    fig = Figure(figsize=(9, 5), layout="tight")
    ax = fig.subplots()
    _many_colors(ax, len(rows))
    for row in rows:
        mx, my = row["metrics"].get(x), row["metrics"].get(y)
        if not mx or not my or mx.get("mean") is None or my.get("mean") is None:
            continue
        ax.errorbar(mx["mean"], my["mean"], xerr=mx.get("std") or 0, yerr=my.get("std") or 0, fmt="o", capsize=4,
                    label=f"{row['label']} (n={min(mx['n'], my['n'])})")
    ax.set(xlabel=f"{x} (mean ± std over seeds)", ylabel=f"{y} (mean ± std over seeds)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def _many_colors(ax, n: int) -> None:
    """Past matplotlib's 10 default colours, tab20's 20 (then marker shapes), so no two rows look alike."""
    if n > 10:
        from cycler import cycler
        from matplotlib import colormaps

        colors = [colormaps["tab20"](i) for i in range(20)]
        ax.set_prop_cycle(cycler(color=colors * 2) + cycler(marker=["o"] * 20 + ["s"] * 20))


def band_figure(series: Mapping[str, Mapping[str, Sequence[Any]]], ylabel: str, title: str = "") -> Figure:
    """Per study row, the mean over seeds per epoch with a band of one std: ``series[label]`` is
    ``{"epoch": [...], "mean": [...], "std": [...]}``."""
    fig = Figure(figsize=(10, 5), layout="tight")
    ax = fig.subplots()
    _many_colors(ax, sum(1 for s in series.values() if s["epoch"]))
    for label, s in series.items():
        if not s["epoch"]:
            continue
        line, = ax.plot(s["epoch"], s["mean"], ms=3, label=label)
        lo = [m - (d or 0) for m, d in zip(s["mean"], s["std"])]
        hi = [m + (d or 0) for m, d in zip(s["mean"], s["std"])]
        ax.fill_between(s["epoch"], lo, hi, color=line.get_color(), alpha=0.2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel=ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig
