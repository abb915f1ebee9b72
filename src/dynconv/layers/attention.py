"""Attention branches: how a dynamic layer turns its input into per-sample coefficients."""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from ..functional._common import autocast_dtype, values_are_readable
from .base import init_conv_fan_out_

Routing = Literal["softmax", "sigmoid"]
ROUTINGS = ("softmax", "sigmoid")


def routing_weights(logits: Tensor, temperature: Tensor, routing: Routing = "softmax") -> Tensor:
    """``softmax(logits / T)`` over the last dimension, or an independent ``sigmoid(logits / T)``.

    Computed in at least float32, with autocast off, so that reduced precision never makes the
    attention saturate or overflow; the result keeps that dtype.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    if autocast_dtype(logits.device.type) is not None:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return routing_weights(logits, temperature, routing)
    if logits.dtype != dtype:
        logits = logits.to(dtype)
    z = logits / (temperature if temperature.dtype == dtype else temperature.to(dtype))
    return z.softmax(dim=-1) if routing == "softmax" else z.sigmoid()


class KernelAttention(nn.Module):
    """DY-Conv / CondConv attention: global average pool, 1x1 conv, ReLU, 1x1 conv to K logits.

    Parameter names follow the reference DY-Conv code (``fc1``, ``fc2``) so its checkpoints load.

    Shapes: input [N, C_in, H, W] -> logits [N, K].
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        num_kernels: int,
        bias: bool = False,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # a module: FLOP counters see a size-free cost
        self.fc1 = nn.Conv2d(in_channels, hidden_channels, 1, bias=False, **kw)
        self.fc2 = nn.Conv2d(hidden_channels, num_kernels, 1, bias=bias, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for fc in (self.fc1, self.fc2):
            nn.init.kaiming_normal_(fc.weight, mode="fan_out", nonlinearity="relu")
            if fc.bias is not None:
                nn.init.zeros_(fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(self.avgpool(x)))).flatten(1)


AttentionNorm = Literal["batch", "layer", "none"]
ATTENTION_NORMS = ("batch", "layer", "none")
HeadInit = Literal["zero", "official"]
HEAD_INITS = ("zero", "official")


class ODAttentionWeights(NamedTuple):
    """The four attentions of ODConv for a batch; ``None`` where the layer has no such head."""

    channel: Tensor  # [N, C_in]
    filter: Tensor | None  # [N, C_out]; None for a depthwise layer
    spatial: Tensor | None  # [N, kH, kW]; None for a 1x1 kernel
    kernel: Tensor | None  # [N, K]; None for K = 1


class ODConvAttention(nn.Module):
    """ODConv attention: global average pool, 1x1 conv to ``hidden_channels``, norm, ReLU, then
    four heads (1x1 convs with bias): channel (sigmoid over C_in), filter (sigmoid over C_out),
    spatial (sigmoid over kH*kW) and kernel (softmax over K), each logit divided by the
    temperature.

    Names and shapes follow the official ODConv code (``fc``, ``bn``, ``channel_fc``,
    ``filter_fc``, ``spatial_fc``, ``kernel_fc``), so that its checkpoints load. As there, the
    filter head is absent for a depthwise layer (C_in == groups == C_out), the spatial head for a
    1x1 kernel and the kernel head for K = 1.

    ``norm``: ``'batch'`` (BatchNorm2d ``bn``, the official layout; it needs more than one sample
    per batch in training, and refuses a training batch with a non-finite sample, which would
    make the whole batch and the running statistics NaN), ``'layer'`` (GroupNorm with one group,
    ``norm``: each sample's hidden vector normalised over its channels, so any batch size and
    the same computation in training and evaluation) or ``'none'`` (``fc`` then has a bias).

    ``head_init``: ``'zero'`` (default) starts the four heads at zero, weights and biases, so
    every attention starts at its centre (sigmoid 0.5, softmax 1/K) for every input and the
    heads learn from there; ``'official'`` draws their weights Kaiming-normal (fan_out), as the
    official code, which starts each attention at a random function of the normalised pooled
    features (see :meth:`reset_parameters`).

    ``name`` names the layer in error messages.

    Shapes: input [N, C_in, H, W] -> :class:`ODAttentionWeights`.
    """

    name = "ODConv2d"  # (the defaults of modules pickled before the attributes existed)
    head_init: HeadInit = "official"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        groups: int,
        num_kernels: int,
        hidden_channels: int,
        norm: AttentionNorm = "batch",
        device: Any = None,
        dtype: torch.dtype | None = None,
        name: str = "ODConv2d",
        head_init: HeadInit = "zero",
    ) -> None:
        super().__init__()
        if head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {HEAD_INITS}, got {head_init!r}")
        kw = {"device": device, "dtype": dtype}
        self.kernel_size = kernel_size
        self.norm_kind = norm
        self.name = name
        self.head_init = head_init
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # a module: FLOP counters see a size-free cost
        self.fc = nn.Conv2d(in_channels, hidden_channels, 1, bias=norm == "none", **kw)
        if norm == "batch":
            self.bn = nn.BatchNorm2d(hidden_channels, **kw)
        elif norm == "layer":
            self.norm = nn.GroupNorm(1, hidden_channels, **kw)

        def head(width: int) -> nn.Conv2d:
            return nn.Conv2d(hidden_channels, width, 1, bias=True, **kw)

        self.channel_fc = head(in_channels)
        depthwise = in_channels == groups == out_channels
        self.filter_fc = None if depthwise else head(out_channels)
        taps = kernel_size[0] * kernel_size[1]
        self.spatial_fc = None if taps == 1 else head(taps)
        self.kernel_fc = None if num_kernels == 1 else head(num_kernels)
        self.reset_parameters()

    def heads(self) -> list[nn.Conv2d]:
        """The heads this attention has (channel, filter, spatial, kernel; absent ones left out)."""
        return [h for h in (self.channel_fc, self.filter_fc, self.spatial_fc, self.kernel_fc)
                if h is not None]

    def reset_parameters(self) -> None:
        """``fc`` Kaiming-normal (fan_out), unit norms (and fresh running statistics), zero head
        biases, as in the official code; the heads' weights zero (``head_init='zero'``) or
        Kaiming-normal (``'official'``).

        Why zero (measured in docs/layers.md, ODConv2d): the official heads start every
        attention at a random function of the normalised pooled features, which the temperature
        hides only while it is high; annealed to 1, the BatchNorm version diverged. Zero heads
        start every attention at its centre; it varies per sample only as far as the loss asks."""
        init_conv_fan_out_(self.fc)
        norm = getattr(self, "bn", None) or getattr(self, "norm", None)
        if norm is not None:
            norm.reset_parameters()  # weight 1, bias 0 (and fresh running statistics)
        for head in self.heads():
            init_conv_fan_out_(head)  # zero bias
            if self.head_init == "zero":
                nn.init.zeros_(head.weight)

    def hidden(self, x: Tensor) -> Tensor:
        """The shared hidden features [N, hidden, 1, 1] for input [N, C_in, H, W]."""
        if self.norm_kind == "batch" and self.training and x.shape[0] == 1:
            raise ValueError(
                f"{self.name} got a batch of 1 in training mode, but the BatchNorm of its "
                "attention (attention_norm='batch', the official layout) needs more than one "
                "sample per batch: train with batches of 2 or more, call .eval(), or build the "
                "layer with attention_norm='layer' (or 'none'), which works at any batch size"
            )
        h = self.fc(self.avgpool(x))
        if self.norm_kind == "batch":
            if self.training and values_are_readable(h):
                self._check_finite(h)
            h = self.bn(h)
        elif self.norm_kind == "layer":
            h = self.norm(h)
        return torch.relu(h)

    def _check_finite(self, h: Tensor) -> None:
        """Refuse a training batch whose BatchNorm input h [N, hidden, 1, 1] holds a non-finite
        value: the batch statistics would spread it to every sample and to the running
        statistics, for good. One reduction (a sum, in at least float32: not finite if a value
        is not, or if the values overflow, which would overflow the statistics too) and one
        host sync, in training only."""
        total = h.sum(dtype=torch.promote_types(h.dtype, torch.float32))
        if math.isfinite(total.item()):
            return
        bad = (~torch.isfinite(h.flatten(1)).all(1)).nonzero().flatten().tolist()
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        what = (f"sample(s) {shown} of a batch of {h.shape[0]} reach the BatchNorm of its "
                "attention (attention_norm='batch') with non-finite values (NaN or inf)"
                if bad else
                f"a batch of {h.shape[0]} reaches the BatchNorm of its attention "
                "(attention_norm='batch') with values so large that their sum overflows")
        raise ValueError(
            f"{self.name} in training mode: {what}, which would make the whole batch and the "
            "running statistics NaN; nothing was updated. Find where they come from (the input, "
            "an earlier layer), or build the layer with attention_norm='layer' (or 'none'), "
            "which keeps a bad sample to itself"
        )

    def forward(self, x: Tensor, temperature: Tensor) -> ODAttentionWeights:
        h = self.hidden(x)
        n = x.shape[0]

        def gate(fc: nn.Conv2d | None, routing: Routing = "sigmoid") -> Tensor | None:
            return None if fc is None else routing_weights(fc(h).flatten(1), temperature, routing)

        spatial = gate(self.spatial_fc)
        return ODAttentionWeights(
            channel=gate(self.channel_fc),
            filter=gate(self.filter_fc),
            spatial=None if spatial is None else spatial.reshape(n, *self.kernel_size),
            kernel=gate(self.kernel_fc, "softmax"),
        )
