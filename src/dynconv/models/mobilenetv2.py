"""MobileNetV2 with any convolution type, and the official ODConv MobileNetV2s by name.

Structure and parameter names are torchvision's (``features.{i}.conv.{j}``, ``classifier.1``), so
a static model has torchvision's state_dict layout and an ``'odconv'`` model with a static stem
matches the official OSVAI/ODConv ``od_mobilenetv2`` checkpoints key for key.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .._conv_args import check_bool, check_keyword_spellings
from ..layers.factory import ConvBuilder, conv_builder
from ._common import init_weights

__all__ = [
    "INVERTED_RESIDUAL_SETTINGS",
    "ConvBNReLU",
    "InvertedResidual",
    "MobileNetV2",
    "mobilenet_v2",
    "od_mobilenetv2_050",
    "od_mobilenetv2_075",
    "od_mobilenetv2_100",
]

# expansion t, output channels c, repeats n, first stride s
INVERTED_RESIDUAL_SETTINGS = [
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to a multiple of ``divisor``, never more than 10% below it."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBNReLU(nn.Sequential):
    """Convolution ('same' padding), BatchNorm, ReLU6: [N, c_in, H, W] -> [N, c_out, H/s, W/s]."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
        groups: int = 1, conv: ConvBuilder = nn.Conv2d,
    ) -> None:
        super().__init__(
            conv(in_channels, out_channels, kernel_size, stride=stride,
                 padding=(kernel_size - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise 3x3, project (1x1, linear), with a residual when shapes allow."""

    def __init__(
        self, inp: int, oup: int, stride: int, expand_ratio: int, conv: ConvBuilder = nn.Conv2d
    ) -> None:
        super().__init__()
        hidden = round(inp * expand_ratio)
        self.stride = stride
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(inp, hidden, 1, conv=conv))
        layers += [
            ConvBNReLU(hidden, hidden, 3, stride, groups=hidden, conv=conv),
            conv(hidden, oup, 1, stride=1, padding=0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 whose convolutions after the stem are of type ``conv_type``.

    Args:
        num_classes: classifier outputs.
        width_mult: channel multiplier (0.5, 0.75, 1.0, ...).
        conv_type, conv_kwargs: the convolution type and its keyword arguments.
        dynamic_stem: also make the first (stem) convolution dynamic; static by default, as in
            the official ODConv models.
        dropout: dropout before the classifier.
        in_channels: image channels.

    Shapes: [N, in_channels, H, W] -> [N, num_classes].
    """

    @check_keyword_spellings
    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        conv_type: str = "static",
        conv_kwargs: dict[str, Any] | None = None,
        dynamic_stem: bool = False,
        dropout: float = 0.2,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or not (
            width_mult > 0
        ):
            raise ValueError(f"width_mult must be a number > 0, got {width_mult!r}")
        conv = conv_builder(conv_type, **(conv_kwargs or {}))
        stem_conv = conv if check_bool(dynamic_stem, "dynamic_stem") else conv_builder("static")
        channels = make_divisible(32 * width_mult)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNReLU(in_channels, channels, 3, 2, conv=stem_conv)]
        for t, c, n, s in INVERTED_RESIDUAL_SETTINGS:
            out = make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(channels, out, s if i == 0 else 1, t, conv))
                channels = out
        features.append(ConvBNReLU(channels, self.last_channel, 1, conv=conv))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes)
        )
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(x)


def mobilenet_v2(width_mult: float = 1.0, conv_type: str = "static", **kwargs: Any) -> MobileNetV2:
    """MobileNetV2 at ``width_mult``; keywords go to :class:`MobileNetV2`."""
    return MobileNetV2(width_mult=width_mult, conv_type=conv_type, **kwargs)


def _od_mobilenetv2(width_mult: float, kernel_num: int, reduction: float, **kwargs: Any):
    conv_kwargs = {"num_kernels": kernel_num, "reduction": reduction,
                   **(kwargs.pop("conv_kwargs", None) or {})}
    return MobileNetV2(width_mult=width_mult, conv_type="odconv", conv_kwargs=conv_kwargs,
                       **kwargs)


@check_keyword_spellings
def od_mobilenetv2_050(kernel_num: int = 1, reduction: float = 0.0625, **kwargs: Any):
    """OSVAI/ODConv's ``od_mobilenetv2_050``: same state_dict keys and shapes."""
    return _od_mobilenetv2(0.5, kernel_num, reduction, **kwargs)


@check_keyword_spellings
def od_mobilenetv2_075(kernel_num: int = 1, reduction: float = 0.0625, **kwargs: Any):
    """OSVAI/ODConv's ``od_mobilenetv2_075``."""
    return _od_mobilenetv2(0.75, kernel_num, reduction, **kwargs)


@check_keyword_spellings
def od_mobilenetv2_100(kernel_num: int = 1, reduction: float = 0.0625, **kwargs: Any):
    """OSVAI/ODConv's ``od_mobilenetv2_100``."""
    return _od_mobilenetv2(1.0, kernel_num, reduction, **kwargs)
