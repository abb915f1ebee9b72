"""YOLO-style blocks with Ultralytics' signatures, channel arithmetic and parameter names.

``Conv``, ``Bottleneck``, ``C3``, ``C2f``, ``C3k`` and ``C3k2`` behave as Ultralytics' blocks of
the same name (so the stock model's weights map onto them), and take a keyword-only
``conv_type`` (and ``conv_kwargs``, on top of
:data:`dynconv.layers.factory.ANY_BATCH_DEFAULTS`: ODConv's
attention uses ``attention_norm='layer'``, since detection trains at small and odd batch sizes)
for their inner convolutions. Each has dynamic variants named
after the type, ``C2f_ODConv``, ``C3k2_DynamicConv``, ``Bottleneck_CondConv``, ``DRConv`` (a
``Conv`` with a DRConv inside), ``C2f_KWConv``, ...: in the CSP blocks the bottleneck convolutions
become dynamic and the 1x1 convolutions around them stay static, as in the community's
``C2f_ODConv``. KernelWarehouse (``'kw'``) layers share one warehouse per block: the outermost
block built with the type makes it (from the warehouse settings in ``conv_kwargs``,
``cell_num_ratio``, ...) and hands it to its inner blocks, so a ``C2f_KWConv`` or ``C3k2_KWConv``
row of a YAML is one warehouse, and a ``KWConv`` its own.

Shapes: every block maps [N, c1, H, W] to [N, c2, H', W'] (H' = H / s for ``Conv``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..layers.factory import (
    ANY_BATCH_DEFAULTS,
    create_conv2d,
    shares_warehouses,
    split_warehouse_settings,
)
from ..layers.fuse import fold_batchnorm

__all__ = ["C3", "Bottleneck", "C2f", "C3k", "C3k2", "Conv", "autopad", "fuse_blocks"]


def autopad(k: int | Sequence[int], p: int | Sequence[int] | None = None, d: int = 1):
    """Padding that keeps the size at stride 1 ('same'), as Ultralytics computes it."""
    if d > 1:
        k = d * (k - 1) + 1 if isinstance(k, int) else [d * (x - 1) + 1 for x in k]
    if p is None:
        p = k // 2 if isinstance(k, int) else [x // 2 for x in k]
    return p


def _with_warehouse(conv_type: str, conv_kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
    """``conv_kwargs`` with one new warehouse for every layer built with them, for a type whose
    layers share one (``'kw'``) and keywords that give none (their warehouse settings go into
    it); as they are otherwise."""
    shop, kwargs = split_warehouse_settings(conv_type, conv_kwargs or {})
    if shop is None:
        return conv_kwargs
    return {**kwargs, "warehouse": shop["block"]}


class _ConvTyped(nn.Module):
    """Mixin state: the conv type of a block's dynamic convolutions (class default or keyword)."""

    conv_type = "static"

    def _conv_spec(self, conv_type: str | None, conv_kwargs: dict[str, Any] | None):
        """The keywords of the block's inner blocks: its conv type and ``conv_kwargs``, with the
        block's warehouse for a type that shares one."""
        self.conv_type = conv_type or type(self).conv_type
        return {"conv_type": self.conv_type,
                "conv_kwargs": _with_warehouse(self.conv_type, conv_kwargs)}

    def _placeholder(self, conv_type: str | None, conv_kwargs: dict[str, Any] | None
                     ) -> dict[str, Any]:
        """The keywords for the inner blocks that a subclass's ``__init__`` builds through its
        base and then replaces (``C3k``, ``C3k2``): static for a type with warehouses, whose
        warehouse those blocks would otherwise join for nothing."""
        if shares_warehouses(conv_type or type(self).conv_type):
            return {"conv_type": "static", "conv_kwargs": None}
        return {"conv_type": conv_type, "conv_kwargs": conv_kwargs}


class Conv(_ConvTyped):
    """Convolution, BatchNorm, SiLU: Ultralytics' ``Conv(c1, c2, k, s, p, g, d, act)``.

    ``fuse()`` folds the BatchNorm into the convolution (replacing it with ``nn.Identity``)
    wherever that is exact, static or dynamic.
    """

    default_act = nn.SiLU()

    def __init__(
        self, c1: int, c2: int, k: int | Sequence[int] = 1, s: int = 1, p=None, g: int = 1,
        d: int = 1, act: bool | nn.Module = True, *, conv_type: str | None = None,
        conv_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.conv_type = conv_type or type(self).conv_type
        kernel = k if isinstance(k, int) else tuple(k)
        padding = autopad(k, p, d)
        padding = padding if isinstance(padding, int) else tuple(padding)
        kwargs = {**ANY_BATCH_DEFAULTS.get(self.conv_type, {}),
                  **(_with_warehouse(self.conv_type, conv_kwargs) or {})}
        self.conv = create_conv2d(self.conv_type, c1, c2, kernel, s, padding, d, g, bias=False,
                                  **kwargs)
        self.bn: nn.Module = nn.BatchNorm2d(c2)
        self.act = self.default_act if act is True else act if isinstance(act, nn.Module) else (
            nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x: Tensor) -> Tensor:
        """The forward pass once the BatchNorm is folded (Ultralytics calls this name)."""
        return self.act(self.conv(x))

    def fuse(self) -> bool:
        """Fold the BatchNorm into the convolution if that is exact; return whether it was."""
        if isinstance(self.bn, nn.BatchNorm2d) and fold_batchnorm(self.conv, self.bn):
            self.bn = nn.Identity()
            return True
        return False


class Bottleneck(_ConvTyped):
    """Two convolutions with an optional residual: ``Bottleneck(c1, c2, shortcut, g, k, e)``."""

    def __init__(
        self, c1: int, c2: int, shortcut: bool = True, g: int = 1, k: Sequence = (3, 3),
        e: float = 0.5, *, conv_type: str | None = None, conv_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        spec = self._conv_spec(conv_type, conv_kwargs)
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, k[0], 1, **spec)
        self.cv2 = Conv(c_, c2, k[1], 1, g=g, **spec)
        self.add = shortcut and c1 == c2

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(_ConvTyped):
    """CSP bottleneck with three convolutions: ``C3(c1, c2, n, shortcut, g, e)``."""

    def __init__(
        self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5,
        *, conv_type: str | None = None, conv_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        spec = self._conv_spec(conv_type, conv_kwargs)
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(
            *(Bottleneck(c_, c_, shortcut, g, k=((1, 1), (3, 3)), e=1.0, **spec) for _ in range(n))
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class C3k(C3):
    """C3 with ``k`` x ``k`` bottlenecks: ``C3k(c1, c2, n, shortcut, g, e, k)``."""

    def __init__(
        self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5,
        k: int = 3, *, conv_type: str | None = None, conv_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(c1, c2, n, shortcut, g, e, **self._placeholder(conv_type, conv_kwargs))
        spec = self._conv_spec(conv_type, conv_kwargs)
        c_ = int(c2 * e)
        self.m = nn.Sequential(
            *(Bottleneck(c_, c_, shortcut, g, k=(k, k), e=1.0, **spec) for _ in range(n))
        )


class C2f(_ConvTyped):
    """CSP bottleneck with two convolutions (YOLOv8): ``C2f(c1, c2, n, shortcut, g, e)``."""

    def __init__(
        self, c1: int, c2: int, n: int = 1, shortcut: bool = False, g: int = 1, e: float = 0.5,
        *, conv_type: str | None = None, conv_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        spec = self._conv_spec(conv_type, conv_kwargs)
        self.c = int(c2 * e)
        self.cv1 = Conv(c1, 2 * self.c, 1, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(
            Bottleneck(self.c, self.c, shortcut, g, k=((3, 3), (3, 3)), e=1.0, **spec)
            for _ in range(n)
        )

    def forward(self, x: Tensor) -> Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))

    def forward_split(self, x: Tensor) -> Tensor:
        """The same with ``split`` instead of ``chunk`` (Ultralytics' exporter switches to it)."""
        y = list(self.cv1(x).split((self.c, self.c), 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class C3k2(C2f):
    """YOLO11's C2f with C3k or Bottleneck inner blocks:
    ``C3k2(c1, c2, n, c3k, e, attn, g, shortcut)`` (``attn=True``, YOLO26's PSA blocks, is not
    supported)."""

    def __init__(
        self, c1: int, c2: int, n: int = 1, c3k: bool = False, e: float = 0.5, attn: bool = False,
        g: int = 1, shortcut: bool = True, *, conv_type: str | None = None,
        conv_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if attn:
            raise ValueError("C3k2 with attn=True (PSA blocks) is not supported by dynconv")
        super().__init__(c1, c2, n, shortcut, g, e, **self._placeholder(conv_type, conv_kwargs))
        spec = self._conv_spec(conv_type, conv_kwargs)
        self.m = nn.ModuleList(
            C3k(self.c, self.c, 2, shortcut, g, **spec) if c3k
            else Bottleneck(self.c, self.c, shortcut, g, **spec)
            for _ in range(n)
        )


def fuse_blocks(model: nn.Module) -> int:
    """Fold every ``Conv`` block's BatchNorm into its convolution where exact; return how many."""
    model.eval()
    return sum(m.fuse() for m in model.modules() if isinstance(m, Conv))


# -- dynamic variants, one class per (block, type), importable by name (checkpoints pickle them)

TYPE_SUFFIXES = {"dynamic": "DynamicConv", "condconv": "CondConv", "odconv": "ODConv",
                 "drconv": "DRConv", "kw": "KWConv"}
_BASES = (Conv, Bottleneck, C3, C3k, C2f, C3k2)
VARIANTS: dict[str, type[nn.Module]] = {}


def _variant_name(base: type, suffix: str) -> str:
    return suffix if base is Conv else f"{base.__name__}_{suffix}"


def _make_variant(base: type, conv_type: str, suffix: str) -> type:
    name = _variant_name(base, suffix)
    doc = f"Ultralytics-style ``{base.__name__}`` whose dynamic convolutions are {conv_type!r}."
    cls = type(name, (base,), {"conv_type": conv_type, "__doc__": doc, "__module__": __name__})
    cls.__qualname__ = name
    return cls


for _conv_type, _suffix in TYPE_SUFFIXES.items():
    for _base in _BASES:
        _cls = _make_variant(_base, _conv_type, _suffix)
        VARIANTS[_cls.__name__] = _cls
        globals()[_cls.__name__] = _cls
        __all__.append(_cls.__name__)

YAML_NAMES: dict[str, type[nn.Module]] = {
    **VARIANTS,
    "Dynamic_conv2d": VARIANTS["DynamicConv"],  # the name seed 001's YOLOv5 YAMLs use
}
"""Name in a YOLO model YAML -> block class: what the integrations register."""
