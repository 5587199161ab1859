"""Plots people would rather look at than read: training curves and method schedules."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_training_curves(history: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Clean and robust accuracy (student and EMA) and training loss per epoch."""
    evaluated = [h for h in history if "clean_accuracy" in h]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for prefix, style in (("", "-"), ("ema_", "--")):
        rows = [h for h in evaluated if f"{prefix}clean_accuracy" in h]
        if not rows:
            continue
        who = "EMA" if prefix else "model"
        epochs = [h["epoch"] for h in rows]
        ax_acc.plot(epochs, [h[f"{prefix}clean_accuracy"] for h in rows], style, marker="o", label=f"{who} clean")
        for name in rows[-1].get(f"{prefix}robust_accuracy", {}):
            ax_acc.plot(epochs, [h[f"{prefix}robust_accuracy"].get(name) for h in rows], style, marker="s",
                        label=f"{who} {name}")
    from matplotlib.ticker import MaxNLocator

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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_curves(curves: dict[str, Sequence[float]], x: Sequence[float], path: str | Path, xlabel: str,
                title: str) -> Path:
    """One panel per named curve (e.g. ADR's temperature and interpolation factor per step)."""
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
    for ax, (name, values) in zip(axes[0], curves.items()):
        ax.plot(x, values)
        ax.set(xlabel=xlabel, title=name)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
