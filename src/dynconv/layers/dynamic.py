"""``DynamicConv2d``: dynamic convolution (DY-Conv) and conditionally parameterised convolution
(CondConv), K kernels mixed per sample by attention."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .._conv_args import PaddingArg, check_bool, check_int, check_positive_float
from ..functional.mixture import check_mixture_method, mixture_conv2d_unchecked
from .attention import ROUTINGS, KernelAttention, Routing, routing_weights
from .base import KernelBankConv, LayerMacs, pooled_conv_macs, shared_notes


@shared_notes
class DynamicConv2d(KernelBankConv):
    """Dynamic convolution: ``y_n = (sum_k a_nk W_k) * x_n + sum_k a_nk b_k``.

    The attention ``a`` [N, K] comes from the input: global average pool, 1x1 conv to
    ``hidden_channels``, ReLU, 1x1 conv to K logits, then ``softmax(logits / temperature)``
    (DY-Conv, Chen et al., CVPR 2020) or, with ``routing='sigmoid'``, an independent gate
    ``sigmoid(logits / temperature)`` per kernel (CondConv, Yang et al., NeurIPS 2019).

    {conv_args}

    Args:
        num_kernels: K, the number of kernels. With K = 1 and softmax routing the layer is exactly
            a static convolution (the attention is not computed).
        reduction: hidden width of the attention as a fraction of ``in_channels``.
        temperature: divides the attention logits; anneal it from high to 1 while training (see
            :func:`dynconv.set_temperature`). Saved in the state_dict.
        routing: ``'softmax'`` (DY-Conv) or ``'sigmoid'`` (CondConv).
        hidden_channels: overrides the hidden width. The default follows the reference DY-Conv
            code, ``int(in_channels * reduction)`` (K when ``in_channels == 3``), except that it
            is never below 1 where the reference would build an empty layer. For the 2022
            layout of the public repository use ``int(in_channels * reduction) + 1`` (still K
            when ``in_channels == 3``) and ``attention_bias=True``, or load with
            :func:`dynconv.tools.official.load_official`, which takes both from the checkpoint.
        attention_bias: whether the second attention conv (``attention.fc2``) has a bias.

    Parameters (state_dict layout of the reference code):
        ``weight`` [K, C_out, C_in/groups, kH, kW] (stored 4-D, see :class:`KernelBankConv`),
        ``bias`` [K, C_out], ``attention.fc1.weight`` [hidden, C_in, 1, 1],
        ``attention.fc2.weight`` [K, hidden, 1, 1], and the buffer ``temperature``.

    {shapes}

    Differences from the reference code, on purpose: the temperature defaults to 1 and any value
    > 0 is allowed (no ``temperature % 3 == 1`` assertion); the hidden width is at least 1; the
    per-sample kernels are reshaped with C_in/groups channels (the reference used C_in, which
    breaks grouped and depthwise layers).
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
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        num_kernels: int = 4,
        reduction: float = 0.25,
        temperature: float = 1.0,
        routing: Routing = "softmax",
        hidden_channels: int | None = None,
        attention_bias: bool = False,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
            num_kernels=num_kernels, bias=bias, padding_mode=padding_mode, temperature=temperature,
            device=device, dtype=dtype,
        )
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        self.reduction = check_positive_float(reduction, "reduction")
        if hidden_channels is None:
            hidden_channels = (
                num_kernels if in_channels == 3 else max(1, int(in_channels * self.reduction))
            )
        check_int(hidden_channels, "hidden_channels")
        check_bool(attention_bias, "attention_bias")
        self.routing = routing
        self.attention = KernelAttention(
            in_channels, hidden_channels, num_kernels, attention_bias, **self._factory_kwargs
        )
        self.reset_parameters()

    @property
    def is_static(self) -> bool:
        """True when the layer is exactly a static convolution (one kernel, softmax routing)."""
        return self.num_kernels == 1 and self.routing == "softmax"

    def reset_parameters(self) -> None:
        self.reset_bank()
        self.attention.reset_parameters()

    def kernel_attention(self, x: Tensor) -> Tensor:
        """The mixing coefficients [N, K] for input [N, C_in, H, W]."""
        return routing_weights(self.attention(x), self.temperature, self.routing)

    def attention_record(self, x: Tensor) -> dict[str, Tensor]:
        """``{'kernel': [N, K]}``, the mixing coefficients."""
        x, _ = self._check_input(x)
        return {"kernel": self.kernel_attention(x)}

    def forward(self, x: Tensor) -> Tensor:
        x, unbatched, output_size = self._check_input_size(x)
        xp, geometry = self._pad(x)
        if self.is_static:
            bias = None if self.bias is None else self.bias[0]
            out = F.conv2d(xp, self.weight, bias, **self._conv_kwargs(geometry))
        else:
            coefficients = self.kernel_attention(x).to(self.weight.dtype)
            check_mixture_method(self.method)
            out = mixture_conv2d_unchecked(
                xp, coefficients, self.kernels, self.bias, geometry, output_size,
                method=self.method,
            )
        return out.squeeze(0) if unbatched else out

    @torch.no_grad()
    def init_from_conv(self, conv: torch.nn.Conv2d) -> None:
        """Copy a static kernel (and bias) into every kernel of the bank.

        With softmax routing the weights sum to one, so the layer then computes exactly what
        ``conv`` computes, whatever the attention. With sigmoid routing the kernels are scaled by
        2 / K, so that the output equals ``conv``'s times ``mean_k(gate_k) / 0.5``, which is 1
        when the gates sit at their initial centre.
        """
        factor = 1.0 if self.routing == "softmax" else 2.0 / self.num_kernels
        self._fill_bank(conv, factor, factor)

    @torch.no_grad()
    def fold_output_affine(self, scale: Tensor, shift: Tensor) -> None:
        """Fold ``scale * y + shift`` into the bank; exact with softmax routing only (the
        weights sum to one, so a shift added to every bias adds once)."""
        if self.routing != "softmax":
            raise NotImplementedError("a shift cannot be folded into sigmoid-routed kernels")
        self._fold_affine_into_bank(scale, shift)

    def effective_kernels(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Per sample ``sum_k a_nk W_k`` [N, C_out, C_in/groups, kH, kW] and ``sum_k a_nk b_k``
        [N, C_out] (None without a bias) for input ``x`` [N, C_in, H, W]."""
        if self.is_static:
            return self._first_kernel(x.shape[0])
        return self.mixed(self.kernel_attention(x))

    def macs(self, input_size: tuple[int, int]) -> LayerMacs:
        """The convolution, the attention's two 1x1 convolutions on the pooled input and the
        mixing of the bank (and bias bank); a static layer (K = 1, softmax) is a convolution."""
        conv = self._conv_macs(input_size)
        if self.is_static:  # no attention is computed, nothing is mixed
            return LayerMacs(conv)
        mixing = self._bank_macs(self.bias is not None)
        return LayerMacs(conv, pooled_conv_macs(self.attention), mixing)

    # -- the reference layouts ---------------------------------------------------------------

    official_layouts: ClassVar[dict[str, str]] = {
        "dyconv-2020": "kaijieshi7/Dynamic-convolution-Pytorch before 2022 (seed 001): "
        "hidden = int(C_in * ratio), attention.fc2 without bias",
        "dyconv-2022": "the same repository from 2022: hidden = int(C_in * ratio) + 1, "
        "attention.fc2 with bias",
    }

    def official_layout(self) -> str:
        """``'dyconv-2022'`` if ``attention.fc2`` has a bias, else ``'dyconv-2020'``; a
        ``ValueError`` if the reference code cannot build the layer (sigmoid routing, a
        non-square kernel, a padding mode, or a 3-channel input with a hidden width other than
        K, which both versions use there)."""
        layout = "dyconv-2020" if self.attention.fc2.bias is None else "dyconv-2022"
        problems = self._official_geometry_problems()
        if self.routing != "softmax":
            problems.append(f"routing={self.routing!r} (the reference code has softmax only)")
        hidden = self.attention.fc1.out_channels
        if self.in_channels == 3 and hidden != self.num_kernels:
            problems.append(
                f"{hidden} hidden attention channels on a 3-channel input, where the reference "
                f"code builds K = {self.num_kernels}"
            )
        self._refuse_layout(layout, problems)
        return layout

    def fit_to_state_dict(self, state_dict: Mapping[str, Any], prefix: str = "") -> str | None:
        """Rebuild the attention with the hidden width of ``attention.fc1.weight`` in
        ``state_dict`` and a bias on ``attention.fc2`` if it has one (both DY-Conv layouts, any
        ``ratio``); say what changed. The new attention is freshly initialised (the load
        fills it) on the bank's device and dtype."""
        fc1 = state_dict.get(prefix + "attention.fc1.weight")
        if not isinstance(fc1, Tensor) or fc1.dim() != 4 or fc1.shape[1] != self.in_channels:
            return None  # absent or of another layer: load_state_dict reports it
        hidden, bias = fc1.shape[0], prefix + "attention.fc2.bias" in state_dict
        old_hidden, old_bias = self.attention.fc1.out_channels, self.attention.fc2.bias is not None
        if (hidden, bias) == (old_hidden, old_bias):
            return None
        self.attention = KernelAttention(
            self.in_channels, hidden, self.num_kernels, bias,
            device=self.weight.device, dtype=self.weight.dtype,
        ).train(self.training)
        changes = []
        if hidden != old_hidden:
            changes.append(f"hidden channels {old_hidden} -> {hidden}")
        if bias != old_bias:
            changes.append("attention.fc2 bias " + ("added" if bias else "removed"))
        return "attention rebuilt as in the checkpoint: " + ", ".join(changes)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.routing != "softmax":
            s += f", routing={self.routing!r}"
        return s
