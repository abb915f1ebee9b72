"""The official KernelWarehouse zoo (OSVAI/KernelWarehouse): ``kw_resnet18``, ``kw_resnet50``
at the published widths, with the official sharing (one warehouse per stage) and layout.

A model is the static network of the same structure whose convolutions the official code makes
KernelWarehouse layers are replaced, in module order, by :class:`~dynconv.KWConv2d` layers built
with the stage's :class:`~dynconv.Warehouse`: module order is the order in which the official
``allocate()`` hands out cells, so every layer's cells are where the official checkpoint has
them, and :func:`dynconv.tools.official.load_official` loads those checkpoints.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from torch import nn

from .._conv_args import check_keyword_spellings
from ..layers.kwconv import KWConv2d, KWLinear
from ..layers.warehouse import Warehouse, Warehouses
from .mobilenetv2 import INVERTED_RESIDUAL_SETTINGS, MobileNetV2
from .resnet import BasicBlock, Bottleneck, ResNet

__all__ = ["KW_WIDTHS", "kw_mobilenetv2_050", "kw_mobilenetv2_100", "kw_resnet18",
           "kw_resnet50", "kw_width"]

#: The official widths (``configs/*/kw*.json``): the warehouse settings of each. 1/4x and 1/2x
#: cut cells of half the greatest common divisor of the channels and keep fewer warehouse cells
#: than the layers cut; 2x and 4x keep 2 and 4 warehouse cells per kernel cell.
KW_WIDTHS: dict[str, dict[str, float]] = {
    "1/4x": {"cell_num_ratio": 0.25, "cell_in_ratio": 0.5, "cell_out_ratio": 0.5},
    "1/2x": {"cell_num_ratio": 0.5, "cell_in_ratio": 0.5, "cell_out_ratio": 0.5},
    "1x": {"cell_num_ratio": 1, "cell_in_ratio": 1, "cell_out_ratio": 1},
    "2x": {"cell_num_ratio": 2, "cell_in_ratio": 1, "cell_out_ratio": 1},
    "4x": {"cell_num_ratio": 4, "cell_in_ratio": 1, "cell_out_ratio": 1},
}


def kw_width(width: object) -> str:
    """``width`` as a key of :data:`KW_WIDTHS` (``'1x'``; also ``1``, ``0.5``, ``'1/2'``)."""
    aliases = {"0.25": "1/4x", "1/4": "1/4x", "0.5": "1/2x", "1/2": "1/2x", "1": "1x",
               "1.0": "1x", "2": "2x", "2.0": "2x", "4": "4x", "4.0": "4x"}
    key = str(width).strip().lower()
    key = aliases.get(key, key)
    if isinstance(width, bool) or key not in KW_WIDTHS:
        raise ValueError(f"width must be one of {list(KW_WIDTHS)}, got {width!r}")
    return key


#: Which stage's warehouse a convolution of the torchvision-named ResNet uses, as the official
#: ``kw_resnet`` names them: ``layer{s+1}.{b}.conv{c}`` and ``layer{s+1}.0.downsample.0``.
_RESNET_CONV = re.compile(r"layer(\d)\.(\d+)\.(conv(\d)|downsample\.0)$")


def _resnet_stage(name: str, conv: nn.Conv2d, bottleneck: bool) -> int | None:
    """The stage (0-3) whose warehouse the official model gives convolution ``name``, or None
    where it keeps a static convolution (the stem; ResNet-50's first 1x1 and shortcut; every
    shortcut of stride 1). The first convolution of a stage's first block, and its strided
    shortcut, are the previous stage's (the official "warehouse handover")."""
    match = _RESNET_CONV.search(name)
    if match is None:
        return None
    stage, block = int(match.group(1)) - 1, int(match.group(2))
    if match.group(3) == "downsample.0":
        return stage - 1 if conv.stride != (1, 1) else None  # the official enabled=(stride != 1)
    if match.group(4) == "1" and block == 0:
        if bottleneck:
            return stage - 1 if stage >= 1 else None
        return max(stage - 1, 0)
    return stage


def replace_with_kw(model: nn.Module, stage_of: Callable[[str, nn.Conv2d], int | str | None],
                    shop: Warehouses | Callable[[str], Warehouse], **layer_kwargs: Any
                    ) -> list[str]:
    """Replace, in module order, each ``nn.Conv2d`` of ``model`` that ``stage_of(name, conv)``
    gives a warehouse key by a :class:`KWConv2d` of the same geometry and bias on
    ``shop[f'stage{key}']`` (or ``shop(key)``); return the replaced names. The layers start
    fresh (the warehouse is re-initialised as each joins)."""
    names = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Conv2d:
            continue
        key = stage_of(name, module)
        if key is None:
            continue
        layer = KWConv2d(
            module.in_channels, module.out_channels, module.kernel_size, module.stride,
            module.padding, module.dilation, module.groups, bias=module.bias is not None,
            padding_mode=module.padding_mode,
            warehouse=shop(key) if callable(shop) else shop[f"stage{key}"], **layer_kwargs,
        )
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        names.append(name)
    return names


def _kw_resnet(block: type[BasicBlock] | type[Bottleneck], layers: list[int], width: object,
               reduction: float, nonlocal_basis_ratio: float, conv_kwargs: dict | None,
               **kwargs: Any) -> ResNet:
    width = kw_width(width)
    if "conv_type" in kwargs:
        raise TypeError("kw_resnet models are KernelWarehouse models; pass width= (and "
                        "conv_kwargs= for the layers), not conv_type")
    model = ResNet(block, layers, conv_type="static", **kwargs)
    shop = Warehouses(**KW_WIDTHS[width])
    bottleneck = block is Bottleneck
    replace_with_kw(model, lambda name, conv: _resnet_stage(name, conv, bottleneck), shop,
                    reduction=reduction, nonlocal_basis_ratio=nonlocal_basis_ratio,
                    **(conv_kwargs or {}))
    model.kw_width = width
    return model


@check_keyword_spellings
def kw_resnet18(width: object = "1x", reduction: float = 0.0625,
                nonlocal_basis_ratio: float = 1.0, conv_kwargs: dict | None = None,
                **kwargs: Any) -> ResNet:
    """OSVAI/KernelWarehouse's ``kw_resnet18`` at ``width`` (``'1/4x'``, ``'1/2x'``, ``'1x'``,
    ``'2x'``, ``'4x'``): one warehouse per stage, the official layout. Keywords go to
    :class:`~dynconv.models.ResNet` (``num_classes``, ``stem='cifar'``, ``dropout``);
    ``conv_kwargs`` to every :class:`~dynconv.KWConv2d` (e.g. ``attention_norm``).
    Parameters: 4.08M, 7.43M, 11.93M, 23.24M, 45.86M (the official README's)."""
    return _kw_resnet(BasicBlock, [2, 2, 2, 2], width, reduction, nonlocal_basis_ratio,
                      conv_kwargs, **kwargs)


@check_keyword_spellings
def kw_resnet50(width: object = "1x", reduction: float = 0.0625,
                nonlocal_basis_ratio: float | None = None, conv_kwargs: dict | None = None,
                **kwargs: Any) -> ResNet:
    """OSVAI/KernelWarehouse's ``kw_resnet50`` at ``width``; as :func:`kw_resnet18`. The 1/2x
    model maps other layers' cells through a basis of 1/16 (``nonlocal_basis_ratio=0.0625``,
    its official config), the others do not, unless ``nonlocal_basis_ratio`` is given.
    Parameters: 17.64M (1/2x), 28.05M (1x), 102.02M (4x) (the official README's)."""
    width = kw_width(width)
    if nonlocal_basis_ratio is None:
        nonlocal_basis_ratio = 0.0625 if width == "1/2x" else 1.0
    return _kw_resnet(Bottleneck, [3, 4, 6, 3], width, reduction, nonlocal_basis_ratio,
                      conv_kwargs, **kwargs)


# -- MobileNetV2 -----------------------------------------------------------------------------

#: The official KernelWarehouse stage of each row of MobileNetV2's settings.
_MOBILENETV2_STAGES = (1, 2, 3, 4, 5, 6, 6)

#: The official 1/2x MobileNetV2 (``models/kw1d2x_mobilenetv2.py``), a model of its own: only
#: the stem, the depthwise convolutions, stage 6's pointwise ones, the last 1x1 and the
#: classifier are KernelWarehouse layers, each warehouse with its own settings (declaration
#: order: stem, depthwise stages 1-5, stage 6 expand, depthwise, project, classifier).
_HALF_WIDTH_MOBILENETV2 = {
    "stem": (1, 1, 1), "dw1": (1, 1, 1), "dw2": (1, 1, 1), "dw3": (1, 1, 1), "dw4": (1, 1, 1),
    "dw5": (1, 1, 1), "pw6_0": (0.5, 0.5, 0.5), "dw6": (1, 1, 1), "pw6_1": (0.5, 0.5, 0.5),
    "classifier": (0.5, 0.025, 1),
}


def _mobilenetv2_keys(half: bool, shared_pointwise: bool) -> dict[str, str]:
    """Module path -> warehouse key of the official KernelWarehouse MobileNetV2: the stem
    alone, then per stage the depthwise convolutions and the pointwise ones (expand and project
    together at 1x, apart at 4x and 1/2x), a stage's first block in the previous stage's
    warehouses (the official handover); the last 1x1 with stage 6's projections."""
    keys = {"features.0.0": "stem"}
    index = 1
    for row, (t, _, n, _) in enumerate(INVERTED_RESIDUAL_SETTINGS):
        for i in range(n):
            handover = i == 0 and row > 0 and \
                _MOBILENETV2_STAGES[row] != _MOBILENETV2_STAGES[row - 1]
            stage = _MOBILENETV2_STAGES[row] - (1 if handover else 0)
            prefix = f"features.{index}.conv."
            pointwise = not half or stage == 6
            expand, project = (f"pw{stage}", f"pw{stage}") if shared_pointwise else (
                f"pw{stage}_0", f"pw{stage}_1")
            if t != 1:
                if pointwise:
                    keys[prefix + "0.0"] = expand
                keys[prefix + "1.0"] = f"dw{stage}"
                if pointwise:
                    keys[prefix + "2"] = project
            else:
                keys[prefix + "0.0"] = f"dw{stage}"
                if pointwise:
                    keys[prefix + "1"] = project
            index += 1
    keys[f"features.{index}.0"] = "pw6" if shared_pointwise else "pw6_1"
    return keys


def _kw_mobilenetv2(width_mult: float, width: object, reduction: float | None,
                    conv_kwargs: dict | None, **kwargs: Any) -> MobileNetV2:
    width = kw_width(width)
    if width not in ("1/2x", "1x", "4x"):
        raise ValueError(f"the official KernelWarehouse MobileNetV2 widths are '1/2x', '1x' and "
                         f"'4x', got {width!r}")
    if "conv_type" in kwargs:
        raise TypeError("kw_mobilenetv2 models are KernelWarehouse models; pass width= (and "
                        "conv_kwargs= for the layers), not conv_type")
    half = width == "1/2x"
    kwargs.setdefault("dropout", 0.1 if half else 0.0)
    model = MobileNetV2(width_mult=width_mult, conv_type="static", **kwargs)
    keys = _mobilenetv2_keys(half, shared_pointwise=width == "1x")
    layer_kwargs = {"reduction": reduction if reduction is not None else
                    (0.03125 if half else 0.0625), **(conv_kwargs or {})}
    if half:
        made: dict[str, Warehouse] = {}

        def shop(key: str) -> Warehouse:
            if key not in made:
                ratio, c_in, c_out = _HALF_WIDTH_MOBILENETV2[key]
                made[key] = Warehouse(ratio, cell_in_ratio=c_in, cell_out_ratio=c_out)
            return made[key]

        replace_with_kw(model, lambda name, _: keys.get(name), shop, **layer_kwargs)
        linear = model.classifier[1]
        model.classifier[1] = KWLinear(linear.in_features, linear.out_features,
                                       warehouse=shop("classifier"), **layer_kwargs)
    else:
        shop = Warehouses(**KW_WIDTHS[width])
        replace_with_kw(model, lambda name, _: keys.get(name), lambda key: shop[key],
                        **layer_kwargs)
        linear = model.classifier[1]  # the official head: a Linear, no dropout
        model.classifier = linear
    model.kw_width = width
    return model


@check_keyword_spellings
def kw_mobilenetv2_100(width: object = "1x", reduction: float | None = None,
                       conv_kwargs: dict | None = None, **kwargs: Any) -> MobileNetV2:
    """OSVAI/KernelWarehouse's ``kw_mobilenetv2_100`` (``'1x'``, ``'4x'``) and
    ``kw1d2x_mobilenetv2_100`` (``'1/2x'``), in the official layout. Keywords go to
    :class:`~dynconv.models.MobileNetV2` (``num_classes``, ``dropout``); ``conv_kwargs`` to
    the layers. Parameters: 2.65M, 5.17M, 11.38M (the official README's)."""
    return _kw_mobilenetv2(1.0, width, reduction, conv_kwargs, **kwargs)


@check_keyword_spellings
def kw_mobilenetv2_050(width: object = "1x", reduction: float | None = None,
                       conv_kwargs: dict | None = None, **kwargs: Any) -> MobileNetV2:
    """OSVAI/KernelWarehouse's ``kw_mobilenetv2_050`` and ``kw1d2x_mobilenetv2_050``; as
    :func:`kw_mobilenetv2_100`. Parameters: 1.47M, 2.85M, 4.65M (the official README's)."""
    return _kw_mobilenetv2(0.5, width, reduction, conv_kwargs, **kwargs)
