"""ResNet-18/34/50/101 with any convolution type, and the official ODConv ResNets by name.

The structure and parameter names are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
``downsample.0``, ``fc``), so a static model matches torchvision's ResNet and an ``'odconv'``
model matches the official OSVAI/ODConv ``od_resnet`` checkpoints key for key.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._conv_args import check_bool, check_keyword_spellings
from ..layers.factory import ConvBuilder, conv_builder
from ._common import init_weights

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "od_resnet18",
    "od_resnet34",
    "od_resnet50",
    "od_resnet101",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual: [N, inplanes, H, W] -> [N, planes, H/s, W/s]."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        conv: ConvBuilder = nn.Conv2d,
    ) -> None:
        super().__init__()
        self.conv1 = conv(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1, 3x3 (strided), 1x1 convolutions with a residual; the output has 4 x planes channels."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        conv: ConvBuilder = nn.Conv2d,
    ) -> None:
        super().__init__()
        self.conv1 = conv(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet whose block convolutions are of type ``conv_type`` (see :func:`create_conv2d`).

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: blocks per stage, e.g. ``[2, 2, 2, 2]`` for ResNet-18.
        num_classes: classifier outputs.
        conv_type: type of the convolutions inside the blocks (``'static'``, ``'dynamic'``,
            ``'condconv'``, ``'odconv'``, ``'drconv'``, or any registered type).
        conv_kwargs: keyword arguments for those convolutions (``num_kernels``, ...).
        stem: ``'imagenet'`` (7x7 stride-2 convolution and max-pool) or ``'cifar'`` (3x3
            stride-1 convolution, no max-pool) for small images.
        dynamic_stem, dynamic_downsample: also make the stem / the 1x1 shortcut convolutions of
            ``conv_type`` (static by default, as in the official ODConv models).
        dropout: dropout before the classifier (the official ODConv ResNets use 0.1).
        in_channels: image channels.

    Shapes: [N, in_channels, H, W] -> [N, num_classes].
    """

    @check_keyword_spellings
    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        conv_type: str = "static",
        conv_kwargs: dict[str, Any] | None = None,
        stem: str = "imagenet",
        dynamic_stem: bool = False,
        dynamic_downsample: bool = False,
        dropout: float = 0.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        if len(layers) != 4 or any(not isinstance(n, int) or n < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive ints, got {layers!r}")
        conv = conv_builder(conv_type, **(conv_kwargs or {}))
        static = conv_builder("static")
        stem_conv = conv if check_bool(dynamic_stem, "dynamic_stem") else static
        self._downsample_conv = (
            conv if check_bool(dynamic_downsample, "dynamic_downsample") else static
        )
        self._conv = conv
        self.inplanes = 64
        if stem == "imagenet":
            self.conv1 = stem_conv(in_channels, 64, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = stem_conv(in_channels, 64, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        init_weights(self)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                self._downsample_conv(self.inplanes, planes * block.expansion, 1, stride=stride,
                                      bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, self._conv)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, conv=self._conv) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))


def _od_resnet(
    block: type[BasicBlock] | type[Bottleneck], layers: list[int], kernel_num: int,
    reduction: float, **kwargs: Any,
) -> ResNet:
    """The official ODConv layout: ODConv in every block; static stem, shortcuts, classifier."""
    conv_kwargs = {"num_kernels": kernel_num, "reduction": reduction,
                   **(kwargs.pop("conv_kwargs", None) or {})}
    kwargs.setdefault("dropout", 0.1)
    return ResNet(block, layers, conv_type="odconv", conv_kwargs=conv_kwargs, **kwargs)


def resnet18(conv_type: str = "static", **kwargs: Any) -> ResNet:
    """ResNet-18; keywords go to :class:`ResNet` (``conv_kwargs``, ``stem='cifar'``, ...)."""
    return ResNet(BasicBlock, [2, 2, 2, 2], conv_type=conv_type, **kwargs)


def resnet34(conv_type: str = "static", **kwargs: Any) -> ResNet:
    """ResNet-34; keywords go to :class:`ResNet`."""
    return ResNet(BasicBlock, [3, 4, 6, 3], conv_type=conv_type, **kwargs)


def resnet50(conv_type: str = "static", **kwargs: Any) -> ResNet:
    """ResNet-50; keywords go to :class:`ResNet`."""
    return ResNet(Bottleneck, [3, 4, 6, 3], conv_type=conv_type, **kwargs)


def resnet101(conv_type: str = "static", **kwargs: Any) -> ResNet:
    """ResNet-101; keywords go to :class:`ResNet`."""
    return ResNet(Bottleneck, [3, 4, 23, 3], conv_type=conv_type, **kwargs)


@check_keyword_spellings
def od_resnet18(kernel_num: int = 1, reduction: float = 0.0625, **kwargs: Any) -> ResNet:
    """OSVAI/ODConv's ``od_resnet18``: same state_dict keys and shapes as the official model."""
    return _od_resnet(BasicBlock, [2, 2, 2, 2], kernel_num, reduction, **kwargs)


@check_keyword_spellings
def od_resnet34(kernel_num: int = 1, reduction: float = 0.0625, **kwargs: Any) -> ResNet:
    """OSVAI/ODConv's ``od_resnet34``."""
    return _od_resnet(BasicBlock, [3, 4, 6, 3], kernel_num, reduction, **kwargs)


@check_keyword_spellings
def od_resnet50(kernel_num: int = 1, reduction: float = 0.0625, **kwargs: Any) -> ResNet:
    """OSVAI/ODConv's ``od_resnet50``."""
    return _od_resnet(Bottleneck, [3, 4, 6, 3], kernel_num, reduction, **kwargs)


@check_keyword_spellings
def od_resnet101(kernel_num: int = 1, reduction: float = 0.0625, **kwargs: Any) -> ResNet:
    """OSVAI/ODConv's ``od_resnet101``."""
    return _od_resnet(Bottleneck, [3, 4, 23, 3], kernel_num, reduction, **kwargs)
