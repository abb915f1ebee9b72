"""What the dynamic layers of a model decided: capture their attentions during forward passes,
accumulate them over a dataset, summarise, plot.

Every dynconv layer contributes its own record through
:meth:`~dynconv.DynamicConvBase.attention_record` (``'kernel'`` [N, K] for DY-Conv/CondConv;
``'channel'``, ``'filter'``, ``'spatial'``, ``'kernel'`` for ODConv; ``'region_map'``
[N, H_out, W_out] for a region-aware layer). :class:`AttentionCapture` calls it from a forward
hook on the layer's input, under ``torch.no_grad()``; the model's outputs are untouched.
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

__all__ = [
    "AttentionCapture",
    "LayerAttention",
    "attention_entropy",
    "inspect_attention",
    "plot_kernel_attention",
    "plot_region_maps",
    "plot_spatial_attention",
    "write_summary",
]

# Records kept per sample (small: [N, K]); the region map is kept for the first samples only and
# as a count per region; every other record is averaged over the samples.
_PER_SAMPLE = ("kernel",)
_REGION = "region_map"


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
    """

    name: str
    layer_type: str
    num_regions: int | None = None
    samples: int = 0
    kernel: Tensor | None = None
    means: dict[str, Tensor] = field(default_factory=dict)
    region_maps: Tensor | None = None
    region_counts: Tensor | None = None
    _kernel_parts: list[Tensor] = field(default_factory=list, repr=False)
    _sums: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def add(self, record: dict[str, Tensor], keep_maps: int) -> None:
        """Accumulate one batch's record (tensors with a leading batch dimension)."""
        n = next(iter(record.values())).shape[0] if record else 0
        for key, value in record.items():
            value = value.detach().cpu()
            if key in _PER_SAMPLE:
                self._kernel_parts.append(value.float())
            elif key == _REGION:
                self._add_regions(value.long(), keep_maps)
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

    def _refresh(self) -> None:
        if self._kernel_parts:
            self.kernel = torch.cat(self._kernel_parts)
            self._kernel_parts = [self.kernel]
        self.means = {k: (v / self.samples).float() for k, v in self._sums.items()}

    @property
    def entropy(self) -> Tensor | None:
        """Each sample's kernel-attention entropy [S] in nats (see :func:`attention_entropy`)."""
        return None if self.kernel is None else attention_entropy(self.kernel)

    def summary(self) -> dict[str, Any]:
        """Plain numbers for CSV/JSON: sample count, kernel-attention mean per kernel and its
        entropy (mean, and the maximum ``log K``), the means of the other records, region
        shares."""
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
        self.layers: dict[str, LayerAttention] = {
            name: LayerAttention(name, type(m).__name__, getattr(m, "num_regions", None))
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
    ``attention_summary.csv`` (one row per layer: kernel-attention entropy and mean per kernel)
    to the folder ``out``; return their paths."""
    out = Path(out)
    rows = [layer.summary() for layer in layers.values()]
    json_path, csv_path = out / "attention_summary.json", out / "attention_summary.csv"
    text = json.dumps(rows, indent=1)
    write_atomically(json_path, lambda f: f.write(text.encode()))
    fields = ["layer", "type", "samples", "num_kernels", "kernel_entropy_mean",
              "kernel_entropy_max", "kernel_mean", "top_kernel_share"]

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
