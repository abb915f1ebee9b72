"""``ODConv2d``: omni-dimensional dynamic convolution (Li, Zhou and Yao, ICLR 2022), with the
parameter layout of the official code."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .._conv_args import PaddingArg, check_int, check_positive_float
from ..functional.mixture import check_mixture_method, mixture_conv2d_unchecked
from .attention import (
    ATTENTION_NORMS,
    AttentionNorm,
    HeadInit,
    ODAttentionWeights,
    ODConvAttention,
)
from .base import KernelBankConv, LayerMacs, pooled_conv_macs, shared_notes


@shared_notes
class ODConv2d(KernelBankConv):
    """Omni-dimensional dynamic convolution.

    Four attentions computed from the input scale the kernel bank along all its dimensions. For
    sample n, with channel attention ``a_c`` [C_in], filter attention ``a_f`` [C_out], spatial
    attention ``a_s`` [kH, kW] and kernel attention ``a_w`` [K]::

        W_n = a_f (x) a_c (x) a_s (x) sum_k a_w[k] W_k        (outer products, per dimension)
        y_n = conv(x_n, W_n) + sum_k a_w[k] b_k

    computed as ``a_f * conv(a_c * x_n, a_s * sum_k a_w[k] W_k)``: the channel and filter
    attentions act on the activations (with gradients, on the per-sample kernels where those
    are the smaller, so that no weighted activation is kept for backward), the kernel attention
    is reduced first (one matrix product) and the spatial attention scales the K-reduced
    kernel, all in :func:`dynconv.functional.mixture_conv2d`. A 1x1 layer with K = 1 is a
    plain convolution between the two activation scalings.

    {conv_args}

    Args:
        bias: a bank of K biases mixed by the kernel attention and added after the filter
            attention (a plain bias for K = 1). The official code has none: default False.
        num_kernels: K, the number of kernels (the official models call it ``kernel_num``).
        reduction, min_channels: the attention's hidden width is
            ``max(int(in_channels * reduction), min_channels)``, as in the official code.
        temperature: divides every attention logit; the official recipe anneals it from 30 to 1
            over the first 10 epochs (see :func:`dynconv.set_temperature`). Saved in the
            state_dict.
        attention_norm: ``'batch'`` (official: BatchNorm, which fails on a batch of 1 in
            training, reported as a ``ValueError``), ``'layer'`` (GroupNorm with one group: any
            batch size, identical in training and evaluation) or ``'none'`` (no norm; the
            attention's first conv gets a bias).
        head_init: ``'zero'`` (default) starts the four attention heads at zero, so that every
            attention starts at its centre (sigmoid 0.5, softmax 1/K) and the layer at a static
            convolution; ``'official'`` draws their weights as the official code (Kaiming
            normal), a random per-sample attention from the start. See
            :meth:`ODConvAttention.reset_parameters` for why.

    Parameters (state_dict layout of the official code): ``weight`` [K, C_out, C_in/groups, kH,
    kW] (stored 4-D, see :class:`KernelBankConv`), ``attention.fc.weight`` [A, C_in, 1, 1],
    ``attention.bn.*`` [A], ``attention.channel_fc.*`` (C_in outputs), ``attention.filter_fc.*``
    (C_out; absent when depthwise, C_in == groups == C_out), ``attention.spatial_fc.*`` (kH*kW;
    absent for a 1x1 kernel), ``attention.kernel_fc.*`` (K; absent for K = 1), and the buffer
    ``temperature`` (optional on load). ``bias`` [K, C_out] only with ``bias=True``.

    {shapes}
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: PaddingArg = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = False,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        num_kernels: int = 4,
        reduction: float = 0.0625,
        min_channels: int = 16,
        temperature: float = 1.0,
        attention_norm: AttentionNorm = "batch",
        head_init: HeadInit = "zero",
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
            num_kernels=num_kernels, bias=bias, padding_mode=padding_mode, temperature=temperature,
            device=device, dtype=dtype,
        )
        self.reduction = check_positive_float(reduction, "reduction")
        self.min_channels = check_int(min_channels, "min_channels")
        if attention_norm not in ATTENTION_NORMS:
            raise ValueError(
                f"attention_norm must be one of {ATTENTION_NORMS}, got {attention_norm!r}"
            )
        hidden = max(int(self.in_channels * self.reduction), self.min_channels)
        if attention_norm == "layer" and hidden < 2:
            raise ValueError(
                f"attention_norm='layer' normalises over the attention's {hidden} hidden "
                "channel(s) and needs at least 2: raise min_channels or reduction"
            )
        self.attention_norm = attention_norm
        self.attention = ODConvAttention(
            self.in_channels, self.out_channels, self.kernel_size, self.groups, num_kernels,
            hidden, attention_norm, **self._factory_kwargs,
            name=f"ODConv2d({self.in_channels}, {self.out_channels}, "
                 f"kernel_size={self.kernel_size})",
            head_init=head_init,
        )
        self.reset_parameters()

    @property
    def is_pointwise_static(self) -> bool:
        """True for a 1x1 kernel with K = 1: a plain convolution between the attentions."""
        return self.kernel_size == (1, 1) and self.num_kernels == 1

    def reset_parameters(self) -> None:
        """Each kernel Kaiming-normal (fan_out, ReLU) and zero biases, as in the official code;
        the attention by :meth:`ODConvAttention.reset_parameters` (heads at zero unless
        ``head_init='official'``)."""
        fan_out = self.out_channels * self.kernel_size[0] * self.kernel_size[1]
        with torch.no_grad():
            self.weight.normal_(0.0, math.sqrt(2.0 / fan_out))
            if self.bias is not None:
                self.bias.zero_()
        self.attention.reset_parameters()

    def attentions(self, x: Tensor) -> ODAttentionWeights:
        """The four attentions for input [N, C_in, H, W] (see :class:`ODAttentionWeights`)."""
        return self.attention(x, self.temperature)

    def attention_record(self, x: Tensor) -> dict[str, Tensor]:
        """The attentions the layer has: ``'channel'`` [N, C_in], ``'filter'`` [N, C_out],
        ``'spatial'`` [N, kH, kW], ``'kernel'`` [N, K] (see :class:`ODAttentionWeights`)."""
        x, _ = self._check_input(x)
        return {k: v for k, v in self.attentions(x)._asdict().items() if v is not None}

    def forward(self, x: Tensor) -> Tensor:
        x, unbatched, output_size = self._check_input_size(x)
        att = self.attentions(x)
        n, dtype = x.shape[0], x.dtype
        if not self.is_pointwise_static:
            # The mixture applies all four attentions: where it assembles per-sample kernels
            # with gradients, the channel and filter attentions weight the kernels, so that no
            # activation-sized product of them is kept for backward.
            coefficients = (
                self.weight.new_ones(n, 1) if att.kernel is None
                else att.kernel.to(self.weight.dtype)
            )
            spatial = None if att.spatial is None else att.spatial.to(self.weight.dtype)
            check_mixture_method(self.method)
            xp, geometry = self._pad(x)
            out = mixture_conv2d_unchecked(
                xp, coefficients, self.kernels, self.bias, geometry, output_size,
                spatial=spatial, channel=att.channel, filter=att.filter, method=self.method)
            return out.squeeze(0) if unbatched else out
        xp, geometry = self._pad(x * att.channel.to(dtype).reshape(n, self.in_channels, 1, 1))
        out = F.conv2d(xp, self.weight, None, **self._conv_kwargs(geometry))
        if att.filter is not None:
            out = out * att.filter.to(out.dtype).reshape(n, self.out_channels, 1, 1)
        if self.bias is not None:  # the convolution's dtype (autocast's), as nn.Conv2d
            out = out + self.bias[0].reshape(1, self.out_channels, 1, 1).to(out.dtype)
        return out.squeeze(0) if unbatched else out

    official_layouts: ClassVar[dict[str, str]] = {
        "odconv": "OSVAI/ODConv modules/odconv.py (ICLR 2022)",
    }

    def official_layout(self) -> str:
        """``'odconv'``; a ``ValueError`` if the official code cannot build the layer (an
        attention norm other than BatchNorm, a bias, a non-square kernel, a padding mode)."""
        problems = self._official_geometry_problems()
        if self.attention_norm != "batch":
            problems.append(f"attention_norm={self.attention_norm!r} (the official code has "
                            "'batch')")
        if self.bias is not None:
            problems.append("a bias (the official code has none)")
        self._refuse_layout("odconv", problems)
        return "odconv"

    @torch.no_grad()
    def init_from_conv(self, conv: torch.nn.Conv2d) -> None:
        """Copy a static kernel (and bias) into every kernel of the bank.

        The kernel attention sums to one, so the layer computes ``conv``'s output modulated by the
        sigmoid attentions (channel, filter, spatial), which sit at 0.5 while the heads are at
        zero (a fresh layer; near 0.5 with ``head_init='official'``): the kernels are scaled by
        the inverse of that product (8 with all three heads), so that the layer matches ``conv``
        when the attentions sit at their centre: a fresh layer computes exactly ``conv``'s
        output, in training and evaluation. The bias is copied unscaled (it is added after the
        attentions).
        """
        att = self.attention  # the sigmoid heads the official layout gives this layer
        heads = sum(fc is not None for fc in (att.channel_fc, att.filter_fc, att.spatial_fc))
        self._fill_bank(conv, 2.0**heads, 1.0)

    @torch.no_grad()
    def fold_output_affine(self, scale: Tensor, shift: Tensor) -> None:
        """Fold ``scale * y + shift`` ([C_out] each) into the layer, exactly: the filter
        attention is a per-channel factor, so ``scale`` goes into every kernel's output channel,
        and the kernel attention sums to one, so ``shift`` goes into every bias of the bank."""
        self._fold_affine_into_bank(scale, shift)

    def effective_kernels(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Per sample ``a_f (x) a_c (x) a_s (x) sum_k a_w[k] W_k`` [N, C_out, C_in/groups, kH, kW]
        and ``sum_k a_w[k] b_k`` [N, C_out] (None without a bias; the bias is added after the
        filter attention, so it is not scaled) for input ``x`` [N, C_in, H, W]."""
        n, g = x.shape[0], self.groups
        att = self.attentions(x)
        weight, bias = self._first_kernel(n) if att.kernel is None else self.mixed(att.kernel)
        dtype = weight.dtype
        if att.spatial is not None:
            weight = weight * att.spatial.to(dtype).reshape(n, 1, 1, *self.kernel_size)
        # channel attention: input channel j of output o's group is global channel g_o * C_in/g + j
        c_out, c_in_g = self.out_channels, self.in_channels // g
        channel = att.channel.to(dtype).reshape(n, g, 1, c_in_g, 1, 1)
        weight = weight.reshape(n, g, c_out // g, c_in_g, *self.kernel_size) * channel
        weight = weight.reshape(n, c_out, c_in_g, *self.kernel_size)
        if att.filter is not None:
            weight = weight * att.filter.to(dtype).reshape(n, c_out, 1, 1, 1)
        return weight, bias

    def macs(self, input_size: tuple[int, int]) -> LayerMacs:
        """The convolution, the attention's 1x1 convolutions on the pooled input and the mixing
        of the bank; a 1x1 layer with K = 1 mixes nothing, and with K = 1 the one bias is added
        as it is."""
        conv = self._conv_macs(input_size)
        attention = pooled_conv_macs(self.attention)
        if self.is_pointwise_static:  # the bank is the kernel
            return LayerMacs(conv, attention)
        mixing = self._bank_macs(self.bias is not None and self.num_kernels > 1)
        return LayerMacs(conv, attention, mixing)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        s += f", reduction={self.reduction:g}, min_channels={self.min_channels}"
        if self.attention_norm != "batch":
            s += f", attention_norm={self.attention_norm!r}"
        if self.attention.head_init != "zero":
            s += f", head_init={self.attention.head_init!r}"
        return s
