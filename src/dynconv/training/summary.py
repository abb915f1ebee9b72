"""The result of ``dynconv compare``: one :class:`RowSummary` per row (a convolution type, or the
widened static network), the :class:`CompareResult` that holds them, and the tables that show
them (:func:`format_table`)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .intervals import PairedInterval

__all__ = ["LATENCY_BATCHES", "WIDE_STATIC", "CompareResult", "RowSummary", "format_count",
           "format_table"]

# The batch sizes at which the inference latency of each row is measured.
LATENCY_BATCHES = (1, 64)
#: The row of the static network widened to the parameter count of DY-Conv: is a dynamic
#: convolution better than simply a bigger static network?
WIDE_STATIC = "static-wide"


@dataclass
class RowSummary:
    """One row of the table over all seeds: ``name`` (``'static'``, ``'static-wide'``,
    ``'dynamic'``...), the conv type and model keywords it trains with, the ``label`` the table
    shows, its costs, each seed's final test accuracy, and its paired intervals against the
    static network and against the widened static network (None where there is none)."""

    name: str
    conv_type: str
    label: str
    parameters: int
    macs: float
    train_s_per_epoch: float
    latency_ms: dict[int, float]
    accuracies: list[float]
    model_args: dict[str, Any] = field(default_factory=dict)
    delta_vs_static: PairedInterval | None = None
    delta_vs_wide: PairedInterval | None = None

    @property
    def acc_mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def acc_std(self) -> float:
        return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else 0.0

    def as_row(self) -> dict[str, Any]:
        """The CSV row (accuracies and differences in points, MACs and parameters as counts;
        ``vs_static`` and ``vs_static_wide`` the conclusions)."""
        row: dict[str, Any] = {
            "row": self.name,
            "conv_type": self.conv_type,
            "model_args": " ".join(f"{k}={v!r}" for k, v in self.model_args.items()),
            "parameters": self.parameters,
            "macs": round(self.macs),
            "train_s_per_epoch": round(self.train_s_per_epoch, 4),
        }
        row.update({f"latency_ms_batch{b}": round(v, 4) for b, v in self.latency_ms.items()})
        row.update({
            "seeds": len(self.accuracies),
            "test_acc_mean": round(100 * self.acc_mean, 3),
            "test_acc_std": round(100 * self.acc_std, 3),
            "test_acc_min": round(100 * min(self.accuracies), 3),
            "test_acc_max": round(100 * max(self.accuracies), 3),
        })
        for key, interval in (("static", self.delta_vs_static),
                              ("static_wide", self.delta_vs_wide)):
            present = interval is not None
            row.update({
                f"delta_vs_{key}": round(100 * interval.mean, 3) if present else None,
                f"delta_vs_{key}_low": round(100 * interval.low, 3) if present else None,
                f"delta_vs_{key}_high": round(100 * interval.high, 3) if present else None,
                f"vs_{key}": interval.conclusion if present else None,
            })
        return row


@dataclass
class CompareResult:
    """The table rows, every run's per-epoch metrics (with ``row`` and ``seed``), the
    settings and the output folder."""

    summaries: list[RowSummary]
    metrics: list[dict[str, Any]]
    settings: dict[str, Any]
    out: Path
    files: list[str] = field(default_factory=list)


def format_count(value: float) -> str:
    """A count in 3 significant digits with k, M or G: ``189k``, ``1.53M``."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.0f}"


def _ratio(value: float, reference: RowSummary | None, of: str) -> str:
    """``value`` as a count, with its ratio to ``reference``'s (attribute ``of``)."""
    base = getattr(reference, of) if reference is not None else 0
    return format_count(value) + (f" (x{value / base:.2f})" if base and value != base else "")


def _lay_out(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_table(summaries: Sequence[RowSummary], markdown: bool = False) -> str:
    """The table as aligned text (for a terminal) or as Markdown; where the widened static
    network was trained, a second table of each dynamic row against it; with one seed, a line
    that says the intervals cover the test images only."""
    static = next((s for s in summaries if s.name == "static"), None)
    header = ["type", "params", "MACs", "train s/epoch"]
    header += [f"latency b{b} ms" for b in LATENCY_BATCHES]
    header += ["test acc % (mean ± std)", "min-max", "Δ vs static [95% CI]", "vs static"]
    rows = []
    for s in summaries:
        delta = s.delta_vs_static
        rows.append([
            s.label, format_count(s.parameters), _ratio(s.macs, static, "macs"),
            f"{s.train_s_per_epoch:.2f}",
            *[f"{s.latency_ms[b]:.2f}" for b in LATENCY_BATCHES],
            f"{100 * s.acc_mean:.2f} ± {100 * s.acc_std:.2f} (n={len(s.accuracies)})",
            f"{100 * min(s.accuracies):.2f}-{100 * max(s.accuracies):.2f}",
            delta.format() if delta else "-", delta.conclusion if delta else "-",
        ])
    parts = [_lay_out(header, rows, markdown)]
    against_wide = [s for s in summaries if s.delta_vs_wide is not None]
    wide = next((s for s in summaries if s.name == WIDE_STATIC), None)
    if against_wide and wide is not None:
        header = ["type", "params", "MACs", f"Δ vs {wide.name} [95% CI]", f"vs {wide.name}"]
        rows = [[s.label, _ratio(s.parameters, wide, "parameters"), _ratio(s.macs, wide, "macs"),
                 s.delta_vs_wide.format(), s.delta_vs_wide.conclusion] for s in against_wide]
        parts += [f"Against {wide.label}, the static network widened to the parameters of "
                  f"DY-Conv ({format_count(wide.parameters)} parameters):",
                  _lay_out(header, rows, markdown)]
    seeds = {len(s.accuracies) for s in summaries}
    if seeds == {1} and any(s.delta_vs_static for s in summaries):
        parts.append("One seed: the intervals cover the sample of test images only, not the "
                     "training randomness (more --seeds add it).")
    return "\n\n".join(parts)
