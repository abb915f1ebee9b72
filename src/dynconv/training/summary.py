"""The result of ``dynconv compare``: one :class:`TypeSummary` per convolution type, the
:class:`CompareResult` that holds them, and the table that shows them (:func:`format_table`)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LATENCY_BATCHES", "CompareResult", "TypeSummary", "format_table"]

# The batch sizes at which the inference latency of each type is measured.
LATENCY_BATCHES = (1, 64)


@dataclass
class TypeSummary:
    """One row of the table: a convolution type over all seeds."""

    conv_type: str
    parameters: int
    macs: float
    train_s_per_epoch: float
    latency_ms: dict[int, float]
    accuracies: list[float]
    delta_vs_static: float | None = None

    @property
    def acc_mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def acc_std(self) -> float:
        return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else 0.0

    def as_row(self) -> dict[str, Any]:
        """The CSV row (accuracies in %, MACs and parameters as counts)."""
        row: dict[str, Any] = {
            "conv_type": self.conv_type,
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
            "delta_vs_static": (None if self.delta_vs_static is None
                                else round(100 * self.delta_vs_static, 3)),
        })
        return row


@dataclass
class CompareResult:
    """The table rows, every run's per-epoch metrics (with ``conv_type`` and ``seed``), the
    settings and the output folder."""

    summaries: list[TypeSummary]
    metrics: list[dict[str, Any]]
    settings: dict[str, Any]
    out: Path
    files: list[str] = field(default_factory=list)


def _fmt_count(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.0f}"


def format_table(summaries: Sequence[TypeSummary], markdown: bool = False) -> str:
    """The table as aligned text (for a terminal) or as Markdown."""
    static = next((s for s in summaries if s.conv_type == "static"), None)
    header = ["type", "params", "MACs", "train s/epoch"]
    header += [f"latency b{b} ms" for b in LATENCY_BATCHES]
    header += ["test acc % (mean ± std)", "min-max", "Δ vs static"]
    rows = []
    for s in summaries:
        relative = (f" (x{s.macs / static.macs:.2f})"
                    if static is not None and s is not static and static.macs else "")
        delta = "" if s.delta_vs_static is None else f"{100 * s.delta_vs_static:+.2f}"
        rows.append([
            s.conv_type, _fmt_count(s.parameters), _fmt_count(s.macs) + relative,
            f"{s.train_s_per_epoch:.2f}",
            *[f"{s.latency_ms[b]:.2f}" for b in LATENCY_BATCHES],
            f"{100 * s.acc_mean:.2f} ± {100 * s.acc_std:.2f} (n={len(s.accuracies)})",
            f"{100 * min(s.accuracies):.2f}-{100 * max(s.accuracies):.2f}", delta or "-",
        ])
    if markdown:
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
