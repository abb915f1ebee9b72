"""Load checkpoints as they are published: wrapped in a training dict, prefixed by
DistributedDataParallel or ``torch.compile``, or saved as safetensors, with a clear report of
the keys that do not fit."""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

# Keys under which training scripts store the model's state_dict (official ODConv: 'state_dict';
# ConvNeXt-style scripts and Ultralytics: 'model').
WRAPPER_KEYS = ("state_dict", "model")
# Prefixes left by nn.DataParallel / DistributedDataParallel and by torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_LISTED_KEYS = 20


@dataclass(frozen=True)
class LoadResult:
    """What :func:`load_checkpoint` did.

    ``missing_keys``: in the model, absent from the checkpoint; ``unexpected_keys``: in the
    checkpoint, absent from the model; ``unwrapped``: the wrapper keys followed to reach the
    state_dict (e.g. ``('state_dict',)``); ``stripped_prefixes``: the key prefixes removed (e.g.
    ``('module.',)``).
    """

    missing_keys: list[str]
    unexpected_keys: list[str]
    unwrapped: tuple[str, ...] = ()
    stripped_prefixes: tuple[str, ...] = ()

    @property
    def exact(self) -> bool:
        """True when every key of the model was loaded and nothing was left over."""
        return not self.missing_keys and not self.unexpected_keys

    def __str__(self) -> str:
        return _describe(self.missing_keys, self.unexpected_keys) or "all keys matched"


def load_checkpoint(
    model: nn.Module,
    checkpoint: str | os.PathLike | Mapping[str, Any],
    *,
    strict: bool = True,
    map_location: Any = "cpu",
    weights_only: bool = True,
) -> LoadResult:
    """Load a checkpoint into ``model`` and report what did not fit.

    Args:
        model: any ``nn.Module`` (a single layer or a whole network).
        checkpoint: a path (``torch.save`` file, or ``.safetensors`` when the ``safetensors``
            package is installed) or an already loaded object: a state_dict, a training dict
            that holds it under ``'state_dict'`` or ``'model'`` (followed as deep as needed; a
            module found there gives its state_dict), with or without the ``module.`` prefix of
            DistributedDataParallel or the ``_orig_mod.`` prefix of ``torch.compile``.
        strict: raise a ``ValueError`` listing the missing and unexpected keys if there are
            any. As with ``load_state_dict``, the tensors that do fit are loaded before it is
            raised. With ``strict=False`` the returned result lists them.
        map_location: passed to ``torch.load``.
        weights_only: passed to ``torch.load``; set it to False only for files you trust that
            pickle Python objects (``argparse.Namespace`` arguments, whole modules).

    Returns:
        a :class:`LoadResult`.

    Raises:
        TypeError: ``model`` or ``checkpoint`` is of the wrong type.
        ValueError: no state_dict found in the checkpoint, a tensor of the wrong shape, or (in
            strict mode) missing or unexpected keys.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = _read(os.fspath(checkpoint), map_location, weights_only)
    state_dict, unwrapped = _unwrap(checkpoint)
    state_dict, stripped = _strip_prefixes(state_dict, model.state_dict().keys())
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # size mismatches: torch lists them
        raise ValueError(f"the checkpoint does not fit {type(model).__name__}: {error}") from error
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if strict and (missing or unexpected):
        hint = ""
        if len(unexpected) == len(state_dict):
            hint = (
                f"\nnone of the checkpoint's {len(state_dict)} keys belongs to the model (first "
                f"checkpoint key: {next(iter(state_dict))!r}); is it the right model?"
            )
        raise ValueError(
            f"the checkpoint does not match {type(model).__name__} "
            f"(load_checkpoint(..., strict=False) loads what fits):\n"
            f"{_describe(missing, unexpected)}{hint}"
        )
    return LoadResult(missing, unexpected, unwrapped, stripped)


def _read(path: str, map_location: Any, weights_only: bool) -> Any:
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as error:
            raise ImportError(
                f"{path} is a safetensors file: install the optional package `safetensors` "
                "to read it (pip install safetensors)"
            ) from error
        return load_file(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as error:
        if not weights_only:
            raise
        raise ValueError(
            f"{path} holds Python objects besides tensors, which torch.load(weights_only=True) "
            "refuses to unpickle; if you trust the file, call load_checkpoint(..., "
            f"weights_only=False). torch said: {str(error).splitlines()[0]}"
        ) from error


def _unwrap(obj: Any) -> tuple[Mapping[str, Any], tuple[str, ...]]:
    """Follow the wrapper keys down to the state_dict; return it and the keys followed."""
    followed: list[str] = []
    while True:
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
        if not isinstance(obj, Mapping):
            raise TypeError(
                "checkpoint must be a path, a state_dict or a dict that holds one under "
                f"{WRAPPER_KEYS}, got {type(obj).__name__}"
            )
        key = next(
            (k for k in WRAPPER_KEYS if isinstance(obj.get(k), (Mapping, nn.Module))), None
        )
        if key is None:
            break
        followed.append(key)
        obj = obj[key]
    if not any(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(
            f"found no tensors in the checkpoint{_path(followed)}: expected a state_dict, or a "
            f"dict holding one under {WRAPPER_KEYS}; its keys are {sorted(map(str, obj))[:10]}"
        )
    return obj, tuple(followed)


def _path(keys: list[str]) -> str:
    return "".join(f"[{k!r}]" for k in keys)


def _strip_prefixes(
    state_dict: Mapping[str, Any], model_keys
) -> tuple[Mapping[str, Any], tuple[str, ...]]:
    """Remove the prefixes of DDP and torch.compile when every key has one and the model's
    keys do not (the BatchNorm version metadata follows the keys)."""
    model_keys = list(model_keys)
    stripped: list[str] = []
    copied = False
    while True:
        prefix = next(
            (
                p for p in WRAPPER_PREFIXES
                if state_dict and all(k.startswith(p) for k in state_dict)
                and not (model_keys and all(k.startswith(p) for k in model_keys))
            ),
            None,
        )
        if prefix is None:
            return state_dict, tuple(stripped)
        if not copied:
            metadata = getattr(state_dict, "_metadata", None)
            state_dict = OrderedDict(state_dict)
            if metadata is not None:
                state_dict._metadata = OrderedDict(metadata)  # type: ignore[attr-defined]
            copied = True
        consume_prefix_in_state_dict_if_present(state_dict, prefix)  # type: ignore[arg-type]
        stripped.append(prefix)


def _describe(missing: list[str], unexpected: list[str]) -> str:
    lines = []
    for title, keys in (
        ("missing from the checkpoint", missing),
        ("unexpected (in the checkpoint, not in the model)", unexpected),
    ):
        if keys:
            shown = ", ".join(keys[:_LISTED_KEYS])
            more = f", ... and {len(keys) - _LISTED_KEYS} more" if len(keys) > _LISTED_KEYS else ""
            lines.append(f"{len(keys)} key(s) {title}: {shown}{more}")
    return "\n".join(lines)


_MODULE_PACKAGES = ("dynconv.layers", "dynconv.blocks", "dynconv.models")
_STATE_MODULES = ("dynconv._conv_args",)  # dataclasses held by the layers (their geometry)


def module_classes() -> list[type]:
    """The classes a pickled model of the package (an Ultralytics ``best.pt``) may reference:
    every ``nn.Module`` that dynconv defines in its layers, blocks and models, and the
    dataclasses the layers keep as attributes."""
    import dataclasses
    import importlib
    import pkgutil
    import sys

    for name in _MODULE_PACKAGES:
        package = importlib.import_module(name)
        for info in pkgutil.iter_modules(package.__path__, name + "."):
            importlib.import_module(info.name)
    for name in _STATE_MODULES:
        importlib.import_module(name)
    found = {
        obj for name, module in list(sys.modules.items())
        if name.startswith(_MODULE_PACKAGES + _STATE_MODULES)
        for obj in vars(module).values()
        if isinstance(obj, type) and obj.__module__ == name
        and (issubclass(obj, nn.Module) or dataclasses.is_dataclass(obj))
    }
    return sorted(found, key=lambda cls: f"{cls.__module__}.{cls.__qualname__}")


def allow_weights_only_load() -> None:
    """Let ``torch.load(..., weights_only=True)`` build dynconv's modules, as Ultralytics'
    safe-load mode (``ULTRALYTICS_SAFE_LOAD=1``) does for its own (called by ``import dynconv``)."""
    torch.serialization.add_safe_globals(module_classes())
