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
from ..layers.kwconv import KWConv2d
from ..layers.warehouse import Warehouses
from .resnet import BasicBlock, Bottleneck, ResNet

__all__ = ["KW_WIDTHS", "kw_resnet18", "kw_resnet50", "kw_width"]

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
                    shop: Warehouses, **layer_kwargs: Any) -> list[str]:
    """Replace, in module order, each ``nn.Conv2d`` of ``model`` that ``stage_of(name, conv)``
    gives a warehouse key by a :class:`KWConv2d` of the same geometry and bias on
    ``shop[key]``; return the replaced names. The layers start fresh (the warehouse is
    re-initialised as each joins)."""
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
            padding_mode=module.padding_mode, warehouse=shop[f"stage{key}"], **layer_kwargs,
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
