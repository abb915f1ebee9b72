"""``per_sample_conv2d``: every sample convolved with its own kernel, by one of four exact
formulations (a plain, a grouped or a looped convolution, or im2col and a batched matrix
product) and the rule that picks one."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .._conv_args import ConvGeometry, PaddingArg, Pair
from . import tuning
from ._common import (
    check_conv,
    check_input,
    check_input_dtype,
    check_shape,
    is_exporting,
    match_memory_format,
    pad_for_conv,
    shape_list,
)
from .dispatch import freed_memory_reused, rule_for

PerSampleMethod = Literal["auto", "direct", "grouped", "loop", "unfold"]
PER_SAMPLE_METHODS = ("auto", "direct", "grouped", "loop", "unfold")

# What the forward makes and backward needs (the per-sample kernels, the im2col buffer) is not
# kept between them but recomputed in backward from at least this many bytes.
_RECOMPUTE_MIN_BYTES = 4 * 2**20


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
            convolution, N = 1 only; or N = 0), ``'grouped'`` (the batch folded into the groups),
            ``'loop'`` (one convolution per sample) or ``'unfold'`` (im2col and a batched matrix
            product; exports to ONNX with a dynamic batch).

    An empty batch (N = 0) gives an empty output, with every method, as ``F.conv2d`` does.

    Returns:
        [N, C_out, H_out, W_out], channels_last when ``x`` is.
    """
    check_input(x)
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    check_input_dtype(x, weight.dtype, "per_sample_conv2d", "the weight")
    if weight.dim() != 5:
        raise ValueError(
            "weight must have shape [N, C_out, C_in/groups, kH, kW] (5-D, one kernel per sample), "
            f"got shape {shape_list(weight)}"
        )
    n_w, c_out, c_in_g, kh, kw = weight.shape
    geometry, output_size = check_conv(x, c_out, c_in_g, (kh, kw), stride, padding, dilation,
                                       groups)
    n = x.shape[0]
    if n_w != n:
        raise ValueError(
            f"the per-sample weight holds {n_w} kernels but the input has batch size {n}: "
            "expected weight of shape [N, C_out, C_in/groups, kH, kW] with N = x.shape[0]"
        )
    check_shape(bias, "bias", "[N, C_out]", [n, c_out], optional=True)
    check_per_sample_method(method, n)
    return per_sample_conv2d_unchecked(x, weight, bias, geometry, output_size, method=method)


def check_per_sample_method(method: str, batch: int) -> None:
    """Raise unless ``method`` is one of :data:`PER_SAMPLE_METHODS` that runs at this batch."""
    if method not in PER_SAMPLE_METHODS:
        raise ValueError(f"method must be one of {PER_SAMPLE_METHODS}, got {method!r}")
    if method == "direct" and batch > 1:
        raise ValueError(f"method='direct' needs batch size 1 (or an empty batch), got {batch}")


def per_sample_conv2d_unchecked(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    geometry: ConvGeometry,
    output_size: Pair,
    *,
    method: str = "auto",
) -> Tensor:
    """:func:`per_sample_conv2d` without its checks, for callers that made them: ``geometry``
    parsed, ``output_size`` (H_out, W_out) the output's, ``method`` valid for the batch."""
    if method == "auto":
        method = tuning.choose(
            "per_sample_conv2d", (x, weight, bias), geometry,
            lambda: per_sample_candidates(x, weight.shape[1], geometry, output_size),
            lambda m, t: per_sample_conv2d_unchecked(*t, geometry, output_size, method=m),
            lambda: resolve_per_sample_method("auto", x, weight.requires_grad, geometry,
                                              output_size))
    xp, pad = pad_for_conv(x, geometry)
    args = (geometry.stride, pad, geometry.dilation, geometry.groups)
    out = _PER_SAMPLE_IMPLS[method](xp, weight, bias, *args)
    return match_memory_format(out, x)


def per_sample_candidates(x: Tensor, c_out: int, geometry: ConvGeometry, output_size: Pair
                          ) -> list[str]:
    """The formulations :func:`dynconv.autotune` times for a call: ``'direct'`` at batch 1,
    else ``'grouped'`` and ``'loop'``; and ``'unfold'`` unless its im2col buffer would pass
    :data:`~dynconv.functional.tuning.MAX_CANDIDATE_BYTES`."""
    n = x.shape[0]
    names = ["direct"] if n == 1 else ["grouped", "loop"]
    kh, kw = geometry.kernel_size
    cols = n * x.shape[1] * kh * kw * output_size[0] * output_size[1] * x.element_size()
    if _is_pointwise(geometry) or cols <= tuning.MAX_CANDIDATE_BYTES:
        names.append("unfold")
    return names


def resolve_per_sample_method(method: str, x: Tensor, weight_requires_grad: bool,
                              geometry: ConvGeometry, output_size: Pair) -> str:
    """``method``, or for ``'auto'`` the formulation the dispatch rule picks for input ``x`` and
    kernels that do (or not) require gradients."""
    if method != "auto":
        return method
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight_requires_grad)
    pixels = output_size[0] * output_size[1]
    return _choose_per_sample_method(x.shape[0], pixels, needs_grad, geometry, x.device)


def _is_pointwise(geometry: ConvGeometry) -> bool:
    """A 1x1 kernel without padding: its im2col is the (strided) input itself."""
    return geometry.kernel_size == (1, 1) and not any(geometry.pads)


def _choose_per_sample_method(
    batch: int, pixels: int, needs_grad: bool, geometry: ConvGeometry,
    device: torch.device | str = "cpu",
) -> str:
    """The dispatch rule of :func:`per_sample_conv2d` (see docs/performance.md) with the
    thresholds of ``device``'s table (:mod:`dynconv.functional.dispatch`); ``pixels``: output
    pixels per sample."""
    rule = rule_for(device)
    if is_exporting() or (rule.pointwise_unfold and _is_pointwise(geometry)):
        # a 1x1 kernel: one batched matrix product on the input, no im2col (CPU: YOLO 1x1
        # 256 -> 128 at 40x40 with gradients, N = 8-64: 0.4-0.8x nn.Conv2d, against 1.1-1.3x
        # grouped)
        return "unfold"
    if batch == 1:
        return "direct"
    if pixels <= rule.unfold_max_pixels and (needs_grad or freed_memory_reused(rule)):
        return "unfold"
    return "grouped"


# 'direct', 'grouped' and 'loop' cannot run on an empty batch (no kernel to convolve with,
# groups = 0, nothing to concatenate): it goes through 'unfold', whose products take N = 0.


def _direct(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups):
    if x.shape[0] == 0:
        return _unfold(x, weight, bias, stride, padding, dilation, groups)
    b = None if bias is None else bias[0]
    return F.conv2d(x, weight[0], b, stride, padding, dilation, groups)


def _grouped(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups):
    n, c_in, h, w = x.shape
    if n == 0:
        return _unfold(x, weight, bias, stride, padding, dilation, groups)
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
    if x.shape[0] == 0:
        return _unfold(x, weight, bias, stride, padding, dilation, groups)
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
    elif is_recomputed(weight.requires_grad,
                     n * groups * c_in_g * kh * kw * h_out * w_out * x.element_size()):
        out = _Im2colProduct.apply(x, kernels, (kh, kw), dilation, padding, stride)
    else:
        out = torch.matmul(kernels, im2col(x, groups, (kh, kw), dilation, padding, stride))
    out = out.reshape(n, c_out, h_out, w_out)
    if bias is not None:  # in the product's dtype (autocast's), as F.conv2d adds its bias
        out = out + bias.reshape(n, c_out, 1, 1).to(out.dtype)
    return out


def is_recomputed(needs_grad: bool, nbytes: int) -> bool:
    """Whether a tensor of ``nbytes`` that backward needs is recomputed there, not kept."""
    if not needs_grad or not torch.is_grad_enabled():
        return False
    if torch.compiler.is_compiling() or is_exporting():
        return False  # (and the size may be symbolic there)
    return nbytes >= _RECOMPUTE_MIN_BYTES


def im2col(x: Tensor, groups: int, kernel_size: Pair, dilation, padding, stride) -> Tensor:
    """The unfolded input [N, groups, C_in/groups * kH * kW, H_out * W_out]."""
    cols = F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)
    return cols.reshape(x.shape[0], groups, cols.shape[1] // groups, cols.shape[-1])


def compact(t: Tensor) -> Tensor:
    """``t``, copied if its storage is larger than it needs: ``F.fold``'s result keeps a buffer
    the size of its columns (kH * kW times larger), which would live as long as the result."""
    if t.untyped_storage().nbytes() > t.numel() * t.element_size():
        return t.clone(memory_format=torch.contiguous_format)
    return t


class _Im2colProduct(torch.autograd.Function):
    """``kernels @ im2col(x)`` [N, g, C_out/g, P] that keeps ``x`` for backward instead of the
    im2col buffer, kH * kW times larger (a ResNet-18 8x8 layer at batch 64: 38 MB against
    4 MB), and unfolds it again there. Backward is made of differentiable operations, so double
    backward holds."""

    @staticmethod
    def forward(x, kernels, kernel_size, dilation, padding, stride):
        return torch.matmul(kernels, im2col(x, kernels.shape[1], kernel_size, dilation, padding,
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
            cols = im2col(x, ctx.groups, kernel_size, dilation, padding, stride).to(grad.dtype)
            grad_kernels = torch.matmul(grad, cols.transpose(-1, -2)).to(ctx.kernels_dtype)
            del cols  # before the input's gradient, which needs as much memory again
        if ctx.needs_input_grad[0]:
            # [N, g, C_in/g * kH * kW, P]
            grad_cols = torch.matmul(kernels.to(grad.dtype).transpose(-1, -2), grad)
            grad_cols = grad_cols.to(x.dtype).flatten(1, 2)
            grad_x = compact(F.fold(grad_cols, x.shape[-2:], kernel_size, dilation=dilation,
                                    padding=padding, stride=stride))
        return grad_x, grad_kernels, None, None, None, None


_PER_SAMPLE_IMPLS = {"direct": _direct, "grouped": _grouped, "loop": _loop, "unfold": _unfold}
