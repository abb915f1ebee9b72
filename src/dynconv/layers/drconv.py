"""``DRConv2d``: dynamic region-aware convolution, R kernels per sample assigned to pixels by a
learned guide."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .._conv_args import ConvGeometry, PaddingArg, check_bool, check_int
from ..functional import RegionMethod, adaptive_avg_pool2d_matmul, assign_regions, is_exporting
from ..functional.region import check_region_method, region_conv2d_unchecked
from .base import DynamicConvBase, LayerMacs, kernel_numel, shared_notes


@shared_notes
class DRConv2d(DynamicConvBase):
    """Dynamic region-aware convolution (DRConv, Chen et al., CVPR 2021).

    A guide convolution (C_in -> R channels, with this layer's kernel size, stride, padding and
    dilation) assigns every output pixel to one of R regions by argmax. A filter generator makes
    R kernels per sample from the input: adaptive average pool to kH x kW, 1x1 conv to R*R
    channels, sigmoid, 1x1 conv with R groups to R * C_out * C_in/groups channels (region r's
    kernel comes from the r-th group). Each output pixel is convolved with its region's kernel.

    In backward, each kernel gets the gradient of its pixels; the guide gets the
    straight-through softmax gradient ``s * (g - sum_r s * g)``, ``s = softmax(guide /
    temperature)`` and ``g[r]`` the output gradient dotted with region r's output (see
    :func:`dynconv.functional.region_conv2d`).

    {conv_args}

    Args:
        bias: a static bias [C_out] shared by all regions. Off by default: the reference layout
            has none, and the layer is meant to be followed by a normalisation.
        num_regions: R, the number of regions (and of kernels per sample).
        temperature: divides the guide logits. The argmax does not change, so it only scales the
            guide's softmax gradient (1 is the reference behaviour). Saved in the state_dict.

    Parameters (state_dict layout of the reference code, seed 003):
        ``conv_kernel.1.{weight [R*R, C_in, 1, 1], bias [R*R]}``,
        ``conv_kernel.3.{weight [R * C_out * C_in/g, R, 1, 1], bias [R * C_out * C_in/g]}``,
        ``conv_guide.{weight [R, C_in, kH, kW], bias [R]}``, ``bias`` [C_out] if ``bias=True``,
        and the buffer ``temperature``.

    Attributes:
        method: the formulation handed to :func:`~dynconv.functional.region_conv2d`, ``'auto'``
            by default; ``'dense'`` avoids data-dependent shapes (export), ``'restricted'``
            computes each pixel with its own region's kernel only.
        last_region_map: the region of every output pixel in the last forward, [N, H_out, W_out]
            (int64, detached; [H_out, W_out] for an unbatched input), or ``None`` before the
            first forward.

    {shapes}
    """

    method: RegionMethod
    last_region_map: Tensor | None

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
        num_regions: int = 8,
        temperature: float = 1.0,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
            padding_mode=padding_mode, temperature=temperature, device=device, dtype=dtype,
        )
        self.num_regions = check_int(num_regions, "num_regions")
        check_bool(bias, "bias")
        kw = self._factory_kwargs
        r = self.num_regions
        kernel_numel = out_channels * (in_channels // self.groups)
        self.conv_kernel = nn.Sequential(
            nn.AdaptiveAvgPool2d(self.kernel_size),
            nn.Conv2d(in_channels, r * r, 1, **kw),
            nn.Sigmoid(),
            nn.Conv2d(r * r, r * kernel_numel, 1, groups=r, **kw),
        )
        self.conv_guide = nn.Conv2d(
            in_channels, r, self.kernel_size, self.stride, self.padding, self.dilation,
            padding_mode=padding_mode, **kw,
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **kw))
        else:
            self.register_parameter("bias", None)
        self.method = "auto"
        self.last_region_map = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the guide and the first generator conv as ``nn.Conv2d`` does, then give
        every region the first region's generator branch, so that the R kernels of a sample start
        equal (the guide's split changes nothing yet) and training pulls them apart; the
        generated kernels start with twice He's standard deviation, sqrt(2 / fan_out).

        Chosen on a validation split of MNIST (docs/training.md, "How the recipes were chosen"):
        nn.Conv2d's uniform init for each region apart trained to 56.5%, the same with equal
        regions 89.2%, equal regions with 1x, 2x, 4x He 91.1, 92.5, 91.1% (static 93.8%).
        """
        r, (kh, kw) = self.num_regions, self.kernel_size
        first, last = self.conv_kernel[1], self.conv_kernel[3]
        for conv in (first, self.conv_guide):
            conv.reset_parameters()
        # A generated weight is sum_j w_j s_j + b over R sigmoid outputs s_j (about 1/2): with
        # w, b ~ U(-a, a) its variance is about a^2 / 3 * (R / 4 + 1).
        std = 2 * math.sqrt(2 / (self.out_channels * kh * kw))
        bound = std * math.sqrt(3 / (r / 4 + 1))
        per_region = last.out_channels // r
        with torch.no_grad():
            nn.init.uniform_(last.weight[:per_region], -bound, bound)
            nn.init.uniform_(last.bias[:per_region], -bound, bound)
            last.weight.copy_(last.weight[:per_region].repeat(r, 1, 1, 1))
            last.bias.copy_(last.bias[:per_region].repeat(r))
            first.weight.copy_(first.weight[:r].repeat(r, 1, 1, 1))
            first.bias.copy_(first.bias[:r].repeat(r))
        if self.bias is not None:
            fan_in = self.in_channels // self.groups * kh * kw
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def _parameter_dtype(self) -> torch.dtype:
        return self.conv_guide.weight.dtype

    def region_kernels(self, x: Tensor) -> Tensor:
        """The R kernels of every sample [N, R, C_out, C_in/g, kH, kW] for input [N, C_in, H, W].

        ``conv_kernel`` computes them, except that its last (grouped 1x1) conv runs as one
        batched matrix product, about twice as fast, whose output is laid out [R, N, kH, kW,
        C_in/g, C_out]: the pixel-row order of ``region_conv2d(method='restricted')``. The
        result is a view of it in the usual order.
        """
        n, r, (kh, kw) = x.shape[0], self.num_regions, self.kernel_size
        c_out, c_in_g = self.out_channels, self.in_channels // self.groups
        pool, first, sigmoid, last = self.conv_kernel
        # the module (FLOP counters see it), or a form that exports at any input size
        pooled = adaptive_avg_pool2d_matmul(x, self.kernel_size) if is_exporting() else pool(x)
        hidden = sigmoid(first(pooled))  # [N, R * R, kH, kW]
        hidden = hidden.reshape(n, r, r, kh * kw).permute(1, 0, 3, 2).reshape(r, n * kh * kw, r)
        weight = last.weight.reshape(r, c_out, c_in_g, r).permute(0, 3, 2, 1)
        bias = last.bias.reshape(r, 1, c_out, c_in_g).transpose(2, 3)
        kernels = torch.baddbmm(
            bias.reshape(r, 1, c_in_g * c_out), hidden, weight.reshape(r, r, c_in_g * c_out)
        )
        return kernels.reshape(r, n, kh, kw, c_in_g, c_out).permute(1, 0, 5, 4, 2, 3)

    def forward(self, x: Tensor) -> Tensor:
        x, unbatched = self._check_input(x)
        xp, geometry = self._pad(x)
        kernels = self.region_kernels(x).to(xp.dtype)
        guide = self._guide(xp, geometry)
        check_region_method(self.method)
        regions = assign_regions(guide.detach())  # once, for the convolution and the attribute
        out = region_conv2d_unchecked(xp, kernels, guide, None, geometry, method=self.method,
                                      regions=regions)
        if self.bias is not None:  # in the convolution's dtype (autocast's), as nn.Conv2d
            out = out + self.bias.reshape(1, self.out_channels, 1, 1).to(out.dtype)
        if not is_exporting():  # a plain attribute: not part of an exported graph
            self.last_region_map = regions.squeeze(0) if unbatched else regions
        return out.squeeze(0) if unbatched else out

    def attention_record(self, x: Tensor) -> dict[str, Tensor]:
        """``'region_map'``: the region of every output pixel [N, H_out, W_out] (int64) for input
        [N, C_in, H, W] (or [C_in, H, W])."""
        x, _ = self._check_input(x)
        xp, geometry = self._pad(x)
        return {"region_map": assign_regions(self._guide(xp, geometry))}

    def _guide(self, xp: Tensor, geometry: ConvGeometry) -> Tensor:
        """Guide logits over the temperature [N, R, H_out, W_out], on the input as :meth:`_pad`
        left it for the convolution of ``geometry``."""
        conv = self.conv_guide
        guide = nn.functional.conv2d(
            xp, conv.weight, conv.bias, self.stride, geometry.symmetric_padding, self.dilation
        )
        return guide / self.temperature.to(guide.dtype)

    @torch.no_grad()
    def init_from_conv(self, conv: nn.Conv2d) -> None:
        """Start a converted layer: a fresh initialisation (``reset_parameters``) with the static
        bias copied. A generated kernel varies over its kH x kW positions only through the pooled
        input, so no setting of the generator reproduces a given static kernel: the converted
        model does not start where the static one was (unlike the kernel-bank layers)."""
        self.reset_parameters()
        if conv.bias is not None:
            self.bias = nn.Parameter(conv.bias.detach().clone().to(self.conv_guide.weight.dtype))

    @torch.no_grad()
    def fold_output_affine(self, scale: Tensor, shift: Tensor) -> None:
        """Fold ``scale * y + shift`` ([C_out] each) into the layer, exactly: output channel o of
        every generated kernel is scaled (the generator's last conv, whose channels are ordered
        (region, C_out, C_in/g)), and the shift goes into the static bias (created if needed).
        The region map does not depend on the kernels, so it is unchanged."""
        last = self.conv_kernel[3]
        per_channel = scale.to(last.weight.dtype).repeat_interleave(self.in_channels // self.groups)
        factor = per_channel.repeat(self.num_regions)
        last.weight.mul_(factor.reshape(-1, 1, 1, 1))
        last.bias.mul_(factor)
        bias = torch.zeros_like(scale) if self.bias is None else self.bias
        self.bias = nn.Parameter((bias * scale + shift).to(last.weight.dtype),
                                 requires_grad=last.weight.requires_grad)

    official_layouts: ClassVar[dict[str, str]] = {
        "drconv": "seed 003's DRConv2d (pasted into YOLOv5/v7 common.py)",
    }

    def official_layout(self) -> str:
        """``'drconv'``; a ``ValueError`` if the reference code cannot build the layer (groups,
        a bias, a non-square kernel, a padding mode)."""
        problems = self._official_geometry_problems()
        if self.groups != 1:
            problems.append(f"groups={self.groups} (the reference code has none)")
        if self.bias is not None:
            problems.append("a bias (the reference code has none)")
        self._refuse_layout("drconv", problems)
        return "drconv"

    def macs(self, input_size: tuple[int, int]) -> LayerMacs:
        """Each output pixel with one region's kernel: a static convolution's MACs; the attention
        is the guide and the filter generator (:meth:`_attention_macs`); nothing is mixed."""
        return LayerMacs(self._conv_macs(input_size), sum(self._attention_macs(input_size)))

    def functional_macs(self, input_size: tuple[int, int]) -> int:
        """The convolution, the guide and the generator's last convolution: they run as
        ``F.conv2d`` and a batched matrix product on the modules' weights."""
        guide, _, last = self._attention_macs(input_size)
        return self._conv_macs(input_size) + guide + last

    def _attention_macs(self, input_size: tuple[int, int]) -> tuple[int, int, int]:
        """MACs per image of the guide (C_in -> R, dense, at the layer's geometry) and of the
        filter generator on the kH x kW pooled input, first 1x1 (C_in -> R*R) then last (R
        groups of R inputs to R * C_out * C_in/g outputs)."""
        r, (kh, kw) = self.num_regions, self.kernel_size
        h_out, w_out = self._geometry.output_size(*input_size)
        guide = r * self.in_channels * kh * kw * h_out * w_out
        first = r * r * self.in_channels * kh * kw
        last = r * r * kernel_numel(self)
        return guide, first, last

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", num_regions={self.num_regions}"
        if self.bias is not None:
            s += ", bias=True"
        return s
