"""``region_conv2d`` (DRConv): every output pixel convolved with one of R per-sample kernels,
chosen by a guide; and the adaptive average pooling that DRConv exports with."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._conv_args import ConvGeometry, PaddingArg, Pair
from . import tuning
from ._common import (
    autocast_like_conv,
    check_conv,
    check_input,
    check_input_dtype,
    check_shape,
    is_channels_last,
    is_exporting,
    match_memory_format,
    shape_list,
)
from .dispatch import rule_for
from .per_sample import per_sample_candidates, per_sample_conv2d_unchecked

RegionMethod = Literal["auto", "dense", "restricted"]
REGION_METHODS = ("auto", "dense", "restricted")


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

    An empty batch (N = 0) gives an empty output with every method. On the meta device, which
    holds no values to sort pixels by, ``'restricted'`` runs as ``'dense'`` (the same output).

    Returns:
        [N, C_out, H_out, W_out], channels_last when ``x`` is.
    """
    check_input(x)
    if not isinstance(weight, Tensor) or weight.dim() != 6:
        got = shape_list(weight) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(
            "weight must have shape [N, R, C_out, C_in/groups, kH, kW] (6-D, R kernels per "
            f"sample), got {got}"
        )
    check_input_dtype(x, weight.dtype, "region_conv2d", "the weight")
    n_w, num_regions, c_out, c_in_g, kh, kw = weight.shape
    geometry, (h_out, w_out) = check_conv(x, c_out, c_in_g, (kh, kw), stride, padding, dilation,
                                          groups)
    n = x.shape[0]
    if n_w != n:
        raise ValueError(
            f"weight holds kernels for {n_w} samples but the input has batch size {n}: expected "
            "weight of shape [N, R, C_out, C_in/groups, kH, kW] with N = x.shape[0]"
        )
    check_shape(guide, "guide", "[N, R, H_out, W_out]", [n, num_regions, h_out, w_out])
    if not guide.is_floating_point():
        raise TypeError(f"guide must hold floating-point logits, got dtype {guide.dtype}")
    check_shape(bias, "bias", "[N, R, C_out]", [n, num_regions, c_out], optional=True)
    check_region_method(method)
    return region_conv2d_unchecked(x, weight, guide, bias, geometry, method=method)


def check_region_method(method: object) -> None:
    """Raise unless ``method`` is one of :data:`REGION_METHODS`."""
    if method not in REGION_METHODS:
        raise ValueError(f"method must be one of {REGION_METHODS}, got {method!r}")


def region_conv2d_unchecked(
    x: Tensor,
    weight: Tensor,
    guide: Tensor,
    bias: Tensor | None,
    geometry: ConvGeometry,
    *,
    method: str = "auto",
    regions: Tensor | None = None,
) -> Tensor:
    """:func:`region_conv2d` without its checks, for callers that made them (the layer):
    ``geometry`` parsed, the tensors of the right shapes (the guide's [H_out, W_out] is the
    output size) and ``method`` valid (:func:`check_region_method`). ``regions``: the region
    map ``assign_regions(guide)`` [N, H_out, W_out] when the caller has it (computed here
    otherwise)."""
    if regions is None:
        regions = assign_regions(guide.detach())
    output_size = guide.shape[-2:]
    per_sample_method = "auto"
    if method == "auto":
        method = tuning.choose(
            "region_conv2d", (x, weight, guide, bias), geometry,
            lambda: _candidates(x, weight, geometry, output_size),
            lambda m, t: region_conv2d_unchecked(t[0], t[1], t[2], t[3], geometry, method=m,
                                                 regions=regions),
            lambda: _choose_region_method(weight, geometry, output_size[0] * output_size[1]))
    method, _, per_sample_method = method.partition("/")  # 'dense/grouped': dense, forced
    if method == "dense" or x.device.type == "meta":  # meta: no values to sort pixels by
        y = _all_region_outputs(x, weight, bias, geometry, output_size,
                                per_sample_method or "auto")
        out = _PickRegion.apply(y, guide, regions)
    else:
        # its products are out of autocast's reach: the inputs cast as for a convolution
        x, weight, bias = autocast_like_conv(x, weight, bias)
        out = _RestrictedRegionConv.apply(x, weight, guide, bias, regions, geometry)
    return match_memory_format(out, x)


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
    # the restricted formulation saves R - 1 of every R MACs but pays a gather and one small
    # matrix product per sample, region and group (CPU: it wins from 4 regions on, once those
    # products hold about a million MACs each)
    rule = rule_for(weight.device)
    macs = pixels * (c_out // geometry.groups) * c_in_g * kh * kw // num_regions
    if num_regions < rule.restricted_min_regions or macs < rule.restricted_min_macs:
        return "dense"
    return "restricted"


def _candidates(x: Tensor, weight: Tensor, geometry: ConvGeometry, output_size: Pair
                ) -> list[str]:
    """The formulations :func:`dynconv.autotune` times: ``'restricted'`` and, unless its
    R-fold output would pass :data:`~dynconv.functional.tuning.MAX_CANDIDATE_BYTES`, the dense
    one with each per-sample method (``'dense/grouped'``, ...)."""
    n, num_regions, c_out = weight.shape[:3]
    names = ["restricted"]
    r_fold = n * num_regions * c_out * output_size[0] * output_size[1] * x.element_size()
    if r_fold <= tuning.MAX_CANDIDATE_BYTES:
        names += ["dense/" + m for m in per_sample_candidates(x, num_regions * c_out, geometry,
                                                              output_size)]
    return names


def _all_region_outputs(
    x: Tensor, weight: Tensor, bias: Tensor | None, geometry: ConvGeometry, output_size: Pair,
    per_sample_method: str = "auto",
) -> Tensor:
    """Every region's output at every pixel, by one :func:`per_sample_conv2d` (by
    ``per_sample_method``).

    Returns [N, groups, R, C_out/groups, H_out, W_out]: the R x C_out per-sample kernels are
    stacked group by group, so that each group's output channels stay together.
    """
    n, num_regions, c_out = weight.shape[:3]
    g = geometry.groups
    kernel = weight.reshape(n, num_regions, g, c_out // g, *weight.shape[3:])
    kernel = kernel.transpose(1, 2).reshape(n, num_regions * c_out, *weight.shape[3:])
    b = None
    if bias is not None:
        b = bias.reshape(n, num_regions, g, c_out // g).transpose(1, 2)
        b = b.reshape(n, num_regions * c_out)
    y = per_sample_conv2d_unchecked(x, kernel, b, geometry, output_size,
                                    method=per_sample_method)
    return y.reshape(n, g, num_regions, c_out // g, y.shape[-2], y.shape[-1])


def _straight_through_grad(guide: Tensor, scores: Tensor) -> Tensor:
    """``s * (scores - sum_r s * scores)`` with ``s = softmax(guide)`` over dim 1, in >= float32."""
    dtype = torch.promote_types(guide.dtype, torch.float32)
    s = guide.to(dtype).softmax(1)
    scores = scores.to(dtype)
    return (s * (scores - (s * scores).sum(1, keepdim=True))).to(guide.dtype)


class _PickRegion(torch.autograd.Function):
    """Keep region ``regions = guide.argmax(1)`` of every region's output (the seeds'
    assignment).

    y [N, g, R, C_out/g, H, W], guide [N, R, H, W], regions [N, H, W] -> [N, C_out, H, W].
    Backward: ``y`` gets the output gradient at its chosen region, the guide the straight-through
    softmax gradient.
    """

    @staticmethod
    def forward(ctx, y: Tensor, guide: Tensor, regions: Tensor) -> Tensor:
        n, g, _, c_g, h, w = y.shape
        index = regions.reshape(n, 1, 1, 1, h, w).expand(n, g, 1, c_g, h, w)
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
        return grad_y, grad_guide, None


class _RegionPlan:
    """Where each sample's pixels go: regions, pixels sorted by region, and receptive fields.

    ``order`` [N, P] lists a sample's output pixels sorted by region (stable), ``counts`` [N][R]
    how many pixels each region holds, and ``fields`` [N, P * kH * kW] the flat index, in the
    padded input plane, of every tap of every pixel's receptive field in that order.
    """

    def __init__(
        self, regions: Tensor, num_regions: int, padded_width: int, geometry: ConvGeometry
    ) -> None:
        n, h_out, w_out = regions.shape
        device = regions.device
        region = regions.reshape(n, h_out * w_out)
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
        self.fields = (corner[:, :, None] + taps[None, None, :]).flatten(1)

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
    bias [N, R, C_out] or None, regions ``guide.argmax(1)`` [N, H_out, W_out]
    -> [N, C_out, H_out, W_out].

    Works on pixel rows: the padded input as [g, Hp * Wp, C_in/g], a sample's receptive fields
    gathered in region order as [g, P, kH * kW * C_in/g], one matrix product per region. Saves
    only the inputs: the receptive fields are gathered again in backward.
    """

    @staticmethod
    def forward(ctx, x, weight, guide, bias, regions, geometry: ConvGeometry) -> Tensor:
        xp = F.pad(x, geometry.pads) if any(geometry.pads) else x
        plan = _RegionPlan(regions, guide.shape[1], xp.shape[-1], geometry)
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
        return out if is_channels_last(x) else out.contiguous()

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
        grad_sorted = grad_rows.new_empty(grad_rows.shape[1:])  # buffers reused sample to sample
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
        return grad_x, grad_w, grad_guide, grad_b, None, None


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
    unpadded = geometry.without_padding()
    scores = []
    for i in range(n):
        b = None if bias is None else bias[i : i + 1]
        y = _all_region_outputs(xp[i : i + 1], weight[i : i + 1], b, unpadded,
                                grad_out.shape[-2:])
        grad = grad_out[i].reshape(1, g, 1, c_out // g, y.shape[-2], y.shape[-1])
        scores.append((y * grad).sum((1, 3)))
    if not scores:  # an empty batch
        return grad_out.new_zeros(0, weight.shape[1], *grad_out.shape[-2:])
    return torch.cat(scores)


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
