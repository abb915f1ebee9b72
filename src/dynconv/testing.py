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
from .layers.dynamic import DynamicConv2d


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
    """One ``F.conv2d`` per sample: x [N, C_in, H, W], weight [N, C_out, C_in/g, kH, kW]."""
    geometry = parse_geometry(tuple(weight.shape[-2:]), stride, padding, dilation, groups)
    mode = "constant" if padding_mode == "zeros" else padding_mode
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
