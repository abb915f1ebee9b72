"""``mixture_conv2d``: each sample convolved with its own mixture of a shared kernel bank
(DY-Conv, CondConv, ODConv), by assembling the per-sample kernels or by mixing the outputs of
all K kernels."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._conv_args import ConvGeometry, PaddingArg, Pair, parse_geometry
from . import tuning
from ._common import (
    autocast_dtype,
    check_conv,
    check_input,
    check_kernels,
    check_shape,
    is_exporting,
    match_memory_format,
    pad_for_conv,
    saved_tensor_hooks_active,
    shape_list,
)
from .dispatch import DispatchRule, freed_memory_reused, rule_for
from .per_sample import (
    PerSampleMethod,
    check_per_sample_method,
    compact,
    im2col,
    is_recomputed,
    per_sample_candidates,
    per_sample_conv2d_unchecked,
    resolve_per_sample_method,
)

MixtureMethod = Literal["auto", "aggregate", "mixout"]
MIXTURE_METHODS = ("auto", "aggregate", "mixout")


def mixture_conv2d(
    x: Tensor,
    coefficients: Tensor,
    bank: Tensor,
    bias_bank: Tensor | None = None,
    stride: int | Pair = 1,
    padding: PaddingArg = 0,
    dilation: int | Pair = 1,
    groups: int = 1,
    *,
    spatial: Tensor | None = None,
    channel: Tensor | None = None,
    filter: Tensor | None = None,
    method: MixtureMethod = "auto",
    per_sample_method: PerSampleMethod = "auto",
) -> Tensor:
    """Convolve sample n with ``sum_k coefficients[n, k] * bank[k]`` (and the same mix of biases).

    Args:
        x: input [N, C_in, H, W].
        coefficients: mixing weights [N, K] (any real values: softmax, sigmoid, ...).
        bank: the shared kernels [K, C_out, C_in/groups, kH, kW].
        bias_bank: the shared biases [K, C_out], or ``None``.
        stride, padding, dilation, groups: as in ``F.conv2d``.
        spatial: a per-sample weight of each kernel position [N, kH, kW], or ``None``: sample n's
            kernel becomes ``spatial[n] * sum_k coefficients[n, k] * bank[k]`` (broadcast over
            C_out and C_in/groups; ODConv's spatial attention). The biases are not weighted.
        channel: a per-sample weight of each input channel [N, C_in], or ``None``: the input
            is scaled by it (ODConv's channel attention).
        filter: a per-sample weight of each output channel [N, C_out], or ``None``: the output
            is scaled by it before the biases are added (ODConv's filter attention).
        method: ``'auto'``, ``'aggregate'`` (assemble the N kernels with one matrix product, then
            :func:`per_sample_conv2d`) or ``'mixout'`` (one dense product with K x C_out
            outputs, then a per-sample weighted sum: K times the MACs, but dense; with a
            ``spatial`` weight, or on maps of at most 16 output pixels, the product runs on the
            unfolded input (im2col), weighted per kernel position if ``spatial`` is given).
        per_sample_method: passed to :func:`per_sample_conv2d` by ``'aggregate'``.

    An empty batch (N = 0) gives an empty output with every method, as ``F.conv2d`` does.

    Returns:
        [N, C_out, H_out, W_out].
    """
    check_input(x)
    check_kernels(bank, "bank", "[K, C_out, C_in/groups, kH, kW]", x, "mixture_conv2d")
    num_kernels, c_out = bank.shape[:2]
    n = x.shape[0]
    if not isinstance(coefficients, Tensor) or shape_list(coefficients) != [n, num_kernels]:
        got = shape_list(coefficients) if isinstance(coefficients, Tensor) else coefficients
        raise ValueError(f"coefficients must have shape [N, K] = {[n, num_kernels]}, got {got}")
    if bias_bank is not None and shape_list(bias_bank) != [num_kernels, c_out]:
        raise ValueError(
            f"bias_bank must have shape [K, C_out] = {[num_kernels, c_out]}, "
            f"got {shape_list(bias_bank)}"
        )
    check_shape(spatial, "spatial", "[N, kH, kW]", [n, *bank.shape[-2:]], optional=True)
    check_shape(channel, "channel", "[N, C_in]", [n, x.shape[1]], optional=True)
    check_shape(filter, "filter", "[N, C_out]", [n, c_out], optional=True)
    check_mixture_method(method)
    geometry, output_size = check_conv(x, c_out, bank.shape[2], bank.shape[-2:], stride, padding,
                                       dilation, groups)
    return mixture_conv2d_unchecked(
        x, coefficients, bank, bias_bank, geometry, output_size, spatial=spatial,
        channel=channel, filter=filter, method=method, per_sample_method=per_sample_method,
    )


def check_mixture_method(method: object) -> None:
    """Raise unless ``method`` is one of :data:`MIXTURE_METHODS`."""
    if method not in MIXTURE_METHODS:
        raise ValueError(f"method must be one of {MIXTURE_METHODS}, got {method!r}")


def mixture_conv2d_unchecked(
    x: Tensor,
    coefficients: Tensor,
    bank: Tensor,
    bias_bank: Tensor | None,
    geometry: ConvGeometry,
    output_size: Pair,
    *,
    spatial: Tensor | None = None,
    channel: Tensor | None = None,
    filter: Tensor | None = None,
    method: str = "auto",
    per_sample_method: str = "auto",
) -> Tensor:
    """:func:`mixture_conv2d` without its checks, for callers that made them (the layers):
    ``geometry`` parsed, ``output_size`` (H_out, W_out) the output's, the tensors of the right
    shapes and ``method`` valid (:func:`check_mixture_method`). ``per_sample_method`` is checked
    where the aggregate uses it."""
    n = x.shape[0]
    pixels = output_size[0] * output_size[1]
    bias = None if bias_bank is None else coefficients @ bias_bank
    if method == "auto" and per_sample_method == "auto":
        method = tuning.choose(
            "mixture_conv2d", (x, coefficients, bank, bias_bank, spatial, channel, filter),
            geometry, lambda: _candidates(x, bank, geometry, output_size, spatial is not None),
            lambda m, t: mixture_conv2d_unchecked(
                t[0], t[1], t[2], t[3], geometry, output_size, spatial=t[4], channel=t[5],
                filter=t[6], method=m.split("/")[0],
                per_sample_method=m.partition("/")[2] or "auto"),
            lambda: _choose_mixture_method(x, bank, geometry, spatial is not None, pixels))
        method, _, per_sample_method = method.partition("/")
        per_sample_method = per_sample_method or "auto"
    elif method == "auto":
        method = _choose_mixture_method(x, bank, geometry, spatial is not None, pixels)
    if method == "aggregate":
        check_per_sample_method(per_sample_method, n)
        out = _aggregate_in_chunks(x, coefficients, bank, bias, geometry, output_size, spatial,
                                   channel, filter, per_sample_method)
        if out is not None:
            return out
    if channel is None and filter is None:
        return _mixture(x, coefficients, bank, bias, geometry, output_size, spatial, method,
                        per_sample_method)
    # ODConv's channel and filter attentions on the activations (the padding, if any, commutes
    # with a per-channel factor), the biases after the filter attention
    if channel is not None:
        x = x * channel.to(x.dtype).reshape(n, x.shape[1], 1, 1)
    out = _mixture(x, coefficients, bank, None if filter is not None else bias, geometry,
                   output_size, spatial, method, per_sample_method)
    if filter is not None:
        out = out * filter.to(out.dtype).reshape(n, bank.shape[1], 1, 1)
        if bias is not None:
            out = out + bias.reshape(n, bank.shape[1], 1, 1).to(out.dtype)
    return out


def _mixture(x: Tensor, coefficients: Tensor, bank: Tensor, bias: Tensor | None,
             geometry: ConvGeometry, output_size: Pair, spatial: Tensor | None, method: str,
             per_sample_method: str) -> Tensor:
    """The aggregate (per-sample kernels, then :func:`per_sample_conv2d`) or mix-out of
    :func:`mixture_conv2d_unchecked`, ``method`` decided, ``bias`` [N, C_out] mixed."""
    n = x.shape[0]
    pixels = output_size[0] * output_size[1]
    if method == "aggregate":
        return _aggregate(x, _MixedKernels(coefficients, bank, spatial), bias, geometry,
                          output_size, per_sample_method)
    if spatial is not None and spatial.shape[-2:].numel() == 1:  # 1x1 kernel: one weight a sample
        coefficients = coefficients * spatial.reshape(n, 1).to(coefficients.dtype)
        spatial = None
    xp, pad = pad_for_conv(x, geometry)
    args = (geometry.stride, pad, geometry.dilation, geometry.groups)
    if mixout_through_im2col(spatial is not None, pixels, rule_for(x.device)):
        out = _mixout_unfold(xp, coefficients, bank, spatial, bias, *args)
    else:
        out = _mixout(xp, coefficients, bank, bias, *args)
    return match_memory_format(out, x)


def _candidates(x: Tensor, bank: Tensor, geometry: ConvGeometry, output_size: Pair,
                spatial: bool) -> list[str]:
    """The formulations :func:`dynconv.autotune` times: the per-sample kernels aggregated,
    then each per-sample method (``'aggregate/grouped'``, ...), and ``'mixout'`` unless its
    K-fold output (or im2col buffer) would pass
    :data:`~dynconv.functional.tuning.MAX_CANDIDATE_BYTES`."""
    names = ["aggregate/" + m for m in per_sample_candidates(x, bank.shape[1], geometry,
                                                             output_size)]
    num_kernels, c_out, _, kh, kw = bank.shape
    pixels = output_size[0] * output_size[1]
    extra = x.shape[0] * pixels * num_kernels * c_out
    if mixout_through_im2col(spatial, pixels, rule_for(x.device)):
        extra = max(extra, x.shape[0] * pixels * x.shape[1] * kh * kw)
    if extra * x.element_size() <= tuning.MAX_CANDIDATE_BYTES:
        names.append("mixout")
    return names


def mix_kernels(coefficients: Tensor, bank: Tensor) -> Tensor:
    """``sum_k coefficients[n, k] * bank[k]`` by one matrix product: coefficients [N, K] and a
    bank [K, ...] (kernels [K, C_out, C_in/groups, kH, kW], biases [K, C_out]) -> [N, ...]."""
    num_kernels, *shape = bank.shape
    return (coefficients @ bank.reshape(num_kernels, -1)).reshape(coefficients.shape[0], *shape)


def _aggregate(x: Tensor, weights: _MixedKernels, bias: Tensor | None, geometry: ConvGeometry,
               output_size: Pair, per_sample_method: str) -> Tensor:
    """The per-sample kernels ``weights`` makes, then :func:`per_sample_conv2d`; with gradients
    and kernels of ``is_recomputed``'s size, kept out of memory until backward."""
    if not weights.recompute_in_backward():
        return per_sample_conv2d_unchecked(x, weights.kernels(), bias, geometry, output_size,
                                           method=per_sample_method)
    with torch.autograd.graph.saved_tensors_hooks(weights.pack, weights.unpack):
        out = per_sample_conv2d_unchecked(x, weights.kernels(track=True), bias, geometry,
                                          output_size, method=per_sample_method)
    weights.forget()
    return out


def _cells_kernel(c_in_g: int, kernel_size: Sequence[int], cells_per_kernel: int,
                  cell_shape: Sequence[int]) -> tuple[tuple[int, int, int, int], CellGrid]:
    """The kernel [C_out, C_in/groups, kH, kW] that ``cells_per_kernel`` cells of ``cell_shape``
    [c_out, c_in, ckH, ckW] fill, and its grid; a ``ValueError`` where they cannot (the cells'
    size is the kernel's or 1x1, their input channels divide C_in/groups)."""
    kh, kw = (int(v) for v in kernel_size)
    cell_out, cell_in, ckh, ckw = (int(v) for v in cell_shape)
    if (ckh, ckw) not in ((kh, kw), (1, 1)) or c_in_g % cell_in:
        raise ValueError(
            f"cells of shape {[cell_out, cell_in, ckh, ckw]} cannot partition a kernel of "
            f"C_in/groups = {c_in_g} and size {[kh, kw]}: their input channels must divide "
            "C_in/groups and their size be the kernel's or 1x1")
    spatial, ins = kh * kw // (ckh * ckw), c_in_g // cell_in
    if cells_per_kernel % (spatial * ins):
        raise ValueError(
            f"attention's {cells_per_kernel} cells a kernel do not fill kernels of C_in/groups "
            f"= {c_in_g} and size {[kh, kw]} with cells of shape {[cell_out, cell_in, ckh, ckw]}"
            f": expected a multiple of {spatial * ins}")
    grid = CellGrid(spatial, cells_per_kernel // (spatial * ins), ins)
    return (grid.out * cell_out, c_in_g, kh, kw), grid


def mix_cells(attention: Tensor, cells: Tensor, kernel_shape: Sequence[int]) -> Tensor:
    """Per-sample kernels from mixed cells (KernelWarehouse): cell j of sample n's kernel is
    ``sum_i attention[n, j, i] * cells[i]``, put in place along the kernel positions, the
    output and the input channels (:class:`CellGrid`, the official order).

    Args:
        attention: [N, m, K], m the kernel's cells (the grid's product).
        cells: [K, c_out, c_in, ckH, ckW].
        kernel_shape: [C_out, C_in/groups, kH, kW].

    Returns:
        [N, C_out, C_in/groups, kH, kW].
    """
    shape, grid = _cells_kernel(kernel_shape[1], kernel_shape[2:], attention.shape[1],
                                cells.shape[1:])
    if shape != tuple(kernel_shape):
        raise ValueError(f"{attention.shape[1]} cells of shape {shape_list(cells)[1:]} make a "
                         f"kernel {list(shape)}, not {list(kernel_shape)}")
    mixed = attention @ cells.reshape(cells.shape[0], -1)
    return _put_in_place(mixed, grid, cells.shape[1:], kernel_shape)


def warehouse_conv2d(
    x: Tensor,
    attention: Tensor,
    cells: Tensor,
    kernel_size: int | Pair,
    bias: Tensor | None = None,
    stride: int | Pair = 1,
    padding: PaddingArg = 0,
    dilation: int | Pair = 1,
    groups: int = 1,
    *,
    method: PerSampleMethod = "auto",
) -> Tensor:
    """Convolve sample n with the kernel that :func:`mix_cells` makes from its ``attention[n]``
    (KernelWarehouse): the kernel's m cells, each a mixture of the K ``cells``.

    With gradients and large kernels (those :func:`per_sample_conv2d` would keep), the kernels
    are assembled, used and differentiated a chunk of samples at a time, as
    :func:`mixture_conv2d`'s aggregate does, and none is kept between forward and backward.

    Args:
        x: input [N, C_in, H, W].
        attention: mixing weights [N, m, K].
        cells: [K, c_out, c_in, ckH, ckW]; ckH x ckW is ``kernel_size`` or 1 x 1 (spatial
            partition), c_in divides C_in/groups, and C_out = c_out x m / (the cells along the
            positions and input channels).
        kernel_size: the kernel's (kH, kW).
        bias: [C_out] or ``None``.
        stride, padding, dilation, groups: as in ``F.conv2d``.
        method: the per-sample method (:func:`per_sample_conv2d`).

    Returns:
        [N, C_out, H_out, W_out].
    """
    check_input(x)
    check_kernels(cells, "cells", "[K, c_out, c_in, ckH, ckW]", x, "warehouse_conv2d")
    if not isinstance(attention, Tensor) or attention.dim() != 3 or shape_list(attention)[::2] \
            != [x.shape[0], cells.shape[0]]:
        got = shape_list(attention) if isinstance(attention, Tensor) else attention
        raise ValueError(f"attention must have shape [N, m, K] with N = {x.shape[0]} and K = "
                         f"{cells.shape[0]}, got {got}")
    geometry = parse_geometry(kernel_size, stride, padding, dilation, groups)
    c_in_g = x.shape[1] // geometry.groups
    (c_out, *_), _ = _cells_kernel(c_in_g, geometry.kernel_size, attention.shape[1],
                                   cells.shape[1:])
    check_shape(bias, "bias", "[C_out]", [c_out], optional=True)
    _, output_size = check_conv(x, c_out, c_in_g, geometry.kernel_size, stride, padding,
                                dilation, groups)
    check_per_sample_method(method, x.shape[0])
    return warehouse_conv2d_unchecked(x, attention, cells, bias, geometry, output_size,
                                      method=method)


def warehouse_conv2d_unchecked(
    x: Tensor, attention: Tensor, cells: Tensor, bias: Tensor | None, geometry: ConvGeometry,
    output_size: Pair, *, method: str = "auto",
) -> Tensor:
    """:func:`warehouse_conv2d` without its checks, for callers that made them (KWConv2d)."""
    n = x.shape[0]
    kernel_shape, grid = _cells_kernel(x.shape[1] // geometry.groups, geometry.kernel_size,
                                       attention.shape[1], cells.shape[1:])
    if method == "auto":
        method = tuning.choose(
            "warehouse_conv2d", (x, attention, cells, bias), geometry,
            lambda: per_sample_candidates(x, kernel_shape[0], geometry, output_size),
            lambda m, t: warehouse_conv2d_unchecked(*t, geometry, output_size, method=m),
            lambda: resolve_per_sample_method("auto", x, attention.requires_grad or
                                              cells.requires_grad, geometry, output_size))
    biases = None if bias is None else bias.expand(n, -1)
    out = _aggregate_in_chunks(x, attention, cells, biases, geometry, output_size, None, None,
                               None, method, grid)
    if out is not None:
        return out
    return _aggregate(x, _MixedKernels(attention, cells, None, kernel_shape), biases, geometry,
                      output_size, method)


class _MixedKernels:
    """The per-sample kernels of a mixture, ``spatial[n] * sum_k coefficients[n, k] * bank[k]``
    [N, C_out, C_in/g, kH, kW], and the saved-tensor hooks that keep them out of memory until
    backward: autograd saves a recipe instead of each kernel tensor (and of the unweighted mix
    that the spatial product saves), and backward recomputes it with one matrix product. A
    model's per-sample kernels then no longer pile up between its forward and its backward
    (ResNet-18 at batch 64: 151 MB per 8x8 layer); the recomputation runs with the original
    tensors, so double backward still holds.
    """

    MIX, WEIGHT = 0, 1  # what a recipe stands for: the unweighted mix, or the kernels

    def __init__(self, coefficients: Tensor, bank: Tensor, spatial: Tensor | None,
                 kernel_shape: Sequence[int] | None = None) -> None:
        self.coefficients, self.bank, self.spatial = coefficients, bank, spatial
        # a bank of cells (KernelWarehouse) for kernels [C_out, C_in/g, kH, kW]: mix_cells
        self.kernel_shape = kernel_shape
        self._tracked: dict[int, int] = {}  # storage address -> MIX or WEIGHT, during forward
        self._alive: list[Tensor] = []  # the tracked tensors, alive until forward ends: a freed
        # storage could be reused by another tensor that autograd saves
        self._pending = 0  # recipes packed and not yet unpacked
        self._recomputed: dict[int, Tensor] = {}  # MIX / WEIGHT recomputed in backward, kept
        # while recipes are pending: the spatial product's backward needs the mix after the
        # convolution's, and 'loop' saves one slice of the kernels per sample (recomputing the
        # whole batch's kernels for each slice cost 64x at batch 64)
        self._autocast: torch.dtype | None = None  # the forward's autocast dtype, if tracked
        # under autocast: backward runs without it, and recomputes under the same

    def _mix(self) -> Tensor:
        if self.kernel_shape is None:
            return mix_kernels(self.coefficients, self.bank)
        return mix_cells(self.coefficients, self.bank, self.kernel_shape)

    def _recompute_mix(self) -> Tensor:
        """:meth:`_mix` again in backward, under the forward's autocast state: the same values
        in the same dtype."""
        if self._autocast is None:
            return self._mix()
        with torch.autocast(self.bank.device.type, dtype=self._autocast):
            return self._mix()

    def _weigh(self, mix: Tensor) -> Tensor:
        if self.spatial is None:
            return mix
        return mix * self.spatial.to(mix.dtype).reshape(mix.shape[0], 1, 1, *mix.shape[-2:])

    def kernels(self, track: bool = False) -> Tensor:
        """The kernels; ``track``: remember their storage (and the mix's), so that :meth:`pack`
        recognises them until :meth:`forget`."""
        mix = self._mix()
        if track:  # before the spatial product, which saves the mix
            self._autocast = autocast_dtype(self.bank.device.type)
            self._track(mix, self.MIX)
        weight = self._weigh(mix)
        if track:
            self._track(weight, self.WEIGHT)  # the same storage without a spatial weight
        return weight

    def _track(self, t: Tensor, which: int) -> None:
        self._tracked[t.untyped_storage().data_ptr()] = which
        self._alive.append(t)

    def forget(self) -> None:
        """Forward has ended: drop the references that kept the tracked storages apart."""
        self._tracked.clear()
        self._alive.clear()

    def recompute_in_backward(self) -> bool:
        needs_grad = self.coefficients.requires_grad or self.bank.requires_grad or (
            self.spatial is not None and self.spatial.requires_grad)
        kernel_numel = math.prod(self.kernel_shape or self.bank.shape[1:])
        kernel_bytes = self.coefficients.shape[0] * kernel_numel * self.bank.element_size()
        # not inside the caller's own hooks (save_on_cpu, checkpoint): they keep every tensor
        return is_recomputed(needs_grad, kernel_bytes) and not saved_tensor_hooks_active()

    def pack(self, t: Tensor):
        which = self._tracked.get(t.untyped_storage().data_ptr()) if t.numel() else None
        if which is None:
            return t
        self._pending += 1
        return which, t.shape, t.stride(), t.storage_offset()

    def unpack(self, packed):
        if isinstance(packed, Tensor):
            return packed
        which, shape, stride, offset = packed
        if which not in self._recomputed:
            mix = self._recomputed.get(self.MIX)
            if mix is None:
                mix = self._recomputed[self.MIX] = self._recompute_mix()
            if which == self.WEIGHT:
                self._recomputed[self.WEIGHT] = self._weigh(mix)
        tensor = self._recomputed[which]
        self._pending -= 1
        if self._pending <= 0:  # the last recipe (or a graph backpropagated again)
            self._recomputed.clear()
        return tensor.as_strided(shape, stride, offset)


# With gradients, the aggregate assembles, uses and differentiates the per-sample kernels a chunk
# of samples at a time (_ChunkedAggregate) once the batch's kernels reach is_recomputed's size;
# a chunk holds at most this many bytes of kernels (at least one sample).
_CHUNK_KERNEL_BYTES = 16 * 2**20


class CellGrid(NamedTuple):
    """How a kernel [C_out, C_in/groups, kH, kW] is cut into ``spatial * out * in_`` cells of
    shape [c_out, c_in, ckH, ckW] (KernelWarehouse): along the kernel positions (``spatial``,
    where the cells are 1x1; else 1), the output channels and the input channels, in this order
    (the official code's)."""

    spatial: int
    out: int
    in_: int


class _ChunkPlan(NamedTuple):
    """What :class:`_ChunkedAggregate` needs besides its tensors."""

    method: str  # the per-sample method: 'grouped' or 'unfold'
    kernel_size: Pair
    stride: Pair
    padding: Pair
    dilation: Pair
    groups: int
    output_size: Pair
    channel_on_input: bool  # the channel attention weights the input, not the kernels
    chunk: int  # samples a chunk
    shape: tuple[int, int, int, int]  # a sample's kernels: [groups, C_out/g, C_in/g, kH * kW]
    grid: CellGrid | None  # the bank holds cells (KernelWarehouse), else whole kernels


def _aggregate_in_chunks(
    x: Tensor, coefficients: Tensor, bank: Tensor, bias: Tensor | None, geometry: ConvGeometry,
    output_size: Pair, spatial: Tensor | None, channel: Tensor | None, filter: Tensor | None,
    per_sample_method: str, grid: CellGrid | None = None,
) -> Tensor | None:
    """The aggregate by :class:`_ChunkedAggregate` where it runs: with gradients, kernels of at
    least ``is_recomputed``'s size, and the per-sample method ``'grouped'`` or ``'unfold'``;
    else ``None``. ``bias`` [N, C_out] is added after the filter attention. With ``grid``, the
    bank holds cells and ``coefficients`` [N, m, K] mix each of a kernel's m cells."""
    n = x.shape[0]
    shape = _kernel_shape(x, bank, geometry, grid)
    c_out = shape[0] * shape[1]
    tensors = (x, coefficients, bank, spatial, channel, filter)
    needs_grad = any(t is not None and t.requires_grad for t in tensors)
    kernel_numel = math.prod(shape)
    kernel_bytes = n * kernel_numel * bank.element_size()
    if n == 0 or not is_recomputed(needs_grad, kernel_bytes):
        return None
    kernels_need_grad = any(t is not None and t.requires_grad for t in tensors[1:])
    method = resolve_per_sample_method(per_sample_method, x, kernels_need_grad, geometry,
                                       output_size)
    if method not in ("grouped", "unfold"):
        return None
    if per_sample_method == "auto":
        tuning.traced("per_sample_conv2d", method)  # the rule's pick, decided here
    # ODConv's channel and filter attentions weight the kernels where a sample's kernels are no
    # larger than its input (output): no activation-sized product of them is kept for backward;
    # elsewhere (small maps) they weight the activations, which costs less than a pass over the
    # kernels (C=256 8x8, N=64: 0.45 s against 0.30 s for forward+backward).
    channel_on_input = channel is not None and kernel_numel > x[0].numel()
    filter_after = filter is not None and kernel_numel > c_out * output_size[0] * output_size[1]
    xp, pad = pad_for_conv(x, geometry)
    chunk = max(1, _CHUNK_KERNEL_BYTES * n // kernel_bytes)
    plan = _ChunkPlan(method, geometry.kernel_size, geometry.stride, pad, geometry.dilation,
                      geometry.groups, output_size, channel_on_input, chunk, shape, grid)
    out = _ChunkedAggregate.apply(xp, coefficients, bank, spatial, channel,
                                  None if filter_after else filter, plan)
    if filter_after:
        out = out * filter.to(out.dtype).reshape(n, c_out, 1, 1)
    if bias is not None:  # in the product's dtype (autocast's), as F.conv2d adds its bias
        out = out + bias.reshape(n, c_out, 1, 1).to(out.dtype)
    return match_memory_format(out, x)


def _kernel_scales(spatial: Tensor | None, channel: Tensor | None, filter: Tensor | None,
                   shape: tuple[int, ...], plan: _ChunkPlan) -> list[tuple[int, Tensor]]:
    """The attentions that weight the per-sample kernels, viewed to broadcast over them as
    [N, groups, C_out/g, C_in/g, kH * kW] (``shape`` without N), each with its input index in
    :class:`_ChunkedAggregate` (the channel attention unless it weights the input)."""
    groups, c_out_g, c_in_g, taps = shape
    scales = []
    if spatial is not None:
        scales.append((3, spatial.reshape(-1, 1, 1, 1, taps)))
    if channel is not None and not plan.channel_on_input:
        scales.append((4, channel.reshape(-1, groups, 1, c_in_g, 1)))
    if filter is not None:
        scales.append((5, filter.reshape(-1, groups, c_out_g, 1, 1)))
    return scales


def _assemble(coefficients: Tensor, bank: Tensor, scales: list[tuple[int, Tensor]],
              plan: _ChunkPlan, partial: bool = False) -> list[Tensor]:
    """The kernels of a chunk of samples [n, groups, C_out/g, C_in/g, kH * kW]: the mix of the
    bank (cells put in place where the bank holds cells), weighted by each scale in turn; with
    ``partial``, every product on the way (the kernels last), else the kernels alone."""
    w = coefficients @ bank.reshape(bank.shape[0], -1)
    w = _put_in_place(w, plan.grid, bank.shape[1:], plan.shape)
    parts = [w]
    for _, s in scales:
        w = w * s.to(w.dtype)
        parts = [*parts, w] if partial else [w]
    return parts


def _chunk_conv(x: Tensor, w: Tensor, plan: _ChunkPlan) -> Tensor:
    """Convolve a chunk of samples ``x`` [n, C_in, H, W] (padded) with their kernels ``w``
    [n, groups, C_out/g, C_in/g, kH * kW] -> [n, C_out, H_out, W_out]."""
    kernel_size, stride, padding, dilation, groups = plan[1:6]
    h_out, w_out = plan.output_size
    n, _, c_out_g, c_in_g, taps = w.shape
    if plan.method == "unfold":
        cols = im2col(x, groups, kernel_size, dilation, padding, stride)
        out = torch.matmul(w.reshape(n, groups, c_out_g, c_in_g * taps), cols)
    else:
        out = F.conv2d(x.reshape(1, -1, *x.shape[-2:]),
                       w.reshape(n * groups * c_out_g, c_in_g, *kernel_size), None, stride,
                       padding, dilation, groups * n)
    return out.reshape(n, groups * c_out_g, h_out, w_out)


class _ChunkedAggregate(torch.autograd.Function):
    """The aggregate, ``conv(x_n, filter_n (x) channel_n (x) spatial_n (x) sum_k c_nk W_k)``
    [N, C_out, H_out, W_out], a chunk of samples at a time: the per-sample kernels (and in
    backward their gradient and the im2col buffer) exist for one chunk only, and nothing
    kernel-sized is kept between forward and backward, which recomputes each chunk's kernels
    with one matrix product. Backward computes the gradient of each chunk's kernels (as the
    per-sample method's own backward does) and reduces it at once to the gradients of the
    coefficients, the bank and the attentions: the same multiply-accumulates as the whole batch
    at once, with transients bounded by the chunk (ResNet-18 at batch 64, C=256 8x8: 8 MB of
    kernels a chunk against 151 MB of kernels and 151 MB of their gradient).

    The channel and filter attentions (ODConv) weight the kernels rather than the input and the
    output, so that no input or output-sized product of them is kept for backward either.
    Backward is made of differentiable operations, so double backward holds."""

    @staticmethod
    def forward(x, coefficients, bank, spatial, channel, filter, plan):
        scales = _kernel_scales(spatial, channel, filter, plan.shape, plan)
        outs = []
        for start in range(0, x.shape[0], plan.chunk):
            rows = slice(start, start + plan.chunk)
            w = _assemble(coefficients[rows], bank, [(i, s[rows]) for i, s in scales], plan)[-1]
            outs.append(_chunk_conv(_chunk_input(x, channel, rows, plan), w, plan))
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, coefficients, bank, spatial, channel, filter, ctx.plan = inputs
        ctx.autocast = autocast_dtype(x.device.type)
        ctx.save_for_backward(x, coefficients, bank, spatial, channel, filter)

    @staticmethod
    def backward(ctx, grad):
        inputs = ctx.saved_tensors
        x = inputs[0]
        needs = ctx.needs_input_grad
        if ctx.autocast is None:
            return _ChunkedAggregate._backward(inputs, needs, ctx.plan, grad)
        # The forward ran under autocast and backward runs without it: recompute the kernels
        # and run the products as the forward did (in grad's dtype)
        with torch.autocast(x.device.type, dtype=ctx.autocast):
            return _ChunkedAggregate._backward(inputs, needs, ctx.plan, grad)

    @staticmethod
    def _backward(inputs, needs, plan, grad):
        x, coefficients, bank, *_ = inputs
        method, kernel_size, stride, padding, dilation, groups = plan[:6]
        channel_on_input, chunk, shape = plan.channel_on_input, plan.chunk, plan.shape
        scales = _kernel_scales(*inputs[3:], shape, plan)
        channel = inputs[4]
        # the kernels' gradient: for the coefficients, the bank, the attentions; the (scaled)
        # input's: for the input, or the channel attention where it weights the input
        kernels_need_grad = any(needs[1:4]) or any(needs[i] for i, _ in scales)
        needs_input_grad = needs[0] or (channel_on_input and needs[4])
        grads: list[list[Tensor]] = [[] for _ in inputs]
        # Without double backward, each chunk's input gradient goes straight into the batch's
        # and the bank's gradient is summed in place, in the bank's dtype (a sum of bfloat16
        # products under autocast).
        # (One chunk: its gradients are the batch's, with no copy.)
        in_place = not torch.is_grad_enabled()
        grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if (
            in_place and needs[0] and x.shape[0] > chunk) else None
        grad_bank = None
        for start in range(0, x.shape[0], chunk):
            rows = slice(start, start + chunk)
            x_c, g_c = _chunk_input(x, channel, rows, plan), grad[rows]
            n = x_c.shape[0]
            chunk_scales = [(i, s[rows]) for i, s in scales]
            scales_need_grad = any(needs[i] for i, _ in scales)
            parts = _assemble(coefficients[rows], bank, chunk_scales, plan,
                              partial=scales_need_grad)
            w = parts[-1].to(grad.dtype)
            if not scales_need_grad:
                parts = []  # the kernels are freed once the input's gradient is made
            grad_w = None
            if method == "unfold":
                g4 = g_c.reshape(n, groups, shape[1], -1)
                if needs_input_grad:
                    grad_cols = torch.matmul(w.reshape(*g4.shape[:3], -1).transpose(-1, -2), g4)
                    grad_x_c = F.fold(grad_cols.to(x.dtype).flatten(1, 2), x.shape[-2:],
                                      kernel_size, dilation=dilation, padding=padding,
                                      stride=stride)
                    del grad_cols
                    if grad_x is None:
                        grad_x_c = compact(grad_x_c)
                del w
                if kernels_need_grad:
                    cols = im2col(x_c, groups, kernel_size, dilation, padding, stride)
                    grad_w = torch.matmul(g4, cols.to(grad.dtype).transpose(-1, -2))
                    del cols
            else:
                grad_x_c, grad_w, _ = torch.ops.aten.convolution_backward(
                    g_c.reshape(1, -1, *g_c.shape[-2:]),
                    x_c.to(grad.dtype).reshape(1, -1, *x_c.shape[-2:]),
                    w.reshape(-1, shape[2], *kernel_size), None, stride, padding, dilation,
                    False, (0, 0), groups * n, (needs_input_grad, kernels_need_grad, False))
                if needs_input_grad:
                    grad_x_c = grad_x_c.reshape(x_c.shape).to(x.dtype)
            if channel_on_input and needs_input_grad:  # the scaled input's: through a_c
                a_c = channel[rows].to(grad_x_c.dtype).reshape(n, -1, 1, 1)
                if needs[4]:
                    grads[4].append((grad_x_c * x[rows]).sum((2, 3)))
                grad_x_c = grad_x_c * a_c if needs[0] else None
            if grad_x is not None:
                grad_x[rows] = grad_x_c
            elif needs[0]:
                grads[0].append(grad_x_c)
            grad_x_c = None
            if not kernels_need_grad:
                continue
            grad_w = grad_w.reshape(n, *shape)
            for j in reversed(range(len(chunk_scales))):
                i, s = chunk_scales[j]
                if needs[i]:  # then parts holds every product on the way
                    grads[i].append((grad_w * parts[j]).sum_to_size(s.shape))
                grad_w = grad_w * s.to(grad_w.dtype)
            # [n, D], or with cells [n, m, D]: the gradient of what the coefficients mix
            grad_mix = _take_from_place(grad_w, plan.grid, bank.shape[1:])
            if needs[1]:
                grads[1].append(grad_mix @ bank.reshape(bank.shape[0], -1).to(grad_mix.dtype).T)
            if needs[2]:
                grad_mix = grad_mix.reshape(-1, grad_mix.shape[-1])
                coefficients_t = coefficients[rows].reshape(-1, bank.shape[0])
                coefficients_t = coefficients_t.to(grad_mix.dtype).T
                if in_place and grad_bank is not None and grad_bank.dtype == grad_mix.dtype:
                    grad_bank.addmm_(coefficients_t, grad_mix)  # no product to add
                    continue
                chunk_grad = (coefficients_t @ grad_mix).to(bank.dtype)
                if grad_bank is None:
                    grad_bank = chunk_grad
                elif in_place:
                    grad_bank += chunk_grad
                else:
                    grad_bank = grad_bank + chunk_grad
                del chunk_grad
        result = [(g[0] if len(g) == 1 else torch.cat(g)).reshape(t.shape).to(t.dtype)
                  if g else None for g, t in zip(grads, inputs, strict=True)]
        if grad_x is not None:
            result[0] = grad_x
        if grad_bank is not None:
            result[2] = grad_bank.reshape(bank.shape)
        return (*result, None)


def _chunk_input(x: Tensor, channel: Tensor | None, rows: slice, plan: _ChunkPlan) -> Tensor:
    """The input of a chunk of samples, weighted by the channel attention if it weights the
    input (recomputed in backward, not kept)."""
    if not plan.channel_on_input:
        return x[rows]
    return x[rows] * channel[rows].to(x.dtype).reshape(-1, x.shape[1], 1, 1)


def _kernel_shape(x: Tensor, bank: Tensor, geometry: ConvGeometry, grid: CellGrid | None
                  ) -> tuple[int, int, int, int]:
    """[groups, C_out/g, C_in/g, kH * kW]: a sample's kernels as :func:`_assemble` makes them
    from ``bank`` (kernels [K, C_out, C_in/g, kH, kW], or with ``grid`` cells)."""
    groups = geometry.groups
    kh, kw = geometry.kernel_size
    c_out = bank.shape[1] if grid is None else grid.out * bank.shape[1]
    return groups, c_out // groups, x.shape[1] // groups, kh * kw


def _put_in_place(mixed: Tensor, grid: CellGrid | None, cell_shape: Sequence[int],
                  shape: Sequence[int]) -> Tensor:
    """Mixed kernels [n, D] (``grid`` None), or mixed cells [n, m, D] of ``cell_shape``
    [c_out, c_in, ckH, ckW] put in place: the kernels [n, *shape] (any shape of C_out x C_in/g x
    kH x kW elements). A cell's place: its (spatial, out, in) index in the grid."""
    n = mixed.shape[0]
    if grid is not None:
        c_out, c_in, ckh, ckw = cell_shape
        mixed = mixed.reshape(n, grid.spatial, grid.out, grid.in_, c_out, c_in, ckh * ckw)
        mixed = mixed.permute(0, 2, 4, 3, 5, 1, 6)  # [n, out, c_out, in, c_in, spatial, ckH*ckW]
    return mixed.reshape(n, *shape)


def _take_from_place(kernels: Tensor, grid: CellGrid | None, cell_shape: Sequence[int]
                     ) -> Tensor:
    """The adjoint of :func:`_put_in_place`: kernels (or their gradient) [n, ...] -> [n, D],
    or with ``grid`` each cell's [n, m, D]."""
    n = kernels.shape[0]
    if grid is None:
        return kernels.reshape(n, -1)
    c_out, c_in, ckh, ckw = cell_shape
    cells = kernels.reshape(n, grid.out, c_out, grid.in_, c_in, grid.spatial, ckh * ckw)
    return cells.permute(0, 5, 1, 3, 2, 4, 6).reshape(n, grid.spatial * grid.out * grid.in_, -1)


def mixout_through_im2col(spatial: bool, pixels: int, rule: DispatchRule | None = None) -> bool:
    """Which form of mix-out runs: through im2col with a spatial weight (larger than 1x1) or on
    maps of at most ``rule.mixout_unfold_max_pixels`` output pixels per sample (the CPU table's
    16 by default), else the dense convolution."""
    rule = rule or rule_for("cpu")
    return spatial or pixels <= rule.mixout_unfold_max_pixels


def _choose_mixture_method(
    x: Tensor, bank: Tensor, geometry: ConvGeometry, spatial: bool = False,
    pixels: int | None = None,
) -> str:
    """The dispatch rule of :func:`mixture_conv2d` (see docs/performance.md); ``spatial``:
    whether the kernel positions are weighted per sample (ODConv); ``pixels``: output pixels per
    sample (from ``x`` and ``geometry`` when not given)."""
    if geometry.groups != 1 or x.shape[0] == 1 or is_exporting():
        return "aggregate"  # exporting: then 'unfold', see per_sample_conv2d
    if pixels is None:
        h_out, w_out = geometry.output_size(x.shape[-2], x.shape[-1])
        pixels = h_out * w_out
    rule = rule_for(x.device)
    training = torch.is_grad_enabled() and (x.requires_grad or bank.requires_grad)
    kernel_bytes = x.shape[0] * bank[0].numel() * bank.element_size()
    large_kernels = kernel_bytes > rule.mixout_min_kernel_bytes
    if pixels <= rule.mixout_unfold_max_pixels and (training or large_kernels):
        # one matrix product with all K kernels (CPU: DY-Conv C=512 4x4, N=8-64: 2.9-3.2x
        # nn.Conv2d against 3.8-4.8x for per-sample kernels and im2col)
        return "mixout"
    if (pixels < rule.mixout_max_pixels and large_kernels and not training
            and not freed_memory_reused(rule)):
        return "mixout"  # CPU inference C=256 8x8, N=32, malloc as is: 4.4x against 6.4x
    # per-sample kernels and im2col (per_sample_conv2d's 'unfold' up to 8x8): C=256 8x8, N=32-64,
    # freed memory kept: DY-Conv 2.1-2.3x nn.Conv2d f+b, ODConv 2.6-2.8x, against 4.3-4.6x mixout
    return "aggregate"


def _mixout(
    x: Tensor,
    coefficients: Tensor,
    bank: Tensor,
    bias: Tensor | None,
    stride,
    padding,
    dilation,
    groups: int,
) -> Tensor:
    num_kernels, c_out = bank.shape[:2]
    n = x.shape[0]
    if groups == 1:
        dense = bank.reshape(num_kernels * c_out, *bank.shape[2:])  # free for the stored bank
    else:
        # Output channels must stay inside their group: order the stack as [groups, K, C_out/g].
        dense = bank.reshape(num_kernels, groups, c_out // groups, *bank.shape[2:])
        dense = dense.transpose(0, 1).reshape(num_kernels * c_out, *bank.shape[2:])
    y = F.conv2d(x, dense, None, stride, padding, dilation, groups)
    h_out, w_out = y.shape[-2:]
    y = y.reshape(n, groups, num_kernels, c_out // groups * h_out * w_out)
    out = torch.matmul(coefficients.reshape(n, 1, 1, num_kernels).to(y.dtype), y)
    out = out.reshape(n, c_out, h_out, w_out)
    if bias is not None:
        out = out + bias.reshape(n, c_out, 1, 1).to(out.dtype)
    return out


def _mixout_unfold(
    x: Tensor,
    coefficients: Tensor,
    bank: Tensor,
    spatial: Tensor | None,
    bias: Tensor | None,
    stride,
    padding,
    dilation,
    groups: int,
) -> Tensor:
    """Mix-out through im2col: unfold the input, weight the columns of kernel position p of
    sample n by ``spatial[n, p]`` (if given), multiply by all K kernels at once (one matrix
    product per group over the whole batch), then mix over K. Without ``spatial`` it is the
    form of mix-out used on maps of at most 16 pixels, where it beats the dense convolution
    (DY-Conv C=512 4x4 with gradients: 1.6-2.7x ``nn.Conv2d`` against 3.7-5.2x)."""
    num_kernels, c_out, c_in_g, kh, kw = bank.shape
    n, _, h, w = x.shape
    taps, c_out_g = kh * kw, c_out // groups
    h_out = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    pixels = h_out * w_out
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    cols = cols.reshape(n, groups, c_in_g, taps, pixels)
    if spatial is not None:
        cols = cols * spatial.reshape(n, 1, 1, taps, 1).to(cols.dtype)
    cols = cols.permute(1, 2, 3, 0, 4).reshape(groups, c_in_g * taps, n * pixels)
    # [K, C_out, C_in/g, kH, kW] -> [g, K * C_out/g, C_in/g * kH * kW]: a free view when g = 1.
    dense = bank.reshape(num_kernels, groups, c_out_g, c_in_g * taps).transpose(0, 1)
    y = torch.matmul(dense.reshape(groups, num_kernels * c_out_g, c_in_g * taps), cols)
    y = y.reshape(groups, num_kernels, c_out_g, n, pixels)
    out = torch.einsum("nk,gkonp->ngop", coefficients.to(y.dtype), y)
    out = out.reshape(n, c_out, h_out, w_out)
    if bias is not None:
        out = out + bias.reshape(n, c_out, 1, 1).to(out.dtype)
    return out
