"""The one per-sample convolution of the package, and its exact formulations.

Every layer of dynconv ends in one of two calls:

* :func:`per_sample_conv2d` convolves each sample with its own kernel
  (``x`` [N, C_in, H, W], ``weight`` [N, C_out, C_in/groups, kH, kW]).
* :func:`mixture_conv2d` convolves each sample with a per-sample mixture of a shared kernel
  bank, ``sum_k coefficients[n, k] * bank[k]``, optionally weighted per kernel position
  (ODConv's spatial attention). It either assembles the per-sample kernels and calls
  :func:`per_sample_conv2d`, or runs one dense product with all K kernels and mixes the outputs,
  whichever the dispatch rule expects to be faster.

All formulations compute the same result (up to floating-point rounding); ``method`` forces one,
which the tests do in turn.

While a model is traced for export (:func:`is_exporting`: ``torch.onnx.export``, ``torch.export``,
``torch.jit.trace``), ``'auto'`` picks the formulations whose graph holds for any batch size:
the per-sample kernels assembled with one matrix product, then ``'unfold'`` (im2col and a
batched matrix product). The grouped formulation folds the batch into the convolution's
``groups``, a constant of the exported graph, and would freeze the batch size.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ._conv_args import ConvGeometry, PaddingArg, Pair, parse_geometry

PerSampleMethod = Literal["auto", "direct", "grouped", "loop", "unfold"]
MixtureMethod = Literal["auto", "aggregate", "mixout"]
PER_SAMPLE_METHODS = ("auto", "direct", "grouped", "loop", "unfold")
MIXTURE_METHODS = ("auto", "aggregate", "mixout")

# Dispatch thresholds for the mixture (see docs/performance.md): below this many output pixels
# per sample, mixing the K dense outputs beats assembling per-sample kernels once those kernels
# are large (bytes over the whole batch) or when gradients are needed on tiny maps.
_MIXOUT_MAX_PIXELS = 256
_MIXOUT_MIN_KERNEL_BYTES = 32 * 2**20
_MIXOUT_TRAIN_MAX_PIXELS = 16


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


def _match_memory_format(out: Tensor, x: Tensor) -> Tensor:
    """Return ``out`` in channels_last when ``x`` is, as ``nn.Conv2d`` does."""
    if (
        x.shape[1] > 1
        and x.is_contiguous(memory_format=torch.channels_last)
        and not x.is_contiguous()
    ):
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
    if method not in PER_SAMPLE_METHODS:
        raise ValueError(f"method must be one of {PER_SAMPLE_METHODS}, got {method!r}")

    if method == "auto":
        method = _choose_per_sample_method(n)
    elif method == "direct" and n != 1:
        raise ValueError(f"method='direct' needs batch size 1, got {n}")
    xp, pad = _prepare(x, geometry)
    args = (geometry.stride, pad, geometry.dilation, geometry.groups)
    out = _PER_SAMPLE_IMPLS[method](xp, weight, bias, *args)
    return _match_memory_format(out, x)


def _choose_per_sample_method(batch: int) -> str:
    """The dispatch rule of :func:`per_sample_conv2d` (see docs/performance.md)."""
    if is_exporting():
        return "unfold"
    return "direct" if batch == 1 else "grouped"


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
    h_out = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    cols = cols.reshape(n, groups, c_in_g * kh * kw, h_out * w_out)
    kernels = weight.reshape(n, groups, c_out // groups, c_in_g * kh * kw)
    out = torch.matmul(kernels, cols).reshape(n, c_out, h_out, w_out)
    if bias is not None:
        out = out + bias.reshape(n, c_out, 1, 1)
    return out


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
            ``spatial`` weight the input is unfolded (im2col) and weighted per kernel position).
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
        method = _choose_mixture_method(x, bank, geometry)
    if method == "aggregate":
        weight = (coefficients @ bank.reshape(num_kernels, -1)).reshape(n, *bank.shape[1:])
        if spatial is not None:
            weight = weight * spatial.to(weight.dtype).reshape(n, 1, 1, *kernel_size)
        return per_sample_conv2d(
            x, weight, bias, stride, padding, dilation, groups, method=per_sample_method
        )
    if spatial is not None and spatial[0].numel() == 1:  # a 1x1 kernel: one weight per sample
        coefficients = coefficients * spatial.reshape(n, 1).to(coefficients.dtype)
        spatial = None
    xp, pad = _prepare(x, geometry)
    args = (geometry.stride, pad, geometry.dilation, geometry.groups)
    if spatial is None:
        out = _mixout(xp, coefficients, bank, bias, *args)
    else:
        out = _mixout_unfold(xp, coefficients, bank, spatial, bias, *args)
    return _match_memory_format(out, x)


def _choose_mixture_method(x: Tensor, bank: Tensor, geometry: ConvGeometry) -> str:
    """The dispatch rule of :func:`mixture_conv2d` (see docs/performance.md)."""
    if is_exporting():
        return "aggregate"  # then 'unfold', see per_sample_conv2d
    if geometry.groups != 1 or x.shape[0] == 1:
        return "aggregate"
    h_out, w_out = geometry.output_size(x.shape[-2], x.shape[-1])
    pixels = h_out * w_out
    if pixels >= _MIXOUT_MAX_PIXELS:
        return "aggregate"
    kernel_bytes = x.shape[0] * bank[0].numel() * bank.element_size()
    training = torch.is_grad_enabled() and (x.requires_grad or bank.requires_grad)
    if kernel_bytes > _MIXOUT_MIN_KERNEL_BYTES or (training and pixels <= _MIXOUT_TRAIN_MAX_PIXELS):
        return "mixout"
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
    spatial: Tensor,
    bias: Tensor | None,
    stride,
    padding,
    dilation,
    groups: int,
) -> Tensor:
    """Mix-out with a per-sample weight of each kernel position: unfold the input (im2col),
    weight the columns of kernel position p of sample n by ``spatial[n, p]``, multiply by all K
    kernels at once (one matrix product per group over the whole batch), then mix over K."""
    num_kernels, c_out, c_in_g, kh, kw = bank.shape
    n, _, h, w = x.shape
    taps, c_out_g = kh * kw, c_out // groups
    h_out = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    pixels = h_out * w_out
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    cols = cols.reshape(n, groups, c_in_g, taps, pixels)
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
