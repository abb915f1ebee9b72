"""The one per-sample convolution of the package, and its exact formulations.

Every layer of dynconv ends in one of these calls:

* :func:`per_sample_conv2d` convolves each sample with its own kernel
  (``x`` [N, C_in, H, W], ``weight`` [N, C_out, C_in/groups, kH, kW]).
* :func:`mixture_conv2d` convolves each sample with a per-sample mixture of a shared kernel
  bank, ``sum_k coefficients[n, k] * bank[k]``, optionally weighted per kernel position
  (ODConv's spatial attention). It either assembles the per-sample kernels and calls
  :func:`per_sample_conv2d`, or runs one dense product with all K kernels and mixes the outputs,
  whichever the dispatch rule expects to be faster.
* :func:`region_conv2d` (DRConv) convolves each output pixel with one of R per-sample kernels,
  chosen by a guide: either every region's output through :func:`per_sample_conv2d` and a
  gather, or each pixel with its own region's kernel only (gathered receptive fields and one
  matrix product per region).

All formulations compute the same result (up to floating-point rounding); ``method`` forces one,
which the tests do in turn.

While a model is traced for export (:func:`is_exporting`: ``torch.onnx.export``, ``torch.export``,
``torch.jit.trace``), ``'auto'`` picks the formulations whose graph holds for any batch size:
the per-sample kernels assembled with one matrix product, then ``'unfold'`` (im2col and a
batched matrix product). The grouped formulation folds the batch into the convolution's
``groups``, a constant of the exported graph, and would freeze the batch size.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._conv_args import ConvGeometry, PaddingArg, Pair, parse_geometry
from ..allocator import freed_memory_is_kept

PerSampleMethod = Literal["auto", "direct", "grouped", "loop", "unfold"]
MixtureMethod = Literal["auto", "aggregate", "mixout"]
PER_SAMPLE_METHODS = ("auto", "direct", "grouped", "loop", "unfold")
MIXTURE_METHODS = ("auto", "aggregate", "mixout")

# Dispatch thresholds (see docs/performance.md). The mixture: on maps of at most 16 output pixels
# per sample, mixing the K outputs of one matrix product beats assembling per-sample kernels;
# below 256 pixels, so does the dense convolution's mix-out in inference once the batch's
# per-sample kernels are over glibc's 32 MB mmap threshold and freed memory is not kept (see
# dynconv.allocator): such a tensor is page-faulted in afresh on every call.
_MIXOUT_MAX_PIXELS = 256
_MIXOUT_MIN_KERNEL_BYTES = 32 * 2**20
_MIXOUT_UNFOLD_MAX_PIXELS = 16
# per_sample_conv2d: up to this many output pixels per sample (8x8), im2col and a batched matrix
# product beat the grouped convolution (with gradients always; without, once freed memory is
# kept: its im2col buffer is large).
_UNFOLD_MAX_PIXELS = 64
# What the forward makes and backward needs (the per-sample kernels, the im2col buffer) is not
# kept between them but recomputed in backward from at least this many bytes.
_RECOMPUTE_MIN_BYTES = 4 * 2**20


def mix_kernels(coefficients: Tensor, bank: Tensor) -> Tensor:
    """``sum_k coefficients[n, k] * bank[k]`` [N, ...] for ``coefficients`` [N, K] and a bank
    [K, ...]."""
    num_kernels = bank.shape[0]
    mixed = coefficients @ bank.reshape(num_kernels, -1)
    return mixed.reshape(coefficients.shape[0], *bank.shape[1:])


def _shape(t: Tensor) -> list[int]:
    return list(t.shape)


def is_exporting() -> bool:
    """True while the caller is traced for export (ONNX, ``torch.export`` or TorchScript
    tracing): ``'auto'`` then dispatches to batch-agnostic formulations only."""
    return bool(
        torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting() or torch.jit.is_tracing()
    )


def _check_input(x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must have shape [N, C_in, H, W] (4-D), got shape {_shape(x)}")


def _prepare(
    x: Tensor, geometry: ConvGeometry
) -> tuple[Tensor, Pair]:
    """Apply asymmetric ('same' with an even kernel) padding explicitly; return the conv padding."""
    padding = geometry.symmetric_padding
    if padding is None:
        return F.pad(x, geometry.pads), (0, 0)
    return x, padding


def _check_output_size(x: Tensor, geometry: ConvGeometry) -> Pair:
    h_out, w_out = geometry.output_size(x.shape[-2], x.shape[-1])
    if h_out <= 0 or w_out <= 0:
        raise ValueError(
            f"input of spatial size {tuple(x.shape[-2:])} is too small for kernel_size="
            f"{geometry.kernel_size}, dilation={geometry.dilation}, padding={geometry.padding} "
            f"(the output would be {h_out}x{w_out})"
        )
    return h_out, w_out


def _check_conv(
    x: Tensor, c_out: int, c_in_g: int, kernel_size: Pair, stride, padding, dilation, groups
) -> ConvGeometry:
    """Check the convolution arguments against the input; return the parsed geometry."""
    geometry = parse_geometry(kernel_size, stride, padding, dilation, groups)
    c_in = x.shape[1]
    if c_in_g * geometry.groups != c_in:
        raise ValueError(
            f"input has {c_in} channels but the kernels expect C_in = {c_in_g} x groups "
            f"({geometry.groups}) = {c_in_g * geometry.groups}"
        )
    if c_out % geometry.groups:
        raise ValueError(f"C_out ({c_out}) must be divisible by groups ({geometry.groups})")
    _check_output_size(x, geometry)
    return geometry


def _is_channels_last(x: Tensor) -> bool:
    return (
        x.shape[1] > 1
        and x.is_contiguous(memory_format=torch.channels_last)
        and not x.is_contiguous()
    )


def _match_memory_format(out: Tensor, x: Tensor) -> Tensor:
    """Return ``out`` in channels_last when ``x`` is, as ``nn.Conv2d`` does."""
    if _is_channels_last(x):
        return out.contiguous(memory_format=torch.channels_last)
    return out


# ----------------------------------------------------------------------------------------------
# per_sample_conv2d
# ----------------------------------------------------------------------------------------------


def per_sample_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | Pair = 1,
    padding: PaddingArg = 0,
    dilation: int | Pair = 1,
    groups: int = 1,
    *,
    method: PerSampleMethod = "auto",
) -> Tensor:
    """Convolve every sample with its own kernel.

    Args:
        x: input [N, C_in, H, W] (any memory format).
        weight: one kernel per sample [N, C_out, C_in/groups, kH, kW].
        bias: one bias per sample [N, C_out], or ``None``.
        stride, padding, dilation, groups: as in ``F.conv2d`` (int or pair; ``'same'``/``'valid'``).
        method: ``'auto'`` (the dispatch rule), or one exact formulation: ``'direct'`` (a plain
            convolution, N = 1 only), ``'grouped'`` (the batch folded into the groups),
            ``'loop'`` (one convolution per sample) or ``'unfold'`` (im2col and a batched matrix
            product; exports to ONNX with a dynamic batch).

    Returns:
        [N, C_out, H_out, W_out], channels_last when ``x`` is.
    """
    _check_input(x)
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 5:
        raise ValueError(
            "weight must have shape [N, C_out, C_in/groups, kH, kW] (5-D, one kernel per sample), "
            f"got shape {_shape(weight)}"
        )
    n_w, c_out, c_in_g, kh, kw = weight.shape
    geometry = _check_conv(x, c_out, c_in_g, (kh, kw), stride, padding, dilation, groups)
    n = x.shape[0]
    if n_w != n:
        raise ValueError(
            f"the per-sample weight holds {n_w} kernels but the input has batch size {n}: "
            "expected weight of shape [N, C_out, C_in/groups, kH, kW] with N = x.shape[0]"
        )
    if bias is not None and (not isinstance(bias, Tensor) or _shape(bias) != [n, c_out]):
        got = _shape(bias) if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(f"bias must have shape [N, C_out] = {[n, c_out]} or be None, got {got}")
    _check_per_sample_method(method, n)
    return _per_sample_conv2d(x, weight, bias, geometry, method)


def _check_per_sample_method(method: str, batch: int) -> None:
    if method not in PER_SAMPLE_METHODS:
        raise ValueError(f"method must be one of {PER_SAMPLE_METHODS}, got {method!r}")
    if method == "direct" and batch != 1:
        raise ValueError(f"method='direct' needs batch size 1, got {batch}")


def _per_sample_conv2d(
    x: Tensor, weight: Tensor, bias: Tensor | None, geometry: ConvGeometry, method: str
) -> Tensor:
    """:func:`per_sample_conv2d` on checked arguments."""
    if method == "auto":
        h_out, w_out = geometry.output_size(x.shape[-2], x.shape[-1])
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        method = _choose_per_sample_method(x.shape[0], h_out * w_out, needs_grad, geometry)
    xp, pad = _prepare(x, geometry)
    args = (geometry.stride, pad, geometry.dilation, geometry.groups)
    out = _PER_SAMPLE_IMPLS[method](xp, weight, bias, *args)
    return _match_memory_format(out, x)


def _is_pointwise(geometry: ConvGeometry) -> bool:
    """A 1x1 kernel without padding: its im2col is the (strided) input itself."""
    return geometry.kernel_size == (1, 1) and not any(geometry.pads)


def _choose_per_sample_method(
    batch: int, pixels: int, needs_grad: bool, geometry: ConvGeometry
) -> str:
    """The dispatch rule of :func:`per_sample_conv2d` (see docs/performance.md); ``pixels``:
    output pixels per sample."""
    if is_exporting() or _is_pointwise(geometry):
        # a 1x1 kernel: one batched matrix product on the input, no im2col (YOLO 1x1 256 -> 128
        # at 40x40 with gradients, N = 8-64: 0.4-0.8x nn.Conv2d, against 1.1-1.3x grouped)
        return "unfold"
    if batch == 1:
        return "direct"
    if pixels <= _UNFOLD_MAX_PIXELS and (needs_grad or freed_memory_is_kept()):
        return "unfold"
    return "grouped"


def _direct(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups):
    b = None if bias is None else bias[0]
    return F.conv2d(x, weight[0], b, stride, padding, dilation, groups)


def _grouped(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups):
    n, c_in, h, w = x.shape
    c_out = weight.shape[1]
    out = F.conv2d(
        x.reshape(1, n * c_in, h, w),
        weight.reshape(n * c_out, *weight.shape[2:]),
        None if bias is None else bias.reshape(n * c_out),
        stride,
        padding,
        dilation,
        groups * n,
    )
    return out.reshape(n, c_out, out.shape[-2], out.shape[-1])


def _loop(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups):
    # unbind, not indexing: indexing builds a full-size gradient per sample in backward.
    biases = [None] * x.shape[0] if bias is None else bias.unbind(0)
    outs = [
        F.conv2d(xi.unsqueeze(0), wi, bi, stride, padding, dilation, groups)
        for xi, wi, bi in zip(x.unbind(0), weight.unbind(0), biases, strict=False)
    ]
    return torch.cat(outs, 0)


def _unfold(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups):
    n, _c_in, h, w = x.shape
    _, c_out, c_in_g, kh, kw = weight.shape
    kh, kw = int(kh), int(kw)  # constants for F.unfold when the TorchScript tracer records shapes
    h_out = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    kernels = weight.reshape(n, groups, c_out // groups, c_in_g * kh * kw)
    if (kh, kw) == (1, 1) and padding == (0, 0):
        cols = x[..., :: stride[0], :: stride[1]]  # im2col of a 1x1 kernel: the input itself
        out = torch.matmul(kernels, cols.reshape(n, groups, c_in_g, h_out * w_out))
    elif _recomputed(weight.requires_grad,
                     n * groups * c_in_g * kh * kw * h_out * w_out * x.element_size()):
        out = _Im2colProduct.apply(x, kernels, (kh, kw), dilation, padding, stride)
    else:
        out = torch.matmul(kernels, _im2col(x, groups, (kh, kw), dilation, padding, stride))
    out = out.reshape(n, c_out, h_out, w_out)
    if bias is not None:
        out = out + bias.reshape(n, c_out, 1, 1)
    return out


def _recomputed(needs_grad: bool, nbytes: int) -> bool:
    """Whether a tensor of ``nbytes`` that backward needs is recomputed there, not kept."""
    if not needs_grad or not torch.is_grad_enabled():
        return False
    if torch.compiler.is_compiling() or is_exporting():
        return False  # (and the size may be symbolic there)
    return nbytes >= _RECOMPUTE_MIN_BYTES


def _im2col(x: Tensor, groups: int, kernel_size: Pair, dilation, padding, stride) -> Tensor:
    """The unfolded input [N, groups, C_in/groups * kH * kW, H_out * W_out]."""
    cols = F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)
    return cols.reshape(x.shape[0], groups, -1, cols.shape[-1])


class _Im2colProduct(torch.autograd.Function):
    """``kernels @ im2col(x)`` [N, g, C_out/g, P] that keeps ``x`` for backward instead of the
    im2col buffer, kH * kW times larger (a ResNet-18 8x8 layer at batch 64: 38 MB against
    4 MB), and unfolds it again there. Backward is made of differentiable operations, so double
    backward holds."""

    @staticmethod
    def forward(x, kernels, kernel_size, dilation, padding, stride):
        return torch.matmul(kernels, _im2col(x, kernels.shape[1], kernel_size, dilation, padding,
                                             stride))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, kernels, *ctx.geometry = inputs
        ctx.groups, ctx.kernels_dtype = kernels.shape[1], kernels.dtype
        # the kernels only for the input's gradient: unpacking them can cost a recomputation
        ctx.save_for_backward(x, kernels if ctx.needs_input_grad[0] else None)

    @staticmethod
    def backward(ctx, grad):
        # Under autocast the forward's product ran in grad's dtype (bfloat16, say), and backward
        # runs without autocast: the products here take that dtype as well.
        x, kernels = ctx.saved_tensors
        kernel_size, dilation, padding, stride = ctx.geometry
        grad_x = grad_kernels = None
        if ctx.needs_input_grad[1]:
            cols = _im2col(x, ctx.groups, kernel_size, dilation, padding, stride).to(grad.dtype)
            grad_kernels = torch.matmul(grad, cols.transpose(-1, -2)).to(ctx.kernels_dtype)
            del cols  # before the input's gradient, which needs as much memory again
        if ctx.needs_input_grad[0]:
            # [N, g, C_in/g * kH * kW, P]
            grad_cols = torch.matmul(kernels.to(grad.dtype).transpose(-1, -2), grad)
            grad_cols = grad_cols.to(x.dtype).reshape(x.shape[0], -1, grad_cols.shape[-1])
            grad_x = F.fold(grad_cols, x.shape[-2:], kernel_size, dilation=dilation,
                            padding=padding, stride=stride)
        return grad_x, grad_kernels, None, None, None, None


_PER_SAMPLE_IMPLS = {"direct": _direct, "grouped": _grouped, "loop": _loop, "unfold": _unfold}


# ----------------------------------------------------------------------------------------------
# mixture_conv2d
# ----------------------------------------------------------------------------------------------


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
        method: ``'auto'``, ``'aggregate'`` (assemble the N kernels with one matrix product, then
            :func:`per_sample_conv2d`) or ``'mixout'`` (one dense product with K x C_out
            outputs, then a per-sample weighted sum: K times the MACs, but dense; with a
            ``spatial`` weight, or on maps of at most 16 output pixels, the product runs on the
            unfolded input (im2col), weighted per kernel position if ``spatial`` is given).
        per_sample_method: passed to :func:`per_sample_conv2d` by ``'aggregate'``.

    Returns:
        [N, C_out, H_out, W_out].
    """
    _check_input(x)
    if not isinstance(bank, Tensor) or bank.dim() != 5:
        got = _shape(bank) if isinstance(bank, Tensor) else type(bank).__name__
        raise ValueError(f"bank must have shape [K, C_out, C_in/groups, kH, kW], got {got}")
    num_kernels, c_out = bank.shape[:2]
    n = x.shape[0]
    if not isinstance(coefficients, Tensor) or _shape(coefficients) != [n, num_kernels]:
        got = _shape(coefficients) if isinstance(coefficients, Tensor) else coefficients
        raise ValueError(f"coefficients must have shape [N, K] = {[n, num_kernels]}, got {got}")
    if bias_bank is not None and _shape(bias_bank) != [num_kernels, c_out]:
        raise ValueError(
            f"bias_bank must have shape [K, C_out] = {[num_kernels, c_out]}, "
            f"got {_shape(bias_bank)}"
        )
    kernel_size = list(bank.shape[-2:])
    if spatial is not None and (
        not isinstance(spatial, Tensor) or _shape(spatial) != [n, *kernel_size]
    ):
        got = _shape(spatial) if isinstance(spatial, Tensor) else type(spatial).__name__
        raise ValueError(
            f"spatial must have shape [N, kH, kW] = {[n, *kernel_size]} or be None, got {got}"
        )
    if method not in MIXTURE_METHODS:
        raise ValueError(f"method must be one of {MIXTURE_METHODS}, got {method!r}")
    geometry = _check_conv(x, c_out, bank.shape[2], bank.shape[-2:], stride, padding, dilation,
                           groups)
    bias = None if bias_bank is None else coefficients @ bias_bank
    if method == "auto":
        method = _choose_mixture_method(x, bank, geometry, spatial is not None)
    if method == "aggregate":
        _check_per_sample_method(per_sample_method, n)
        weights = _MixedKernels(coefficients, bank, spatial)
        if not weights.recompute_in_backward():
            return _per_sample_conv2d(x, weights.kernels(), bias, geometry, per_sample_method)
        with torch.autograd.graph.saved_tensors_hooks(weights.pack, weights.unpack):
            out = _per_sample_conv2d(x, weights.kernels(track=True), bias, geometry,
                                     per_sample_method)
        weights.forget()
        return out
    if spatial is not None and spatial[0].numel() == 1:  # a 1x1 kernel: one weight per sample
        coefficients = coefficients * spatial.reshape(n, 1).to(coefficients.dtype)
        spatial = None
    xp, pad = _prepare(x, geometry)
    args = (geometry.stride, pad, geometry.dilation, geometry.groups)
    pixels = math.prod(geometry.output_size(x.shape[-2], x.shape[-1]))
    if mixout_through_im2col(spatial is not None, pixels):
        out = _mixout_unfold(xp, coefficients, bank, spatial, bias, *args)
    else:
        out = _mixout(xp, coefficients, bank, bias, *args)
    return _match_memory_format(out, x)


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

    def __init__(self, coefficients: Tensor, bank: Tensor, spatial: Tensor | None) -> None:
        self.coefficients, self.bank, self.spatial = coefficients, bank, spatial
        self._tracked: dict[int, int] = {}  # storage address -> MIX or WEIGHT, during forward
        self._alive: list[Tensor] = []  # the tracked tensors, alive until forward ends: a freed
        # storage could be reused by another tensor that autograd saves
        self._mix_saved = False  # whether the spatial product saved the mix (for its backward)
        self._stash: Tensor | None = None  # the mix recomputed for the convolution's backward,
        # kept for the spatial product's backward, which runs next
        self._autocast: torch.dtype | None = None  # the forward's autocast dtype, if tracked
        # under autocast: backward runs without it, and recomputes under the same

    def _mix(self) -> Tensor:
        n, (num_kernels, *kernel_shape) = self.coefficients.shape[0], self.bank.shape
        return (self.coefficients @ self.bank.reshape(num_kernels, -1)).reshape(n, *kernel_shape)

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
            device = self.bank.device.type
            if torch.is_autocast_enabled(device):
                self._autocast = torch.get_autocast_dtype(device)
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
        kernel_bytes = self.coefficients.shape[0] * self.bank[0].numel() * self.bank.element_size()
        # not inside the caller's own hooks (save_on_cpu, checkpoint): they keep every tensor
        return _recomputed(needs_grad, kernel_bytes) and not _saved_tensor_hooks_active()

    def pack(self, t: Tensor):
        which = self._tracked.get(t.untyped_storage().data_ptr()) if t.numel() else None
        if which is None:
            return t
        self._mix_saved |= which == self.MIX
        return which, t.shape, t.stride(), t.storage_offset()

    def unpack(self, packed):
        if isinstance(packed, Tensor):
            return packed
        which, shape, stride, offset = packed
        mix = self._recompute_mix() if self._stash is None else self._stash
        self._stash = None
        if which == self.WEIGHT:
            if self._mix_saved and self.spatial is not None:
                self._stash = mix
            mix = self._weigh(mix)
        return mix.as_strided(shape, stride, offset)


def _saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are in effect: ours would take precedence over them inside the
    layer. (torch has no public query; without this private one, assume none.)"""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


def mixout_through_im2col(spatial: bool, pixels: int) -> bool:
    """Which form of mix-out runs: through im2col with a spatial weight (larger than 1x1) or on
    maps of at most 16 output pixels per sample, else the dense convolution."""
    return spatial or pixels <= _MIXOUT_UNFOLD_MAX_PIXELS


def _choose_mixture_method(
    x: Tensor, bank: Tensor, geometry: ConvGeometry, spatial: bool = False
) -> str:
    """The dispatch rule of :func:`mixture_conv2d` (see docs/performance.md); ``spatial``:
    whether the kernel positions are weighted per sample (ODConv)."""
    if geometry.groups != 1 or x.shape[0] == 1 or is_exporting():
        return "aggregate"  # exporting: then 'unfold', see per_sample_conv2d
    h_out, w_out = geometry.output_size(x.shape[-2], x.shape[-1])
    pixels = h_out * w_out
    if pixels >= _MIXOUT_MAX_PIXELS:
        return "aggregate"
    training = torch.is_grad_enabled() and (x.requires_grad or bank.requires_grad)
    kernel_bytes = x.shape[0] * bank[0].numel() * bank.element_size()
    large_kernels = kernel_bytes > _MIXOUT_MIN_KERNEL_BYTES
    if pixels <= _MIXOUT_UNFOLD_MAX_PIXELS and (training or large_kernels):
        # one matrix product with all K kernels: DY-Conv C=512 4x4, N=8-64: 2.9-3.2x nn.Conv2d
        # against 3.8-4.8x for per-sample kernels and im2col
        return "mixout"
    if large_kernels and not training and not freed_memory_is_kept():
        return "mixout"  # inference C=256 8x8, N=32, malloc as is: 4.4x against 6.4x
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
    y = y.reshape(n, groups, num_kernels, -1)  # [N, g, K, C_out/g * H_out * W_out]
    out = torch.matmul(coefficients.reshape(n, 1, 1, num_kernels).to(y.dtype), y)
    out = out.reshape(n, c_out, h_out, w_out)
    if bias is not None:
        out = out + bias.reshape(n, c_out, 1, 1)
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
        out = out + bias.reshape(n, c_out, 1, 1)
    return out


# ----------------------------------------------------------------------------------------------
# region_conv2d (DRConv)
# ----------------------------------------------------------------------------------------------

RegionMethod = Literal["auto", "dense", "restricted"]
REGION_METHODS = ("auto", "dense", "restricted")

# Dispatch of region_conv2d (see docs/performance.md): the restricted formulation saves R - 1
# of every R MACs but pays a gather and one small matrix product per sample, region and group;
# it wins from 4 regions on, once those products hold about a million MACs each.
_RESTRICTED_MIN_REGIONS = 4
_RESTRICTED_MIN_MACS_PER_PRODUCT = 2**20


def region_conv2d(
    x: Tensor,
    weight: Tensor,
    guide: Tensor,
    bias: Tensor | None = None,
    stride: int | Pair = 1,
    padding: PaddingArg = 0,
    dilation: int | Pair = 1,
    groups: int = 1,
    *,
    method: RegionMethod = "auto",
) -> Tensor:
    """Convolve every output pixel with the kernel of its region, ``region = guide.argmax(1)``.

    This is the convolution of DRConv (Chen et al., CVPR 2021): each sample has R kernels, and
    each output pixel takes the output of one of them, chosen by the guide.

    Args:
        x: input [N, C_in, H, W].
        weight: R kernels per sample [N, R, C_out, C_in/groups, kH, kW].
        guide: region logits [N, R, H_out, W_out]. A pixel belongs to the region of its largest
            logit; on ties the lowest region index wins (as ``torch.argmax``).
        bias: R biases per sample [N, R, C_out], or ``None``.
        stride, padding, dilation, groups: as in ``F.conv2d`` (int or pair; ``'same'``/``'valid'``).
        method: ``'auto'`` (the dispatch rule), ``'dense'`` (the seeds' way: every region's
            output at every pixel, one :func:`per_sample_conv2d` with R x C_out outputs, then a
            gather: R times the MACs and an [N, R, C_out, H_out, W_out] tensor) or
            ``'restricted'`` (each pixel only with its own region's kernel: a sample's pixels
            sorted by region, their receptive fields gathered, one matrix product per region:
            the MACs of one convolution).

    Gradients: ``x``, ``weight`` and ``bias`` get the gradient of the pixels that use them. The
    guide gets DRConv's straight-through softmax gradient: with ``s = softmax(guide)`` over R and
    ``g[n, r] = sum_o grad_out[n, o] * y_r[n, o]`` (``y_r`` the output of region r's kernel and
    bias at every pixel), ``grad_guide = s * (g - sum_r s * g)``, as if the one-hot region map
    were ``s``. ``g`` needs every region's output, so the backward costs R convolutions whatever
    the method (none if the guide needs no gradient).

    Returns:
        [N, C_out, H_out, W_out], channels_last when ``x`` is.
    """
    _check_input(x)
    if not isinstance(weight, Tensor) or weight.dim() != 6:
        got = _shape(weight) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(
            "weight must have shape [N, R, C_out, C_in/groups, kH, kW] (6-D, R kernels per "
            f"sample), got {got}"
        )
    n_w, num_regions, c_out, c_in_g, kh, kw = weight.shape
    geometry = _check_conv(x, c_out, c_in_g, (kh, kw), stride, padding, dilation, groups)
    n = x.shape[0]
    if n_w != n:
        raise ValueError(
            f"weight holds kernels for {n_w} samples but the input has batch size {n}: expected "
            "weight of shape [N, R, C_out, C_in/groups, kH, kW] with N = x.shape[0]"
        )
    h_out, w_out = geometry.output_size(x.shape[-2], x.shape[-1])
    expected = [n, num_regions, h_out, w_out]
    if not isinstance(guide, Tensor) or _shape(guide) != expected:
        got = _shape(guide) if isinstance(guide, Tensor) else type(guide).__name__
        raise ValueError(f"guide must have shape [N, R, H_out, W_out] = {expected}, got {got}")
    if not guide.is_floating_point():
        raise TypeError(f"guide must hold floating-point logits, got dtype {guide.dtype}")
    if bias is not None and (
        not isinstance(bias, Tensor) or _shape(bias) != [n, num_regions, c_out]
    ):
        got = _shape(bias) if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(
            f"bias must have shape [N, R, C_out] = {[n, num_regions, c_out]} or be None, got {got}"
        )
    if method not in REGION_METHODS:
        raise ValueError(f"method must be one of {REGION_METHODS}, got {method!r}")
    if method == "auto":
        method = _choose_region_method(weight, geometry, h_out * w_out)
    if method == "dense":
        y = _all_region_outputs(x, weight, bias, geometry)
        out = _PickRegion.apply(y, guide)
    else:
        out = _RestrictedRegionConv.apply(x, weight, guide, bias, geometry)
    return _match_memory_format(out, x)


def assign_regions(guide: Tensor) -> Tensor:
    """The region of every pixel, [N, R, H, W] logits -> [N, H, W] int64: ``guide.argmax(1)``,
    the lowest index on ties (computed with ``max``, which is faster on CPU)."""
    return guide.max(1).indices


def _choose_region_method(weight: Tensor, geometry: ConvGeometry, pixels: int) -> str:
    """The dispatch rule of :func:`region_conv2d` (see docs/performance.md).

    ``pixels``: output pixels per sample.
    """
    if torch.compiler.is_compiling() or is_exporting():
        return "dense"  # the restricted method has data-dependent shapes
    num_regions, c_out, c_in_g, kh, kw = weight.shape[1:]
    # MACs of one product: a region's pixels (P / R on average) times one group's kernel
    macs = pixels * (c_out // geometry.groups) * c_in_g * kh * kw // num_regions
    if num_regions < _RESTRICTED_MIN_REGIONS or macs < _RESTRICTED_MIN_MACS_PER_PRODUCT:
        return "dense"
    return "restricted"


def _all_region_outputs(
    x: Tensor, weight: Tensor, bias: Tensor | None, geometry: ConvGeometry
) -> Tensor:
    """Every region's output at every pixel, by one :func:`per_sample_conv2d`.

    Returns [N, groups, R, C_out/groups, H_out, W_out]: the R x C_out per-sample kernels are
    stacked group by group, so that each group's output channels stay together.
    """
    n, num_regions, c_out = weight.shape[:3]
    g = geometry.groups
    kernel = weight.reshape(n, num_regions, g, c_out // g, *weight.shape[3:])
    kernel = kernel.transpose(1, 2).reshape(n, num_regions * c_out, *weight.shape[3:])
    b = None
    if bias is not None:
        b = bias.reshape(n, num_regions, g, c_out // g).transpose(1, 2).reshape(n, -1)
    y = per_sample_conv2d(x, kernel, b, geometry.stride, geometry.padding, geometry.dilation, g)
    return y.reshape(n, g, num_regions, c_out // g, y.shape[-2], y.shape[-1])


def _straight_through_grad(guide: Tensor, scores: Tensor) -> Tensor:
    """``s * (scores - sum_r s * scores)`` with ``s = softmax(guide)`` over dim 1, in >= float32."""
    dtype = torch.promote_types(guide.dtype, torch.float32)
    s = guide.to(dtype).softmax(1)
    scores = scores.to(dtype)
    return (s * (scores - (s * scores).sum(1, keepdim=True))).to(guide.dtype)


class _PickRegion(torch.autograd.Function):
    """Keep region ``guide.argmax(1)`` of every region's output (the seeds' assignment).

    y [N, g, R, C_out/g, H, W], guide [N, R, H, W] -> [N, C_out, H, W]. Backward: ``y`` gets the
    output gradient at its chosen region, the guide the straight-through softmax gradient.
    """

    @staticmethod
    def forward(ctx, y: Tensor, guide: Tensor) -> Tensor:
        n, g, _, c_g, h, w = y.shape
        index = assign_regions(guide).reshape(n, 1, 1, 1, h, w).expand(n, g, 1, c_g, h, w)
        ctx.save_for_backward(index, y if ctx.needs_input_grad[1] else None, guide)
        ctx.y_shape = y.shape
        return y.gather(2, index).reshape(n, g * c_g, h, w)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        index, y, guide = ctx.saved_tensors
        n, g, _, c_g, h, w = ctx.y_shape
        grad = grad_out.reshape(n, g, 1, c_g, h, w)
        grad_y = grad_guide = None
        if ctx.needs_input_grad[0]:
            grad_y = grad.new_zeros(ctx.y_shape).scatter_(2, index, grad)
        if ctx.needs_input_grad[1]:
            grad_guide = _straight_through_grad(guide, (y * grad).sum((1, 3)))
        return grad_y, grad_guide


class _RegionPlan:
    """Where each sample's pixels go: regions, pixels sorted by region, and receptive fields.

    ``order`` [N, P] lists a sample's output pixels sorted by region (stable), ``counts`` [N][R]
    how many pixels each region holds, and ``fields`` [N, P * kH * kW] the flat index, in the
    padded input plane, of every tap of every pixel's receptive field in that order.
    """

    def __init__(self, guide: Tensor, padded_width: int, geometry: ConvGeometry) -> None:
        n, num_regions, h_out, w_out = guide.shape
        device = guide.device
        region = assign_regions(guide).reshape(n, h_out * w_out)
        self.order = region.argsort(dim=1, stable=True)
        offsets = torch.arange(n, device=device).unsqueeze(1) * num_regions
        counts = torch.bincount((region + offsets).flatten(), minlength=n * num_regions)
        self.counts: list[list[int]] = counts.reshape(n, num_regions).tolist()
        (sh, sw), (dh, dw) = geometry.stride, geometry.dilation
        kh, kw = geometry.kernel_size
        rows = torch.arange(h_out, device=device) * (sh * padded_width)
        cols = torch.arange(w_out, device=device) * sw
        corner = (rows[:, None] + cols[None, :]).flatten()[self.order]  # [N, P]
        taps = torch.arange(kh, device=device)[:, None] * (dh * padded_width)
        taps = (taps + torch.arange(kw, device=device)[None, :] * dw).flatten()
        self.fields = (corner[:, :, None] + taps[None, None, :]).reshape(n, -1)

    def segments(self, sample: int):
        """(region, slice of the sorted pixels) for every non-empty region of a sample."""
        start = 0
        for region, count in enumerate(self.counts[sample]):
            if count:
                yield region, slice(start, start + count)
                start += count


def _to_rows(t: Tensor, groups: int) -> Tensor:
    """[N, C, H, W] -> [N, g, H * W, C/g]: one row of channels per pixel, group by group."""
    n, c, h, w = t.shape
    return t.reshape(n, groups, c // groups, h * w).transpose(2, 3).contiguous()


def _row_kernels(weight: Tensor, groups: int) -> Tensor:
    """One sample's kernels [R, C_out, C_in/g, kH, kW] -> [R, g, kH * kW * C_in/g, C_out/g]."""
    r, c_out, c_in_g, kh, kw = weight.shape
    w = weight.reshape(r, groups, c_out // groups, c_in_g, kh, kw).permute(0, 1, 4, 5, 3, 2)
    return w.reshape(r, groups, kh * kw * c_in_g, c_out // groups)


class _RestrictedRegionConv(torch.autograd.Function):
    """Each output pixel convolved with its own region's kernel only (the MACs of one conv).

    x [N, C_in, H, W], weight [N, R, C_out, C_in/g, kH, kW], guide [N, R, H_out, W_out],
    bias [N, R, C_out] or None -> [N, C_out, H_out, W_out].

    Works on pixel rows: the padded input as [g, Hp * Wp, C_in/g], a sample's receptive fields
    gathered in region order as [g, P, kH * kW * C_in/g], one matrix product per region. Saves
    only the inputs: the receptive fields are gathered again in backward.
    """

    @staticmethod
    def forward(ctx, x, weight, guide, bias, geometry: ConvGeometry) -> Tensor:
        xp = F.pad(x, geometry.pads) if any(geometry.pads) else x
        plan = _RegionPlan(guide, xp.shape[-1], geometry)
        n, c_out, g = x.shape[0], weight.shape[2], geometry.groups
        h_out, w_out = guide.shape[-2:]
        pixels = h_out * w_out
        rows = _to_rows(xp, g)  # [N, g, Hp * Wp, C_in/g]
        out = x.new_empty(n, pixels, g, c_out // g)
        sorted_out = x.new_empty(g, pixels, c_out // g)
        buffer = x.new_empty(g, plan.fields.shape[1], rows.shape[-1])
        for i in range(n):
            fields = _gather_fields(rows[i], plan.fields[i], pixels, buffer)
            kernels = _row_kernels(weight[i], g)
            for region, part in plan.segments(i):
                b = None if bias is None else bias[i, region].reshape(g, 1, -1)
                _bmm_into(sorted_out[:, part], fields[:, part], kernels[region], b)
            out[i].index_copy_(0, plan.order[i], sorted_out.transpose(0, 1))
        ctx.save_for_backward(x, weight, guide, bias)
        ctx.plan, ctx.geometry = plan, geometry
        out = out.reshape(n, h_out, w_out, c_out).permute(0, 3, 1, 2)  # channels_last strides
        return out if _is_channels_last(x) else out.contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, weight, guide, bias = ctx.saved_tensors
        plan, geometry = ctx.plan, ctx.geometry
        need_x, need_w, need_guide, need_b = ctx.needs_input_grad[:4]
        xp = F.pad(x, geometry.pads) if any(geometry.pads) else x
        n, _, _, c_in_g, kh, kw = weight.shape
        g = geometry.groups
        pixels = grad_out.shape[-2] * grad_out.shape[-1]
        grad_rows = _to_rows(grad_out, g)  # [N, g, P, C_out/g]
        rows = _to_rows(xp, g) if need_w else None
        buffer = xp.new_empty(g, plan.fields.shape[1], c_in_g) if need_w else None
        grad_x_rows = xp.new_zeros(n, g, xp.shape[-2] * xp.shape[-1], c_in_g) if need_x else None
        grad_w = torch.zeros_like(weight) if need_w else None  # zero for regions without pixels
        grad_b = torch.zeros_like(bias) if need_b else None
        grad_sorted = torch.empty_like(grad_rows[0])  # buffers reused from sample to sample
        grad_fields = xp.new_empty(g, pixels, kh * kw * c_in_g) if need_x else None
        for i in range(n):
            torch.index_select(grad_rows[i], 1, plan.order[i], out=grad_sorted)  # [g, P, C/g]
            kernels = _row_kernels(weight[i], g) if need_x else None
            fields = _gather_fields(rows[i], plan.fields[i], pixels, buffer) if need_w else None
            for region, part in plan.segments(i):
                grad_part = grad_sorted[:, part]
                if need_w:  # into [C_out, C_in/g, kH, kW] seen as [g, kH, kW, C_in/g, C_out/g]
                    target = grad_w[i, region].view(g, -1, c_in_g, kh, kw).permute(0, 3, 4, 2, 1)
                    _bmm_into(target, fields[:, part].transpose(1, 2), grad_part)
                if need_b:
                    grad_b[i, region] = grad_part.sum(1).reshape(-1)
                if need_x:
                    _bmm_into(grad_fields[:, part], grad_part, kernels[region].transpose(1, 2))
            if need_x:
                grad_x_rows[i].index_add_(1, plan.fields[i], grad_fields.reshape(g, -1, c_in_g))
        grad_x = None
        if need_x:
            hp, wp = xp.shape[-2:]
            grad_xp = grad_x_rows.reshape(n, g, hp, wp, c_in_g).permute(0, 1, 4, 2, 3)
            grad_xp = grad_xp.reshape(n, g * c_in_g, hp, wp)
            left, _, top, _ = geometry.pads
            grad_x = grad_xp[..., top : top + x.shape[-2], left : left + x.shape[-1]]
        grad_guide = None
        if need_guide:
            scores = _region_scores(xp, weight, bias, grad_out, geometry)
            grad_guide = _straight_through_grad(guide, scores)
        return grad_x, grad_w, grad_guide, grad_b, None


def _bmm_into(out: Tensor, a: Tensor, b: Tensor, bias: Tensor | None = None) -> None:
    """``out[...] = a @ b (+ bias)`` for [g, n, k] @ [g, k, m]; ``out`` holds the g * n * m
    results in that order, in any shape, and is written without a copy when contiguous."""
    if out.is_contiguous():
        target = out.view(a.shape[0], a.shape[1], b.shape[2])
        if bias is None:
            torch.bmm(a, b, out=target)
        else:
            torch.baddbmm(bias, a, b, out=target)
    else:
        result = torch.bmm(a, b) if bias is None else torch.baddbmm(bias, a, b)
        out.copy_(result.reshape(out.shape))


def _gather_fields(rows: Tensor, fields: Tensor, pixels: int, out: Tensor) -> Tensor:
    """One sample's receptive fields: rows [g, Hp * Wp, C_in/g] -> [g, P, kH * kW * C_in/g].

    ``out`` [g, P * kH * kW, C_in/g] is reused from sample to sample: a fresh buffer of this size
    costs more (first-touch page faults) than the gather itself.
    """
    torch.index_select(rows, 1, fields, out=out)
    return out.view(rows.shape[0], pixels, -1)


def _region_scores(
    xp: Tensor, weight: Tensor, bias: Tensor | None, grad_out: Tensor, geometry: ConvGeometry
) -> Tensor:
    """``g[n, r, p] = sum_o grad_out[n, o, p] * y_r[n, o, p]`` [N, R, H_out, W_out], ``y_r`` the
    output of region r's kernel and bias everywhere (R times the MACs), for the padded input
    ``xp``; one sample at a time, so that one sample's R outputs are held at once."""
    n, c_out, g = weight.shape[0], weight.shape[2], geometry.groups
    unpadded = dataclasses.replace(geometry, padding=(0, 0), pads=(0, 0, 0, 0))
    scores = []
    for i in range(n):
        b = None if bias is None else bias[i : i + 1]
        y = _all_region_outputs(xp[i : i + 1], weight[i : i + 1], b, unpadded)
        grad = grad_out[i].reshape(1, g, 1, c_out // g, y.shape[-2], y.shape[-1])
        scores.append((y * grad).sum((1, 3)))
    return torch.cat(scores)


# ----------------------------------------------------------------------------------------------
# adaptive average pooling that exports at any input size
# ----------------------------------------------------------------------------------------------


def _pooling_matrix(size_in: int | Tensor, size_out: int, like: Tensor) -> Tensor:
    """[size_out, size_in] averaging matrix of adaptive average pooling: output cell ``i``
    averages inputs ``floor(i * n / k)`` to ``ceil((i + 1) * n / k) - 1``, as torch does."""
    positions = torch.arange(size_in, device=like.device)
    cells = torch.arange(size_out, device=like.device).unsqueeze(1)
    start = cells * size_in // size_out
    end = ((cells + 1) * size_in + size_out - 1) // size_out
    inside = (positions >= start) & (positions < end)
    return inside.to(like.dtype) / (end - start).to(like.dtype)


def adaptive_avg_pool2d_matmul(x: Tensor, output_size: Pair) -> Tensor:
    """``F.adaptive_avg_pool2d`` for [N, C, H, W] -> [N, C, *output_size] as two products with
    averaging matrices: the form DRConv exports with, because the TorchScript ONNX exporter
    (Ultralytics' ``export``) supports adaptive pooling only to a factor of the input size, and
    a dynamic input size has none."""
    rows = _pooling_matrix(x.shape[-2], output_size[0], x)
    cols = _pooling_matrix(x.shape[-1], output_size[1], x)
    return rows @ x @ cols.transpose(0, 1)
