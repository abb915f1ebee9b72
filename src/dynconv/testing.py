"""Plain reference implementations, written for clarity rather than speed.

The tests check every fast path of the package against these: one
``F.conv2d`` per sample, with that sample's own kernel, and the attention recomputed from the
layer's parameters without calling the layer's own modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._conv_args import PaddingArg, parse_geometry
from .layers.drconv import DRConv2d
from .layers.dynamic import DynamicConv2d
from .layers.odconv import ODConv2d


def reference_per_sample_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding: PaddingArg = 0,
    dilation=1,
    groups: int = 1,
    padding_mode: str = "zeros",
) -> Tensor:
    """One ``F.conv2d`` per sample: x [N, C_in, H, W], weight [N, C_out, C_in/g, kH, kW]; for an
    empty batch, ``F.conv2d``'s empty output."""
    geometry = parse_geometry(tuple(weight.shape[-2:]), stride, padding, dilation, groups)
    mode = "constant" if padding_mode == "zeros" else padding_mode
    if x.shape[0] == 0:
        xp = F.pad(x, geometry.pads, mode=mode)
        return F.conv2d(xp, weight.new_zeros(weight.shape[1:]), None, geometry.stride, 0,
                        geometry.dilation, groups)
    outs = []
    for n in range(x.shape[0]):
        xn = F.pad(x[n : n + 1], geometry.pads, mode=mode)
        b = None if bias is None else bias[n]
        outs.append(F.conv2d(xn, weight[n], b, geometry.stride, 0, geometry.dilation, groups))
    return torch.cat(outs)


def reference_dynamic_attention(layer: DynamicConv2d, x: Tensor) -> Tensor:
    """The attention [N, K] of a :class:`DynamicConv2d`, from its parameters."""
    pooled = x.mean(dim=(2, 3))
    hidden = torch.relu(pooled @ layer.attention.fc1.weight.flatten(1).t())
    logits = hidden @ layer.attention.fc2.weight.flatten(1).t()
    if layer.attention.fc2.bias is not None:
        logits = logits + layer.attention.fc2.bias
    logits = logits / layer.temperature.to(logits.dtype)
    return logits.softmax(-1) if layer.routing == "softmax" else logits.sigmoid()


def reference_dynamic_conv2d(layer: DynamicConv2d, x: Tensor) -> Tensor:
    """What a :class:`DynamicConv2d` computes, one sample at a time."""
    attention = reference_dynamic_attention(layer, x)
    bank = layer.kernels
    weight = torch.einsum("nk,koihw->noihw", attention, bank)
    bias = None if layer.bias is None else attention @ layer.bias
    return reference_per_sample_conv2d(
        x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups,
        layer.padding_mode,
    )


def _apply_1x1(h: Tensor, conv: torch.nn.Conv2d) -> Tensor:
    """A 1x1 convolution applied to pooled features h [N, C] as a matrix product."""
    out = h @ conv.weight.flatten(1).t()
    return out if conv.bias is None else out + conv.bias


def reference_odconv_attention(
    layer: ODConv2d, x: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The attentions of an :class:`ODConv2d`, from its parameters: channel [N, C_in], filter
    [N, C_out], spatial [N, kH, kW] and kernel [N, K], with ones where the official layout has
    no head (depthwise: filter; 1x1 kernel: spatial; K = 1: kernel).

    The BatchNorm uses the batch statistics in training mode and the running ones otherwise.
    """
    att = layer.attention
    n = x.shape[0]
    h = _apply_1x1(x.mean(dim=(2, 3)), att.fc)
    if layer.attention_norm == "batch":
        bn = att.bn
        if bn.training:
            mean, var = h.mean(0), h.var(0, unbiased=False)
        else:
            mean, var = bn.running_mean, bn.running_var
        h = (h - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
    elif layer.attention_norm == "layer":
        gn = att.norm
        mean, var = h.mean(1, keepdim=True), h.var(1, unbiased=False, keepdim=True)
        h = (h - mean) / torch.sqrt(var + gn.eps) * gn.weight + gn.bias
    h = torch.relu(h)
    t = layer.temperature.to(h.dtype)
    depthwise = layer.in_channels == layer.groups == layer.out_channels
    kh, kw = layer.kernel_size
    ones = h.new_ones
    channel = torch.sigmoid(_apply_1x1(h, att.channel_fc) / t)
    filter_ = ones(n, layer.out_channels) if depthwise else torch.sigmoid(
        _apply_1x1(h, att.filter_fc) / t)
    spatial = ones(n, kh * kw) if kh * kw == 1 else torch.sigmoid(
        _apply_1x1(h, att.spatial_fc) / t)
    kernel = ones(n, 1) if layer.num_kernels == 1 else torch.softmax(
        _apply_1x1(h, att.kernel_fc) / t, dim=-1)
    return channel, filter_, spatial.reshape(n, kh, kw), kernel


def reference_odconv2d(layer: ODConv2d, x: Tensor) -> Tensor:
    """What an :class:`ODConv2d` computes, one sample at a time, from the definition: every
    attention folded into sample n's kernel, ``W_n[o, i, p] = a_f[o] a_c[i] a_s[p] sum_k a_w[k]
    W_k[o, i, p]`` (i the input channel of o's group), then one convolution per sample."""
    channel, filter_, spatial, kernel = reference_odconv_attention(layer, x)
    n, g = x.shape[0], layer.groups
    c_out, c_in_g = layer.out_channels, layer.in_channels // g
    mixed = torch.einsum("nk,koihw->noihw", kernel, layer.kernels)
    # channel attention as seen by each output channel's kernel: [N, C_out, C_in/g]
    per_kernel = channel.reshape(n, g, 1, c_in_g).expand(n, g, c_out // g, c_in_g)
    weight = (
        mixed
        * filter_.reshape(n, c_out, 1, 1, 1)
        * per_kernel.reshape(n, c_out, c_in_g, 1, 1)
        * spatial.reshape(n, 1, 1, *layer.kernel_size)
    )
    bias = None if layer.bias is None else kernel @ layer.bias
    return reference_per_sample_conv2d(
        x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups,
        layer.padding_mode,
    )


# -- DRConv --------------------------------------------------------------------------------------


def reference_region_conv2d(
    x: Tensor,
    weight: Tensor,
    guide: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding: PaddingArg = 0,
    dilation=1,
    groups: int = 1,
    padding_mode: str = "zeros",
) -> Tensor:
    """One ``F.conv2d`` per sample and output pixel: its receptive field with its region's kernel.

    x [N, C_in, H, W], weight [N, R, C_out, C_in/g, kH, kW], guide [N, R, H_out, W_out] (region =
    argmax over R), bias [N, R, C_out] -> [N, C_out, H_out, W_out].

    The guide's straight-through softmax gradient comes from adding
    ``sum_r (s_r - s_r.detach()) * y_r.detach()`` (``s = softmax(guide)``, ``y_r`` region r's
    output at every pixel, one ``F.conv2d`` per sample): exactly zero forward, and autograd's
    softmax gives the gradient.
    """
    kh, kw = weight.shape[-2:]
    geometry = parse_geometry((kh, kw), stride, padding, dilation, groups)
    (sh, sw), (dh, dw) = geometry.stride, geometry.dilation
    mode = "constant" if padding_mode == "zeros" else padding_mode
    region_map = guide.argmax(1)
    h_out, w_out = region_map.shape[-2:]
    samples = []
    for n in range(x.shape[0]):
        xn = F.pad(x[n : n + 1], geometry.pads, mode=mode)
        pixels = []
        for i in range(h_out):
            for j in range(w_out):
                r = int(region_map[n, i, j])
                top, left = i * sh, j * sw
                field = xn[..., top : top + dh * (kh - 1) + 1, left : left + dw * (kw - 1) + 1]
                b = None if bias is None else bias[n, r]
                pixels.append(F.conv2d(field, weight[n, r], b, 1, 0, (dh, dw), groups).flatten())
        samples.append(torch.stack(pixels, 1).reshape(-1, h_out, w_out))
    everywhere = torch.stack(
        [
            reference_per_sample_conv2d(
                x, weight[:, r], None if bias is None else bias[:, r], stride, padding, dilation,
                groups, padding_mode,
            )
            for r in range(weight.shape[1])
        ],
        1,
    )
    out = torch.stack(samples) if samples else everywhere[:, 0]  # (an empty batch: empty)
    s = guide.softmax(1).unsqueeze(2)
    return out + ((s - s.detach()) * everywhere.detach()).sum(1)


def reference_drconv_kernels(layer: DRConv2d, x: Tensor) -> Tensor:
    """The R kernels per sample [N, R, C_out, C_in/g, kH, kW] of a :class:`DRConv2d`, from its
    parameters: pool to kH x kW, 1x1 conv to R*R, sigmoid, 1x1 conv with R groups."""
    num_regions, (kh, kw) = layer.num_regions, layer.kernel_size
    first, last = layer.conv_kernel[1], layer.conv_kernel[3]
    pooled = F.adaptive_avg_pool2d(x, (kh, kw))
    hidden = torch.einsum("ci,nihw->nchw", first.weight.flatten(1), pooled)
    hidden = torch.sigmoid(hidden + first.bias.reshape(1, -1, 1, 1))
    hidden = hidden.reshape(x.shape[0], num_regions, num_regions, kh, kw)
    w = last.weight.reshape(num_regions, -1, num_regions)
    kernels = torch.einsum("rkj,nrjhw->nrkhw", w, hidden)
    kernels = kernels + last.bias.reshape(1, num_regions, -1, 1, 1)
    return kernels.reshape(
        x.shape[0], num_regions, layer.out_channels, layer.in_channels // layer.groups, kh, kw
    )


def reference_drconv_guide(layer: DRConv2d, x: Tensor) -> Tensor:
    """The guide logits divided by the temperature [N, R, H_out, W_out] of a :class:`DRConv2d`."""
    geometry = parse_geometry(layer.kernel_size, layer.stride, layer.padding, layer.dilation)
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    xp = F.pad(x, geometry.pads, mode=mode)
    guide = F.conv2d(xp, layer.conv_guide.weight, layer.conv_guide.bias, layer.stride, 0,
                     layer.dilation)
    return guide / layer.temperature.to(guide.dtype)


def reference_drconv2d(layer: DRConv2d, x: Tensor) -> Tensor:
    """What a :class:`DRConv2d` computes, one pixel at a time, with the guide's gradient."""
    kernels = reference_drconv_kernels(layer, x)
    guide = reference_drconv_guide(layer, x)
    conv = (layer.stride, layer.padding, layer.dilation, layer.groups, layer.padding_mode)
    out = reference_region_conv2d(x, kernels, guide, None, *conv)
    if layer.bias is not None:
        out = out + layer.bias.reshape(1, -1, 1, 1)
    return out
