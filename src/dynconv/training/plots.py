"""The figures of ``dynconv compare``, drawn with matplotlib's object API (no pyplot state, no
display needed).

A row far below the others (a type that failed to train) would flatten every other row into
one line; each axis is therefore fitted to the rows that are not outliers
(:func:`outliers`), and an outlier is drawn at the edge of the axis with its value written.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from .._io import save_png
from .summary import WIDE_STATIC, RowSummary, format_count

__all__ = ["outliers", "plot_accuracy_vs_cost", "plot_curves"]

# How far from the median (in median absolute deviations, and at least in points) a value is an
# outlier of a figure's axis.
_OUTLIER_MADS = 10.0


def outliers(values: Sequence[float], floor: float) -> set[int]:
    """The indices of ``values`` farther from their median than 10 median absolute deviations,
    and than ``floor``; never more than a third of them, none of fewer than three values."""
    if len(values) < 3:
        return set()
    median = statistics.median(values)
    deviation = [abs(v - median) for v in values]
    limit = max(_OUTLIER_MADS * statistics.median(deviation), floor)
    far = sorted((i for i, d in enumerate(deviation) if d > limit), key=lambda i: -deviation[i])
    return set(far[: len(values) // 3])


def _colors(names: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    return {t: palette(i % 10) for i, t in enumerate(names)}


def _count_axis(ax: Any) -> None:
    """A log x axis of counts labelled 200k, 500k, 1M (the minor ticks at 2 and 5 only)."""
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_count(v)))
    ax.xaxis.set_minor_formatter(FuncFormatter(
        lambda v, _: format_count(v) if f"{v:.0e}"[0] in "25" else ""))


def _dodge(xs: list[float], factor: float = 1.035) -> list[float]:
    """``xs`` (on a log axis), those within 5% of each other moved apart by ``factor``, so that
    rows of equal cost (DY-Conv and CondConv) show both error bars."""
    groups: list[list[int]] = []
    for i in sorted(range(len(xs)), key=lambda i: xs[i]):
        if groups and xs[i] <= xs[groups[-1][0]] * 1.05:
            groups[-1].append(i)
        else:
            groups.append([i])
    moved = list(xs)
    for group in groups:
        for k, i in enumerate(sorted(group)):
            moved[i] = xs[i] * factor ** (k - (len(group) - 1) / 2)
    return moved


def _spread(wanted: list[float], gap: float, low: float, high: float) -> list[float]:
    """Positions as close as possible to ``wanted`` (in any order), at least ``gap`` apart, within
    [``low``, ``high``] where they fit: the label heights of points that are close."""
    order = sorted(range(len(wanted)), key=lambda i: wanted[i])
    placed = [0.0] * len(wanted)
    previous = low - gap
    for i in order:  # upwards, each at least a gap above the one below
        placed[i] = previous = max(wanted[i], previous + gap)
    following = high + gap
    for i in reversed(order):  # then down again from the top, where they ran over it
        placed[i] = following = min(placed[i], following - gap)
    return placed


def plot_curves(metrics: list[dict[str, Any]], path: str | Path) -> Figure:
    """Test accuracy, training loss and test loss per epoch, one colour per row of the
    comparison: the mean over the seeds as a line, their minimum-maximum as a band. The accuracy
    axis starts a little below the lowest final accuracy of the rows that are not outliers;
    an outlier's curve leaves it at the bottom (its legend entry gives its final accuracy).
    Returns the figure, written to ``path``."""
    names = list(dict.fromkeys(row["row"] for row in metrics))
    colors = _colors(names)
    figure = Figure(figsize=(14.5, 4.3))
    axes = figure.subplots(1, 3)
    panels = [("test_acc", "test accuracy (%), at temperature 1", 100.0),
              ("train_loss", "training loss, during the epoch", 1.0),
              ("test_loss", "test loss, at temperature 1", 1.0)]
    last_epoch = max((int(r["epoch"]) for r in metrics), default=0)
    finals: dict[str, float] = {}
    for ax, (key, label, scale) in zip(axes, panels):
        for name in names:
            by_epoch: dict[int, list[float]] = {}
            for row in metrics:
                if row["row"] == name and not math.isnan(float(row[key])):  # NaN: not evaluated
                    by_epoch.setdefault(int(row["epoch"]), []).append(scale * float(row[key]))
            epochs = sorted(by_epoch)
            sparse = len(epochs) < last_epoch  # evaluated every few epochs: mark the points
            mean = [statistics.fmean(by_epoch[e]) for e in epochs]
            if key == "test_acc" and epochs and epochs[-1] == last_epoch:
                finals[name] = mean[-1]
            ax.plot(epochs, mean, color=colors[name], label=name, linewidth=1.6,
                    marker="o" if sparse else None, markersize=4)
            ax.fill_between(epochs, [min(by_epoch[e]) for e in epochs],
                            [max(by_epoch[e]) for e in epochs], color=colors[name],
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
    zoom, far = "", set()
    if finals:  # zoom on the final range of the rows that are not outliers
        values = list(finals.values())
        far = {list(finals)[i] for i in outliers(values, floor=5.0)}
        kept = [finals[n] for n in finals if n not in far]
        low = max(0.0, min(kept) - 3 * (100 - min(kept)) - 2)
        axes[0].set_ylim(low, 100)
        if low > 0:
            zoom = f"; accuracy axis from {low:.0f}%"
    handles, labels = axes[0].get_legend_handles_labels()
    labels = [f"{n}\n(final {finals[n]:.1f}%,\nbelow the axis)" if n in far else n
              for n in labels]
    # beside the panels, where it hides no curve
    axes[-1].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                    fontsize="small")
    seeds = len({r["seed"] for r in metrics})
    tested = sorted({int(r["epoch"]) for r in metrics if not math.isnan(float(r["test_acc"]))})
    when = ("" if len(tested) == last_epoch else
            f" after epoch{'s' if len(tested) > 1 else ''} {', '.join(map(str, tested))}")
    figure.suptitle(f"Learning curves: mean over {seeds} seed{'s' if seeds != 1 else ''}, band "
                    f"= min-max over the seeds; test metrics at temperature 1{when}, training "
                    f"loss at the training temperature{zoom}", fontsize="medium")
    save_png(figure, path)
    return figure


def _accuracy_panel(ax: Any, summaries: Sequence[RowSummary], colors: dict[str, Any]) -> None:
    """Final test accuracy against MACs per image (log): mean ± std over the seeds, dots =
    seeds; the y axis fitted to the rows that are not outliers."""
    means = [100 * s.acc_mean for s in summaries]
    far = outliers(means, floor=5.0)
    kept = [i for i in range(len(summaries)) if i not in far]
    low = min(means[i] - 100 * summaries[i].acc_std for i in kept)
    high = max(min(100.0, means[i] + 100 * summaries[i].acc_std) for i in kept)
    low = min(low, *(100 * min(summaries[i].accuracies) for i in kept))
    pad = max(0.1, 0.08 * (high - low))
    bottom, top = low - pad, min(100.0 + pad / 2, high + pad)
    xs = _dodge([s.macs for s in summaries])
    # labels to the right of their points, spread apart where the points are close
    gap = 0.065 * (top - bottom)
    heights = _spread([means[i] for i in kept], gap, bottom + gap / 2, top - gap / 2)
    for i, height in zip(kept, heights):
        s = summaries[i]
        ax.annotate(s.label, (xs[i], means[i]), xytext=(xs[i] * 1.12, height),
                    textcoords="data", va="center", fontsize="small",
                    arrowprops={"arrowstyle": "-", "linewidth": 0.5, "color": "0.5",
                                "shrinkA": 0, "shrinkB": 4})
    for i, s in enumerate(summaries):
        x, color = xs[i], colors[s.name]
        if i in far:
            ax.scatter([x], [bottom], marker="v", s=70, color=color, clip_on=False, zorder=3)
            ax.annotate(f"{s.label}: {means[i]:.1f}%\n(below the axis)", (x, bottom),
                        textcoords="offset points", xytext=(0, 10), ha="center",
                        fontsize="small", color=color)
            continue
        ax.scatter([x] * len(s.accuracies), [100 * a for a in s.accuracies], color=color, s=12,
                   alpha=0.45)
        ax.errorbar([x], [means[i]], yerr=[100 * s.acc_std], fmt="o", color=color, capsize=4,
                    markersize=7)
    ax.set_ylim(bottom, top)
    _count_axis(ax)
    macs = [s.macs for s in summaries]
    ax.set_xlim(min(macs) / 1.3, max(macs) * 2.2)  # room for the labels on the right
    ax.set_xlabel("MACs per image (log scale)")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title("accuracy: mean ± std over the seeds, dots = seeds", fontsize="medium")
    ax.grid(alpha=0.3, which="both")


def _delta_panel(ax: Any, summaries: Sequence[RowSummary], colors: dict[str, Any]) -> None:
    """Each row's difference to static (filled) and to the widened static network (open), in
    points, with its paired 95% interval; the x axis fitted to the intervals that are not
    outliers."""
    marks = []  # (y, interval, filled, color)
    labels = []
    shown = [s for s in summaries if s.delta_vs_static is not None or s.delta_vs_wide is not None]
    for y, s in enumerate(reversed(shown)):
        labels.append(s.label)
        for interval, filled, offset in ((s.delta_vs_static, True, 0.12),
                                         (s.delta_vs_wide, False, -0.12)):
            if interval is not None:
                marks.append((y + (offset if s.delta_vs_wide is not None else 0.0), interval,
                              filled, colors[s.name]))
    means = [100 * m[1].mean for m in marks]
    far = outliers(means, floor=2.0)
    kept = [m for i, m in enumerate(marks) if i not in far] or marks
    low = min(0.0, *(100 * m[1].low for m in kept))
    high = max(0.0, *(100 * m[1].high for m in kept))
    pad = max(0.05, 0.08 * (high - low))
    left, right = low - pad, high + pad
    for i, (y, interval, filled, color) in enumerate(marks):
        face = color if filled else "white"
        if i in far:
            edge = left if interval.mean < 0 else right
            ax.scatter([edge], [y], marker="<" if interval.mean < 0 else ">", s=70,
                       color=color, clip_on=False, zorder=3)
            ax.annotate(f"{100 * interval.mean:+.1f} (off the axis)", (edge, y),
                        textcoords="offset points", xytext=(10 if interval.mean < 0 else -10, 6),
                        ha="left" if interval.mean < 0 else "right", fontsize="small",
                        color=color)
            continue
        ax.errorbar([100 * interval.mean], [y], xerr=[[100 * (interval.mean - interval.low)],
                                                      [100 * (interval.high - interval.mean)]],
                    fmt="o", color=color, markerfacecolor=face, capsize=4, markersize=7)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlim(left, right)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_ylim(-0.6, len(labels) - 0.4)
    ax.set_xlabel("Δ test accuracy (points), paired 95% interval")
    wide = any(s.delta_vs_wide is not None for s in summaries)
    ax.set_title("filled: vs static" + (f"; open: vs {WIDE_STATIC}" if wide else "")
                 + "; interval left of 0 = worse, right = better", fontsize="medium")
    ax.grid(alpha=0.3, axis="x")


def plot_accuracy_vs_cost(summaries: Sequence[RowSummary], path: str | Path) -> Figure:
    """Left: final test accuracy against MACs per image (log scale), mean ± std over the seeds
    and each seed as a dot. Right, where there is a static row: each row's difference to static
    (and to the widened static network) with its paired 95% interval. Returns the figure,
    written to ``path``."""
    colors = _colors([s.name for s in summaries])
    deltas = any(s.delta_vs_static is not None or s.delta_vs_wide is not None
                 for s in summaries)
    figure = Figure(figsize=(13, 4.8) if deltas else (6.5, 4.8))
    axes = figure.subplots(1, 2 if deltas else 1, squeeze=False)[0]
    _accuracy_panel(axes[0], summaries, colors)
    if deltas:
        _delta_panel(axes[1], summaries, colors)
    seeds = len(summaries[0].accuracies)
    figure.suptitle(f"Final test accuracy against cost, {seeds} seed{'s' if seeds != 1 else ''}"
                    + (" (one seed: intervals over the test images only)" if seeds == 1 else ""),
                    fontsize="medium")
    save_png(figure, path)
    return figure
