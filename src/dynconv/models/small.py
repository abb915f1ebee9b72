"""``small_cnn``: the small network that ``dynconv compare`` trains with each convolution type.

Small enough to train in seconds on a CPU at 8x8 to 32x32 pixels, deep enough (six convolutions
of the chosen type, two downsamplings) for the convolution type to matter. Its default width (8,
16 and 32 channels) is deliberately narrow: dynamic convolutions are meant to add capacity where
a static network lacks it, and a wide network saturates the digits whatever its convolutions.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from .._conv_args import check_keyword_spellings
from ..layers.factory import (
    ANY_BATCH_DEFAULTS,
    ConvBuilder,
    conv_builder,
    split_warehouse_settings,
)
from ._common import init_weights

__all__ = ["SmallCNN", "small_cnn"]

# Per-type defaults of this network (overridden by ``conv_kwargs``). ODConv's official attention
# BatchNorm normalises the pooled features over the batch; in this narrow network their spread
# across samples is tiny, the norm divides by it, and training diverges (digits, 3 epochs, lr
# 0.1: 25% test accuracy, training loss stuck near 2). Its per-sample GroupNorm ('layer') trains
# (84% after 3 epochs, static 97%; 95% after 15 epochs). 'none' also trained (120 SGD steps:
# loss 2.1 to 0.3).
TYPE_DEFAULTS: dict[str, dict[str, Any]] = ANY_BATCH_DEFAULTS


def _conv_bn_relu(conv: ConvBuilder, c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        conv(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """A static 3x3 stem, then three stages of two 3x3 convolutions of ``conv_type`` (widths
    ``width``, 2 ``width``, 4 ``width``; the first convolution of stages 2 and 3 has stride 2),
    each followed by BatchNorm and ReLU; global average pooling, dropout and a linear classifier.

    Args:
        num_classes: classifier outputs.
        in_channels: image channels (1 for grey images).
        width: channels of the first stage.
        conv_type, conv_kwargs: the convolution type and its keyword arguments (on top of
            ``TYPE_DEFAULTS``: ODConv and KernelWarehouse here use ``attention_norm='layer'``).
            KernelWarehouse (``'kw'``) layers share one warehouse per input resolution, as
            :func:`dynconv.convert`'s ``share='stage'`` and the official ResNets: the stride-2
            convolution of stages 2 and 3 joins the warehouse of the stage before; the
            warehouse settings (``cell_num_ratio``, ...) may be among ``conv_kwargs``.
        dropout: dropout before the classifier.
        stem_stride: stride of the static stem (2 halves the maps of every later layer: the
            network for 28x28 images, such as MNIST's).

    Shapes: [N, in_channels, H, W] -> [N, num_classes], for any H, W >= 1.
    """

    @check_keyword_spellings
    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 8,
        conv_type: str = "static",
        conv_kwargs: dict[str, Any] | None = None,
        dropout: float = 0.1,
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels),
                            ("width", width), ("stem_stride", stem_stride)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        conv_kwargs = {**TYPE_DEFAULTS.get(conv_type, {}), **(conv_kwargs or {})}
        shop, conv_kwargs = split_warehouse_settings(conv_type, conv_kwargs)
        conv = conv_builder(conv_type, **conv_kwargs)

        def at(stage: int) -> ConvBuilder:
            """The builder of the convolutions whose input is at ``stage``'s resolution."""
            return conv if shop is None else functools.partial(conv,
                                                               warehouse=shop[f"stage{stage}"])

        w = width
        self.stem = _conv_bn_relu(conv_builder("static"), in_channels, w, stem_stride)
        self.stage1 = nn.Sequential(_conv_bn_relu(at(1), w, w), _conv_bn_relu(at(1), w, w))
        self.stage2 = nn.Sequential(_conv_bn_relu(at(1), w, 2 * w, 2),
                                    _conv_bn_relu(at(2), 2 * w, 2 * w))
        self.stage3 = nn.Sequential(_conv_bn_relu(at(2), 2 * w, 4 * w, 2),
                                    _conv_bn_relu(at(3), 4 * w, 4 * w))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(4 * w, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(self.dropout(torch.flatten(x.mean(dim=(2, 3)), 1)))


def small_cnn(conv_type: str = "static", **kwargs: Any) -> SmallCNN:
    """The network of ``dynconv compare``; keywords go to :class:`SmallCNN`."""
    return SmallCNN(conv_type=conv_type, **kwargs)
