"""``mixture_conv2d``: each sample convolved with its own mixture of a shared kernel bank
(DY-Conv, CondConv, ODConv), by assembling the per-sample kernels or by mixing the outputs of
all K kernels."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .._conv_args import ConvGeometry, PaddingArg, Pair
from . import tuning
from ._common import (
    autocast_dtype,
    check_conv,
    check_input,
    check_input_dtype,
    check_shape,
    is_exporting,
    match_memory_format,
    pad_for_conv,
    shape_list,
)
from .dispatch import DispatchRule, freed_memory_reused, rule_for
from .per_sample import (
    PerSampleMethod,
    check_per_sample_method,
    is_recomputed,
    per_sample_candidates,
    per_sample_conv2d_unchecked,
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

    An empty batch (N = 0) gives an empty output with every method, as ``F.conv2d`` does.

    Returns:
        [N, C_out, H_out, W_out].
    """
    check_input(x)
    if not isinstance(bank, Tensor) or bank.dim() != 5:
        got = shape_list(bank) if isinstance(bank, Tensor) else type(bank).__name__
        raise ValueError(f"bank must have shape [K, C_out, C_in/groups, kH, kW], got {got}")
    check_input_dtype(x, bank.dtype, "mixture_conv2d", "the bank")
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
    check_mixture_method(method)
    geometry, output_size = check_conv(x, c_out, bank.shape[2], bank.shape[-2:], stride, padding,
                                       dilation, groups)
    return mixture_conv2d_unchecked(
        x, coefficients, bank, bias_bank, geometry, output_size, spatial=spatial, method=method,
        per_sample_method=per_sample_method,
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
            "mixture_conv2d", (x, coefficients, bank, bias_bank, spatial), geometry,
            lambda: _candidates(x, bank, geometry, output_size, spatial is not None),
            lambda m, t: mixture_conv2d_unchecked(
                t[0], t[1], t[2], t[3], geometry, output_size, spatial=t[4],
                method=m.split("/")[0], per_sample_method=m.partition("/")[2] or "auto"),
            lambda: _choose_mixture_method(x, bank, geometry, spatial is not None, pixels))
        method, _, per_sample_method = method.partition("/")
        per_sample_method = per_sample_method or "auto"
    elif method == "auto":
        method = _choose_mixture_method(x, bank, geometry, spatial is not None, pixels)
    if method == "aggregate":
        check_per_sample_method(per_sample_method, n)
        weights = _MixedKernels(coefficients, bank, spatial)
        if not weights.recompute_in_backward():
            return per_sample_conv2d_unchecked(x, weights.kernels(), bias, geometry, output_size,
                                               method=per_sample_method)
        with torch.autograd.graph.saved_tensors_hooks(weights.pack, weights.unpack):
            out = per_sample_conv2d_unchecked(x, weights.kernels(track=True), bias, geometry,
                                              output_size, method=per_sample_method)
        weights.forget()
        return out
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
        return mix_kernels(self.coefficients, self.bank)

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
        kernel_bytes = self.coefficients.shape[0] * self.bank[0].numel() * self.bank.element_size()
        # not inside the caller's own hooks (save_on_cpu, checkpoint): they keep every tensor
        return is_recomputed(needs_grad, kernel_bytes) and not _saved_tensor_hooks_active()

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
