"""``RoutedConv2d``: a bank of K kernels mixed per sample by routing weights computed outside the
layer, as in timm's CondConv blocks, where one routing serves three convolutions."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .._conv_args import PaddingArg, check_bool
from ..functional.mixture import check_mixture_method, mixture_conv2d_unchecked
from .base import KernelBankConv, LayerMacs, shared_notes


@shared_notes
class RoutedConv2d(KernelBankConv):
    """A kernel bank mixed by routing weights given to ``forward``:
    ``y_n = (sum_k r_nk W_k) * x_n + sum_k r_nk b_k``.

    The layer computes no attention: ``forward(x, routing_weights)`` takes the mixing weights
    [N, K] (any real values), computed elsewhere. timm's ``CondConvResidual`` block computes
    ``sigmoid(routing_fn(avgpool(block_input)))`` once and hands it to its three ``CondConv2d``
    (``conv_pw``, ``conv_dw``, ``conv_pwl``); :class:`DynamicConv2d` cannot stand for them, as
    its attention is its own (a hidden layer, on the layer's input).
    :func:`dynconv.tools.official.convert_timm_condconv` puts this layer in their place.

    {conv_args}

    Args:
        bias: a bank of K biases (timm's default: none).
        num_kernels: K (timm's ``num_experts``).
        dynamic_padding: pad each input as TensorFlow's ``'SAME'`` does, by an amount that
            depends on the input size (timm's ``CondConv2d`` with ``padding='same'`` and a
            stride above 1, in the ``tf_efficientnet_cc_*`` models); ``padding`` must then be 0.

    Parameters: ``weight`` [K, C_out, C_in/groups, kH, kW] (stored 4-D, see
    :class:`KernelBankConv`; timm's flattened [K, C_out * C_in/groups * kH * kW] loads too),
    ``bias`` [K, C_out] with ``bias=True``, and the buffer ``temperature``, always 1: the routing
    comes computed, so there is no temperature to set.

    {shapes} ``routing_weights``: [N, K] (or [K] for an unbatched input).
    """

    official_layouts: ClassVar[dict[str, str]] = {
        "timm-condconv": "timm.layers.CondConv2d: weight [K, C_out * C_in/g * kH * kW]"
    }

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
        dynamic_padding: bool = False,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
            num_kernels=num_kernels, bias=bias, padding_mode=padding_mode, device=device,
            dtype=dtype,
        )
        self.dynamic_padding = check_bool(dynamic_padding, "dynamic_padding")
        if dynamic_padding and (self._geometry.pads != (0, 0, 0, 0) or padding_mode != "zeros"):
            raise ValueError(
                "dynamic_padding=True pads each input itself, with zeros: padding must be 0 "
                f"and padding_mode 'zeros', got padding={padding!r}, padding_mode={padding_mode!r}"
            )
        self.reset_bank()

    def set_temperature(self, value: float) -> None:
        """Only 1 is accepted: the routing weights come computed, so the layer has no
        temperature of its own (a ``ValueError`` for any other value)."""
        if value != 1:
            raise ValueError(
                f"{type(self).__name__} takes its routing weights computed (by the block that "
                f"owns the routing): it has no temperature to set, got {value!r} (only 1)"
            )

    def _same_pads(self, height: int, width: int) -> tuple[int, int, int, int]:
        """TensorFlow's 'SAME' padding (left, right, top, bottom) for an input of that size: the
        output has ceil(size / stride) pixels, the odd pixel of padding on the right/bottom."""
        pads = []
        for size, k, s, d in zip((width, height), reversed(self.kernel_size),
                                 reversed(self.stride), reversed(self.dilation), strict=False):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return tuple(pads)  # type: ignore[return-value]

    def forward(self, x: Tensor, routing_weights: Tensor) -> Tensor:
        if self.dynamic_padding and isinstance(x, Tensor) and x.dim() in (3, 4):
            x = F.pad(x, self._same_pads(x.shape[-2], x.shape[-1]))
        x, unbatched, output_size = self._check_input_size(x)
        n, k = x.shape[0], self.num_kernels
        expected = [k] if unbatched else [n, k]
        if not isinstance(routing_weights, Tensor) or list(routing_weights.shape) != expected:
            got = (list(routing_weights.shape) if isinstance(routing_weights, Tensor)
                   else type(routing_weights).__name__)
            raise ValueError(
                f"{type(self).__name__} expects routing_weights of shape "
                f"{'[K]' if unbatched else '[N, K]'} = {expected}, got {got}"
            )
        xp, geometry = self._pad(x)
        check_mixture_method(self.method)
        out = mixture_conv2d_unchecked(
            xp, routing_weights.reshape(n, k).to(self.weight.dtype), self.kernels, self.bias,
            geometry, output_size, method=self.method,
        )
        return out.squeeze(0) if unbatched else out

    def macs(self, input_size: tuple[int, int]) -> LayerMacs:
        """The convolution and the mixing of the bank (and bias bank); the routing is computed
        outside the layer and counted there."""
        if self.dynamic_padding:
            left, right, top, bottom = self._same_pads(*input_size)
            input_size = (input_size[0] + top + bottom, input_size[1] + left + right)
        return LayerMacs(self._conv_macs(input_size), 0, self._bank_macs(self.bias is not None))

    # -- timm's layout --------------------------------------------------------------------------

    def official_layout(self) -> str:
        """``'timm-condconv'``; a ``ValueError`` for a padding mode other than zeros."""
        problems = [p for p in self._official_geometry_problems() if "padding_mode" in p]
        self._refuse_layout("timm-condconv", problems)
        return "timm-condconv"

    def official_state_dict(self, layout: str | None = None) -> dict[str, Tensor]:
        """timm's ``CondConv2d`` tensors: ``weight`` flattened to [K, C_out * C_in/g * kH * kW],
        row-major over (C_out, C_in/g, kH, kW), and ``bias`` [K, C_out]."""
        state = super().official_state_dict(layout)
        state["weight"] = state["weight"].reshape(self.num_kernels, -1)
        return state

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        key = prefix + "weight"
        value = state_dict.get(key)
        timm_shape = [self.num_kernels, self.weight.numel() // self.num_kernels]
        if isinstance(value, Tensor) and list(value.shape) == timm_shape:
            state_dict[key] = value.reshape(self._reference_weight_shape())  # timm's layout
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.dynamic_padding:
            s += ", dynamic_padding=True"
        return s
