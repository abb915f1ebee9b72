"""What the dynamic layers of a model decided: capture their attentions during forward passes,
accumulate them over a dataset, summarise, plot.

Every dynconv layer contributes its own record through
:meth:`~dynconv.DynamicConvBase.attention_record` (``'kernel'`` [N, K] for DY-Conv/CondConv;
``'channel'``, ``'filter'``, ``'spatial'``, ``'kernel'`` for ODConv; ``'region_map'``
[N, H_out, W_out] for a region-aware layer; ``'cells'`` [N, m, n] for KernelWarehouse: each of
the layer's m kernel cells' weights over the n cells of its warehouse).
:class:`AttentionCapture` calls it from a forward hook on the layer's input, under
``torch.no_grad()``; the model's outputs are untouched.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._io import save_png, write_atomically
from ..layers.base import DynamicConvBase
from ..layers.warehouse import Warehouse

__all__ = [
    "AttentionCapture",
    "LayerAttention",
    "attention_entropy",
    "inspect_attention",
    "plot_cell_attention",
    "plot_kernel_attention",
    "plot_region_maps",
    "plot_spatial_attention",
    "write_summary",
]

# Records kept per sample (small: [N, K]); the region map is kept for the first samples only and
# as a count per region; KernelWarehouse's cell weights as absolute sums and entropies; every
# other record is averaged over the samples.
_PER_SAMPLE = ("kernel",)
_REGION = "region_map"
_CELLS = "cells"
#: Warehouse cells listed by :meth:`LayerAttention.summary` and ``dynconv inspect``.
TOP_CELLS = 5


def attention_entropy(weights: Tensor) -> Tensor:
    """Entropy in nats of each row of ``weights`` [N, K] (>= 0) after normalising it to sum to
    one: for a softmax attention the entropy of the distribution (0 for one kernel, ``log K``
    for uniform); for sigmoid gates that of their relative sizes. Returns [N] (float64)."""
    if not isinstance(weights, Tensor) or weights.dim() != 2:
        got = list(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"weights must be a tensor [N, K], got {got}")
    w = weights.detach().to(torch.float64)
    p = w / w.sum(dim=1, keepdim=True)
    return -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(dim=1)


@dataclass
class LayerAttention:
    """One layer's attentions accumulated over every sample seen.

    ``kernel``: every sample's kernel attention [S, K] (or None); ``means``: the mean over the
    samples of each other record (e.g. ``'channel'`` [C_in], ``'spatial'`` [kH, kW]);
    ``region_maps``: the region maps of the first samples [M, H_out, W_out] and
    ``region_counts`` the number of output pixels given to each region over all samples [R];
    ``num_regions`` the layer's number of regions, where it says (``num_regions``), else None.

    KernelWarehouse (record ``'cells'`` [N, m, n]): ``cell_owners`` lists, for the layer's
    warehouse, (layer name, first cell, number of cells) of each layer that brought cells, in
    cell order; ``cell_share`` [m, n] is, per kernel cell, the share of its absolute weight that
    went to each warehouse cell over the samples, ``cell_usage`` [n] the same for the layer's
    whole kernel, ``cell_entropy`` [S] each sample's entropy of those weights (nats, mean over
    the kernel cells; at most ``log n``).
    """

    name: str
    layer_type: str
    num_regions: int | None = None
    cell_owners: list[tuple[str, int, int]] | None = None
    samples: int = 0
    kernel: Tensor | None = None
    means: dict[str, Tensor] = field(default_factory=dict)
    region_maps: Tensor | None = None
    region_counts: Tensor | None = None
    cell_share: Tensor | None = None
    cell_usage: Tensor | None = None
    cell_entropy: Tensor | None = None
    _kernel_parts: list[Tensor] = field(default_factory=list, repr=False)
    _sums: dict[str, Tensor] = field(default_factory=dict, repr=False)
    _cell_abs: Tensor | None = field(default=None, repr=False)
    _cell_entropy_parts: list[Tensor] = field(default_factory=list, repr=False)

    def add(self, record: dict[str, Tensor], keep_maps: int) -> None:
        """Accumulate one batch's record (tensors with a leading batch dimension)."""
        n = next(iter(record.values())).shape[0] if record else 0
        for key, value in record.items():
            value = value.detach().cpu()
            if key in _PER_SAMPLE:
                self._kernel_parts.append(value.float())
            elif key == _REGION:
                self._add_regions(value.long(), keep_maps)
            elif key == _CELLS:
                self._add_cells(value)
            else:
                total = value.double().sum(dim=0)
                self._sums[key] = self._sums[key] + total if key in self._sums else total
        self.samples += n
        self._refresh()

    def _add_regions(self, maps: Tensor, keep_maps: int) -> None:
        kept = 0 if self.region_maps is None else len(self.region_maps)
        if kept < keep_maps:
            new = maps[: keep_maps - kept]
            self.region_maps = new if self.region_maps is None else torch.cat(
                [self.region_maps, new])
        counts = torch.bincount(maps.flatten())
        if self.region_counts is not None:
            size = max(len(counts), len(self.region_counts))
            counts = _pad_to(counts, size) + _pad_to(self.region_counts, size)
        self.region_counts = counts

    def _add_cells(self, weights: Tensor) -> None:
        """Accumulate KernelWarehouse cell weights [N, m, n] (signed: the attention divides by
        the sum of absolute values, so their sizes are what a cell contributes)."""
        size = weights.double().abs()
        total = size.sum(dim=0)
        self._cell_abs = total if self._cell_abs is None else self._cell_abs + total
        n, m, cells = size.shape
        entropy = attention_entropy(size.reshape(n * m, cells)).reshape(n, m).mean(dim=1)
        self._cell_entropy_parts.append(entropy.float())

    def _refresh(self) -> None:
        if self._kernel_parts:
            self.kernel = torch.cat(self._kernel_parts)
            self._kernel_parts = [self.kernel]
        if self._cell_entropy_parts:
            self.cell_entropy = torch.cat(self._cell_entropy_parts)
            self._cell_entropy_parts = [self.cell_entropy]
            per_cell = self._cell_abs.sum(dim=1, keepdim=True)
            self.cell_share = (self._cell_abs / per_cell.clamp_min(1e-300)).float()
            self.cell_usage = (self._cell_abs.sum(dim=0) / per_cell.sum().clamp_min(1e-300)
                               ).float()
        self.means = {k: (v / self.samples).float() for k, v in self._sums.items()}

    def cell_share_by_layer(self) -> dict[str, float]:
        """KernelWarehouse: the share of the layer's absolute cell weight that went to the cells
        each layer of its warehouse brought (its own name among them); {} for other layers."""
        if self.cell_usage is None or not self.cell_owners:
            return {}
        return {owner: self.cell_usage[start:start + count].sum().item()
                for owner, start, count in self.cell_owners}

    def top_cells(self, count: int = TOP_CELLS) -> list[tuple[int, str, float]]:
        """KernelWarehouse: the ``count`` most used warehouse cells as (index, the layer that
        brought it, share of the layer's absolute cell weight), most used first."""
        if self.cell_usage is None:
            return []
        owners = {i: owner for owner, start, n in self.cell_owners or [] for i in
                  range(start, start + n)}
        shares, order = self.cell_usage.sort(descending=True, stable=True)
        return [(int(i), owners.get(int(i), "?"), float(v))
                for i, v in zip(order[:count], shares[:count])]

    @property
    def entropy(self) -> Tensor | None:
        """Each sample's kernel-attention entropy [S] in nats (see :func:`attention_entropy`)."""
        return None if self.kernel is None else attention_entropy(self.kernel)

    def summary(self) -> dict[str, Any]:
        """Plain numbers for CSV/JSON: sample count, kernel-attention mean per kernel and its
        entropy (mean, and the maximum ``log K``), the means of the other records, region
        shares; for KernelWarehouse the cell entropy (mean, maximum ``log n``), the share of the
        layer's own cells and of each layer's, the most used cells and every cell's share."""
        row: dict[str, Any] = {"layer": self.name, "type": self.layer_type,
                               "samples": self.samples}
        if self.kernel is not None:
            k = self.kernel.shape[1]
            row["num_kernels"] = k
            row["kernel_mean"] = [round(v, 6) for v in self.kernel.mean(0).tolist()]
            row["kernel_entropy_mean"] = round(self.entropy.mean().item(), 6)
            row["kernel_entropy_max"] = round(math.log(k), 6)
            row["top_kernel_share"] = [
                round(v, 6) for v in
                (torch.bincount(self.kernel.argmax(1), minlength=k).double() / len(self.kernel))
                .tolist()
            ]
        if self.cell_usage is not None:
            m, n = self.cell_share.shape
            row["mixtures"], row["num_cells"] = m, n
            row["cell_entropy_mean"] = round(self.cell_entropy.mean().item(), 6)
            row["cell_entropy_max"] = round(math.log(n), 6)
            by_layer = self.cell_share_by_layer()
            if self.name in by_layer:
                row["own_cell_share"] = round(by_layer[self.name], 6)
            row["cell_share_by_layer"] = {k: round(v, 6) for k, v in by_layer.items()}
            top = self.top_cells()
            row["top_cells"] = [i for i, _, _ in top]
            row["top_cell_layer"] = [owner for _, owner, _ in top]
            row["top_cell_share"] = [round(v, 6) for _, _, v in top]
            row["cell_usage"] = [round(v, 6) for v in self.cell_usage.tolist()]
        for key, mean in self.means.items():
            row[f"{key}_mean"] = [round(v, 6) for v in mean.flatten().tolist()]
        if self.region_counts is not None:
            share = self.region_counts.double() / self.region_counts.sum()
            row["region_share"] = [round(v, 6) for v in share.tolist()]
        return row


def _pad_to(t: Tensor, size: int) -> Tensor:
    return torch.cat([t, t.new_zeros(size - len(t))])


class AttentionCapture:
    """Capture what every dynconv layer of ``model`` decides in each forward pass.

    Use as a context manager (the hooks are removed on exit)::

        with AttentionCapture(model) as capture:
            model(x)
        capture.last["layer1.0.conv1"]["kernel"]      # [N, K] of the last forward
        capture.layers["layer1.0.conv1"].entropy      # [S], every sample seen so far

    The layers must be in eval mode (``model.eval()``): the record is recomputed from the
    layer's input, which in training mode would update the statistics of a BatchNorm in the
    attention a second time. ``keep_maps``: how many region maps to keep per layer.
    """

    def __init__(self, model: nn.Module, keep_maps: int = 8) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.keep_maps = keep_maps
        self.dynamic = {
            name: m for name, m in model.named_modules() if isinstance(m, DynamicConvBase)
        }
        if not self.dynamic:
            raise ValueError(
                f"{type(model).__name__} holds no dynconv layer (DynamicConvBase) to inspect"
            )
        self.last: dict[str, dict[str, Tensor]] = {}
        names = {id(m): name for name, m in model.named_modules()}
        self.layers: dict[str, LayerAttention] = {
            name: LayerAttention(name, type(m).__name__, getattr(m, "num_regions", None),
                                 _cell_owners(m, names))
            for name, m in self.dynamic.items()
        }
        self._handles: list[Any] = []

    def __enter__(self) -> AttentionCapture:
        training = [name for name, m in self.dynamic.items() if m.training]
        if training:
            raise ValueError(
                f"AttentionCapture needs the model in eval mode (model.eval()); "
                f"{len(training)} dynconv layer(s) are in training mode, e.g. {training[0]!r}"
            )
        for name, module in self.dynamic.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module: DynamicConvBase, args: tuple[Any, ...], output: Any) -> None:
            with torch.no_grad():
                record = module.attention_record(args[0])
            record = {k: v.detach() for k, v in record.items()}
            self.last[name] = record
            self.layers[name].add(record, self.keep_maps)

        return hook


def _cell_owners(layer: nn.Module, names: dict[int, str]) -> list[tuple[str, int, int]] | None:
    """(name, first cell, cells) of each layer that brought cells to ``layer``'s KernelWarehouse
    warehouse, in cell order (``'(not in the model)'`` for a layer the model does not hold);
    None for a layer without a warehouse."""
    warehouse = getattr(layer, "warehouse", None)
    if not isinstance(warehouse, Warehouse):
        return None
    owners = [(names.get(id(m), "(not in the model)"), m.layout.offset, m.layout.own_cells)
              for m in warehouse.members]
    return sorted(owners, key=lambda owner: owner[1])


def inspect_attention(
    model: nn.Module, batches: Iterable[Tensor], keep_maps: int = 8
) -> dict[str, LayerAttention]:
    """Run ``model`` (in eval mode, without gradients; its mode is restored after) on every
    batch [N, C, H, W] of ``batches``; return layer name -> :class:`LayerAttention`."""
    training = model.training if isinstance(model, nn.Module) else False
    capture = AttentionCapture(model, keep_maps)
    model.eval()
    try:
        with capture, torch.no_grad():
            for x in batches:
                model(x)
    finally:
        model.train(training)
    return capture.layers


# -- summary and plots -------------------------------------------------------------------------


def write_summary(layers: dict[str, LayerAttention], out: str | Path) -> list[Path]:
    """Write ``attention_summary.json`` (every number of :meth:`LayerAttention.summary`) and
    ``attention_summary.csv`` (one row per layer: kernel-attention entropy and mean per kernel;
    KernelWarehouse: cell entropy, own-cell share, the most used cells) to the folder ``out``;
    return their paths."""
    out = Path(out)
    rows = [layer.summary() for layer in layers.values()]
    json_path, csv_path = out / "attention_summary.json", out / "attention_summary.csv"
    text = json.dumps(rows, indent=1)
    write_atomically(json_path, lambda f: f.write(text.encode()))
    fields = ["layer", "type", "samples", "num_kernels", "kernel_entropy_mean",
              "kernel_entropy_max", "kernel_mean", "top_kernel_share", "mixtures", "num_cells",
              "cell_entropy_mean", "cell_entropy_max", "own_cell_share", "top_cells",
              "top_cell_layer", "top_cell_share"]

    def write_csv(f: Any) -> None:
        import io

        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: " ".join(map(str, v)) if isinstance(v, list) else v
                             for k, v in row.items()})
        f.write(buffer.getvalue().encode())

    write_atomically(csv_path, write_csv)
    return [json_path, csv_path]


def _grid(count: int, columns: int) -> tuple[int, int]:
    columns = max(1, min(columns, count))
    return math.ceil(count / columns), columns


def _axes(figure: Any, rows: int, columns: int) -> Iterator[Any]:
    axes = figure.subplots(rows, columns, squeeze=False)
    yield from axes.flat


def plot_kernel_attention(layers: dict[str, LayerAttention], path: str | Path) -> bool:
    """Per layer, the distribution over the samples of each kernel's attention (box plots) and
    the mean entropy against its maximum ``log K``; one panel per layer. Returns False (and
    writes nothing) if no layer has a kernel attention with K >= 2."""
    from matplotlib.figure import Figure


    chosen = [lay for lay in layers.values() if lay.kernel is not None and lay.kernel.shape[1] > 1]
    if not chosen:
        return False
    rows, columns = _grid(len(chosen), 4)
    figure = Figure(figsize=(3.2 * columns, 2.6 * rows))
    for ax, layer in zip(_axes(figure, rows, columns), chosen):
        k = layer.kernel.shape[1]
        ax.boxplot(layer.kernel.numpy(), showfliers=False)
        ax.set_xticks(range(1, k + 1), [str(i) for i in range(k)])
        ax.set_ylim(-0.02, 1.02)
        entropy = layer.entropy.mean().item()
        ax.set_title(f"{layer.name}\nH = {entropy:.2f} / {math.log(k):.2f} nats", fontsize=8)
        ax.set_xlabel("kernel", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(figure.axes)[len(chosen):]:
        ax.set_visible(False)
    figure.suptitle(f"kernel attention over {chosen[0].samples} samples", fontsize=10)
    save_png(figure, path)
    return True


def plot_cell_attention(layers: dict[str, LayerAttention], path: str | Path) -> bool:
    """Per KernelWarehouse layer, the share of its absolute cell weight that each warehouse cell
    took over the samples (bars; the layer's own cells in colour, the other layers' in grey,
    dotted lines between the layers' blocks), with the share of its own cells and the mean
    entropy against its maximum ``log n``; one panel per layer. Returns False (and writes
    nothing) if no layer has cell weights."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    chosen = [lay for lay in layers.values() if lay.cell_usage is not None]
    if not chosen:
        return False
    rows, columns = _grid(len(chosen), 3)
    figure = Figure(figsize=(4.2 * columns, 2.6 * rows))
    for ax, layer in zip(_axes(figure, rows, columns), chosen):
        n = len(layer.cell_usage)
        colors = ["0.6"] * n
        for owner, start, count in layer.cell_owners or []:
            if owner == layer.name:
                colors[start:start + count] = ["tab:blue"] * count
            if start:
                ax.axvline(start - 0.5, color="0.3", linestyle=":", linewidth=0.8)
        ax.bar(range(n), layer.cell_usage.numpy(), width=1.0, color=colors)
        ax.set_xlim(-0.5, n - 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        own = layer.cell_share_by_layer().get(layer.name, float("nan"))
        entropy = layer.cell_entropy.mean().item()
        ax.set_title(f"{layer.name}\nown cells {own:.0%}, H = {entropy:.2f} / {math.log(n):.2f} "
                     "nats", fontsize=8)
        ax.set_xlabel("warehouse cell", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(figure.axes)[len(chosen):]:
        ax.set_visible(False)
    figure.suptitle(f"share of each warehouse cell over {chosen[0].samples} samples (blue: the "
                    "layer's own cells)", fontsize=10)
    save_png(figure, path)
    return True


def plot_spatial_attention(layers: dict[str, LayerAttention], path: str | Path) -> bool:
    """Per layer with a spatial attention (ODConv, kernel larger than 1x1), its mean over the
    samples as a kH x kW heat map with the values written in. Returns False (and writes
    nothing) if no layer has one."""
    from matplotlib.figure import Figure


    chosen = [lay for lay in layers.values() if "spatial" in lay.means]
    if not chosen:
        return False
    rows, columns = _grid(len(chosen), 6)
    figure = Figure(figsize=(2.2 * columns, 2.3 * rows))
    for ax, layer in zip(_axes(figure, rows, columns), chosen):
        mean = layer.means["spatial"].numpy()
        ax.imshow(mean, cmap="viridis", vmin=0, vmax=1)
        for (i, j), value in _cells(mean):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if value < 0.5 else "black")
        ax.set_title(layer.name, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(figure.axes)[len(chosen):]:
        ax.set_visible(False)
    figure.suptitle(f"mean spatial attention over {chosen[0].samples} samples (colour: 0 to 1)",
                    fontsize=9)
    save_png(figure, path)
    return True


def _cells(array: Any) -> Iterator[tuple[tuple[int, int], float]]:
    for i in range(array.shape[0]):
        for j in range(array.shape[1]):
            yield (i, j), float(array[i, j])


def plot_region_maps(
    layers: dict[str, LayerAttention], images: Tensor, path: str | Path
) -> bool:
    """For each layer with region maps, the first kept samples' maps overlaid on ``images``
    [M, C, H, W] (the inputs of those samples, any scale), maps upsampled to the image size by
    nearest neighbour, one colour per region index (the colour bar maps them), the image drawn
    as the white outline of its brighter half. Returns False if no layer has one."""
    import torch.nn.functional as F
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.figure import Figure

    chosen = [lay for lay in layers.values() if lay.region_maps is not None]
    if not chosen:
        return False
    count = min(len(images), min(len(lay.region_maps) for lay in chosen))
    regions = max(max(lay.num_regions or 0, int(lay.region_counts.numel())) for lay in chosen)
    # one colour per region: tab10/tab20 (distinct) where they suffice, else viridis
    palette = next((colormaps[name] for name, size in (("tab10", 10), ("tab20", 20))
                    if regions <= size), colormaps["viridis"].resampled(regions))
    colors = ListedColormap([palette(i) for i in range(regions)])
    norm = BoundaryNorm([i - 0.5 for i in range(regions + 1)], regions)
    figure = Figure(figsize=(1.8 * count + 0.9, 1.9 * len(chosen)))
    grid = figure.add_gridspec(len(chosen), count + 1, width_ratios=[1.0] * count + [0.12])
    axes = [[figure.add_subplot(grid[r, c]) for c in range(count)] for r in range(len(chosen))]
    shown = images[:count].detach().float().cpu()
    shown = (shown - shown.amin()) / (shown.amax() - shown.amin()).clamp_min(1e-12)
    for row, layer in zip(axes, chosen):
        maps = F.interpolate(layer.region_maps[:count, None].float(), size=shown.shape[-2:],
                             mode="nearest")[:, 0]
        for i, ax in enumerate(row):
            ax.imshow(maps[i].numpy(), cmap=colors, norm=norm, interpolation="nearest")
            # the input as an outline: the colours stay those of the colour bar
            grey = shown[i].mean(0)
            if grey.amin() < 0.5 < grey.amax():
                ax.contour(grey.numpy(), levels=[0.5], colors="white", linewidths=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(layer.name, fontsize=7)
    bar = figure.colorbar(ScalarMappable(norm=norm, cmap=colors),
                          cax=figure.add_subplot(grid[:, count]), ticks=range(regions))
    bar.set_label("region", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    figure.suptitle("region maps: the region of each output pixel (colour), the input image's "
                    "outline in white", fontsize=10)
    save_png(figure, path)
    return True
