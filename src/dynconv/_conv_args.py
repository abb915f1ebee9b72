"""Parsing and checking of ``nn.Conv2d``-style arguments, shared by the core op and every layer.

Every check raises a ``TypeError`` or ``ValueError`` that names the argument, what was expected
and what was given, so that mistakes surface at construction instead of deep inside torch.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch

Pair = tuple[int, int]
PaddingArg = int | Sequence[int] | str
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
PADDING_STRINGS = ("same", "valid")


def _is_int(value: object) -> bool:
    # bool is an int subclass, but `kernel_size=True` is always a mistake.
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(value: object, name: str, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum``; raise a clear error otherwise."""
    if isinstance(value, torch.Tensor) and torch.jit.is_tracing() and value.dim() == 0:
        value = int(value)  # a shape element recorded by the TorchScript tracer: static here
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        bound = "positive" if minimum == 1 else f">= {minimum}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def to_pair(value: object, name: str, minimum: int = 1) -> Pair:
    """Accept an int or a pair of ints (each >= ``minimum``) and return a pair."""
    if _is_int(value):
        return (check_int(value, name, minimum),) * 2
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        return (check_int(value[0], name, minimum), check_int(value[1], name, minimum))
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def check_bool(value: object, name: str) -> bool:
    """Return ``value`` if it is a bool (not merely truthy: ``bias=1`` and ``bias='no'`` are
    refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} "
                        f"({type(value).__name__})")
    return value


def check_positive_float(value: object, name: str) -> float:
    """Return ``value`` as a float if it is a finite real number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def same_padding(kernel_size: Pair, dilation: Pair) -> tuple[int, int, int, int]:
    """Padding (left, right, top, bottom) that keeps the size at stride 1, as ``padding='same'``.

    Like ``F.conv2d``, an odd total puts the extra pixel on the right and bottom.
    """
    pads = []
    for k, d in zip(reversed(kernel_size), reversed(dilation), strict=False):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return tuple(pads)  # type: ignore[return-value]


@dataclass(frozen=True)
class ConvGeometry:
    """Checked geometry of a 2-D convolution.

    ``pads`` is (left, right, top, bottom), explicit even for ``'same'``; ``symmetric_padding`` is
    the (pad_h, pad_w) pair to hand to ``F.conv2d`` when both sides agree, else ``None``.
    """

    kernel_size: Pair
    stride: Pair
    dilation: Pair
    groups: int
    padding: Pair | str
    pads: tuple[int, int, int, int]

    @property
    def symmetric_padding(self) -> Pair | None:
        left, right, top, bottom = self.pads
        return (top, left) if left == right and top == bottom else None

    def output_size(self, height: int, width: int) -> Pair:
        """Output (H_out, W_out) for an input of (height, width); may be <= 0 if too small."""
        left, right, top, bottom = self.pads
        sizes = []
        for size, lo, hi, k, s, d in zip(
            (height, width), (top, left), (bottom, right), self.kernel_size, self.stride,
            self.dilation, strict=False,
        ):
            sizes.append((size + lo + hi - d * (k - 1) - 1) // s + 1)
        return sizes[0], sizes[1]

    def checked_output_size(self, height: int, width: int, caller: str = "") -> Pair:
        """:meth:`output_size`, or a ``ValueError`` if the input is too small for any output
        (the message starts with ``caller``, when given)."""
        h_out, w_out = self.output_size(height, width)
        if h_out <= 0 or w_out <= 0:
            prefix = f"{caller}: " if caller else ""
            raise ValueError(
                f"{prefix}input of spatial size {(height, width)} is too small for kernel_size="
                f"{self.kernel_size}, dilation={self.dilation}, padding={self.padding} "
                f"(the output would be {h_out}x{w_out})"
            )
        return h_out, w_out

    def without_padding(self) -> ConvGeometry:
        """The same convolution on an input already padded by :attr:`pads`."""
        return replace(self, padding=(0, 0), pads=(0, 0, 0, 0))


def _plain_key(args: tuple) -> tuple | None:
    """``args`` as a hashable key if each is a plain int, str or tuple of ints (no bools, no
    tensors), else None."""
    key = []
    for a in args:
        if type(a) is int or type(a) is str:
            key.append(a)
        elif isinstance(a, tuple) and all(type(e) is int for e in a):
            key.append(tuple(a))  # torch.Size included
        else:
            return None
    return tuple(key)


def parse_geometry(
    kernel_size: object,
    stride: object = 1,
    padding: object = 0,
    dilation: object = 1,
    groups: object = 1,
) -> ConvGeometry:
    """Check ``F.conv2d``-style arguments and return a :class:`ConvGeometry` (immutable; plain
    arguments are parsed once and the result reused: the functional ops parse on every call)."""
    args = (kernel_size, stride, padding, dilation, groups)
    key = _plain_key(args)
    return _parse_geometry(*args) if key is None else _parse_plain_geometry(key)


@functools.lru_cache(maxsize=512)
def _parse_plain_geometry(key: tuple) -> ConvGeometry:
    return _parse_geometry(*key)


def _parse_geometry(
    kernel_size: object, stride: object, padding: object, dilation: object, groups: object
) -> ConvGeometry:
    kernel = to_pair(kernel_size, "kernel_size")
    stride_ = to_pair(stride, "stride")
    dilation_ = to_pair(dilation, "dilation")
    groups_ = check_int(groups, "groups")
    if isinstance(padding, str):
        if padding not in PADDING_STRINGS:
            raise ValueError(
                f"padding must be an int, a pair of ints, 'same' or 'valid', got {padding!r}"
            )
        if padding == "same":
            if stride_ != (1, 1):
                raise ValueError(
                    f"padding='same' is only supported with stride 1 (as in nn.Conv2d), "
                    f"got stride={stride_}"
                )
            pads = same_padding(kernel, dilation_)
        else:
            pads = (0, 0, 0, 0)
        padding_: Pair | str = padding
    else:
        padding_ = to_pair(padding, "padding", minimum=0)
        pads = (padding_[1], padding_[1], padding_[0], padding_[0])
    return ConvGeometry(kernel, stride_, dilation_, groups_, padding_, pads)


def check_channels(in_channels: object, out_channels: object, groups: int) -> tuple[int, int]:
    """Check channel counts against ``groups``."""
    in_c = check_int(in_channels, "in_channels")
    out_c = check_int(out_channels, "out_channels")
    if in_c % groups:
        raise ValueError(f"in_channels ({in_c}) must be divisible by groups ({groups})")
    if out_c % groups:
        raise ValueError(f"out_channels ({out_c}) must be divisible by groups ({groups})")
    return in_c, out_c


def check_padding_mode(padding_mode: object) -> str:
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    return padding_mode  # type: ignore[return-value]


# -- other spellings of the keywords -------------------------------------------------------------

#: Keywords that the reference code spells otherwise, the layers' spelling first: ODConv's
#: ``kernel_num`` and ``min_channel`` (kept by the official zoo, ``od_resnet18(kernel_num=4)``),
#: DY-Conv's ``K`` and ``ratio``, DRConv's ``region_num``, and ``in_planes``/``out_planes``.
KEYWORD_SPELLINGS: tuple[tuple[str, ...], ...] = (
    ("num_kernels", "kernel_num", "K"),
    ("reduction", "ratio"),
    ("num_regions", "region_num"),
    ("min_channels", "min_channel"),
    ("in_channels", "in_planes"),
    ("out_channels", "out_planes"),
)
_CHANNEL_KEYWORDS = ("in_channels", "out_channels")  # never in conv_kwargs


def _spelling_hints(func: Callable[..., Any]) -> dict[str, str]:
    """For each other spelling of :data:`KEYWORD_SPELLINGS` that ``func`` does not take: what
    to write instead (its spelling of that keyword, or the ``conv_kwargs`` entry)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = {p.name for p in inspect.signature(func).parameters.values() if p.kind in kinds}
    hints = {}
    for spellings in KEYWORD_SPELLINGS:
        taken = [s for s in spellings if s in named]
        for other in spellings:
            if other in named:
                continue
            if taken:
                source = "the layers'" if other == spellings[0] else "the reference code's"
                hints[other] = f"use {taken[0]}= ({other} is {source} spelling)"
            elif "conv_kwargs" in named and spellings[0] not in _CHANNEL_KEYWORDS:
                hints[other] = (
                    "the convolutions' keywords go in conv_kwargs, spelt as the layers spell "
                    f"them: conv_kwargs={{{spellings[0]!r}: ...}}"
                )
    return hints


_Callable = TypeVar("_Callable", bound=Callable[..., Any])


def check_keyword_spellings(func: _Callable) -> _Callable:
    """Decorator for the layers' ``__init__`` and the models: a keyword of
    :data:`KEYWORD_SPELLINGS` that ``func`` does not take raises a ``TypeError`` that names the
    keyword to use (its other spelling, or a ``conv_kwargs`` entry) instead of Python's bare
    "unexpected keyword argument". Other keywords are left to Python."""
    hints = _spelling_hints(func)
    if not hints:
        return func
    is_init = func.__name__ == "__init__"

    @functools.wraps(func)
    def checked(*args: Any, **kwargs: Any) -> Any:
        wrong = next((key for key in kwargs if key in hints), None)
        if wrong is not None:
            name = type(args[0]).__name__ if is_init and args else func.__name__
            raise TypeError(
                f"{name}() got an unexpected keyword argument {wrong!r}: {hints[wrong]}"
            )
        return func(*args, **kwargs)

    return checked  # type: ignore[return-value]
