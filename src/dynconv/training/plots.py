"""The figures of ``dynconv compare``, drawn with matplotlib's object API (no pyplot state, no
display needed)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from .._io import save_png
from .summary import TypeSummary

__all__ = ["plot_accuracy_vs_cost", "plot_curves"]


def _colors(types: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    return {t: palette(i % 10) for i, t in enumerate(types)}


def plot_curves(metrics: list[dict[str, Any]], path: str | Path) -> None:
    """Test accuracy, training loss and test loss per epoch, one colour per convolution type:
    the mean over the seeds as a line, their minimum-maximum as a band."""
    types = list(dict.fromkeys(row["conv_type"] for row in metrics))
    colors = _colors(types)
    figure = Figure(figsize=(13, 4))
    axes = figure.subplots(1, 3)
    panels = [("test_acc", "test accuracy (%)", 100.0), ("train_loss", "training loss", 1.0),
              ("test_loss", "test loss", 1.0)]
    for ax, (key, label, scale) in zip(axes, panels):
        for conv_type in types:
            by_epoch: dict[int, list[float]] = {}
            for row in metrics:
                if row["conv_type"] == conv_type:
                    by_epoch.setdefault(int(row["epoch"]), []).append(scale * float(row[key]))
            epochs = sorted(by_epoch)
            mean = [statistics.fmean(by_epoch[e]) for e in epochs]
            ax.plot(epochs, mean, color=colors[conv_type], label=conv_type, linewidth=1.6)
            ax.fill_between(epochs, [min(by_epoch[e]) for e in epochs],
                            [max(by_epoch[e]) for e in epochs], color=colors[conv_type],
                            alpha=0.15, linewidth=0)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if key.endswith("loss"):
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(
                lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
        ax.grid(alpha=0.3, which="both")
    if metrics:  # zoom on the interesting range: from a little below the worst final accuracy
        last_epoch = max(int(r["epoch"]) for r in metrics)
        finals = [float(r["test_acc"]) * 100 for r in metrics if int(r["epoch"]) == last_epoch]
        low = max(0.0, min(finals) - 3 * (100 - min(finals)) - 2)
        axes[0].set_ylim(low, 100)
    axes[0].legend(loc="lower right", fontsize="small")
    seeds = len({r["seed"] for r in metrics})
    figure.suptitle(f"Learning curves: mean over {seeds} seed(s), band = min-max; evaluation at "
                    "temperature 1; the accuracy axis is zoomed on the final range",
                    fontsize="medium")
    save_png(figure, path)


def plot_accuracy_vs_cost(summaries: Sequence[TypeSummary], path: str | Path) -> None:
    """Final test accuracy against MACs per image (left) and against latency at batch 1
    (right): mean and standard deviation over the seeds, each seed as a small dot."""
    colors = _colors([s.conv_type for s in summaries])
    figure = Figure(figsize=(11, 4.2))
    axes = figure.subplots(1, 2)
    costs = [("macs", "MACs per image (millions)", lambda s: s.macs / 1e6),
             ("latency", "latency at batch 1 (ms)", lambda s: s.latency_ms[1])]
    for ax, (_, label, cost) in zip(axes, costs):
        for i, s in enumerate(summaries):
            x = cost(s)
            accs = [100 * a for a in s.accuracies]
            ax.scatter([x] * len(accs), accs, color=colors[s.conv_type], s=12, alpha=0.45)
            ax.errorbar([x], [statistics.fmean(accs)], yerr=[100 * s.acc_std], fmt="o",
                        color=colors[s.conv_type], capsize=4, markersize=7, label=s.conv_type)
            # alternate sides so that types of equal cost keep readable labels
            ax.annotate(s.conv_type, (x, statistics.fmean(accs)), textcoords="offset points",
                        xytext=(8, 4) if i % 2 == 0 else (-8, -12),
                        ha="left" if i % 2 == 0 else "right", fontsize="small")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.margins(x=0.15)
    axes[0].legend(loc="best", fontsize="small")
    figure.suptitle("Final test accuracy against cost: mean ± std over the seeds, dots = seeds",
                    fontsize="medium")
    save_png(figure, path)
