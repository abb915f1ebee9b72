"""dynconv's classes in a ``torch.load(..., weights_only=True)``, only where asked for.

A pickled whole model (an Ultralytics ``best.pt``) names the classes it is built from; a
``weights_only`` load builds only the classes on torch's allow-list, and calls each with the
arguments the file gives. ``import dynconv`` adds nothing to that list: a plain
``torch.load(weights_only=True)`` allows after it exactly what it allowed before. Three ways in:

- :func:`safe_load_globals`, a context manager: the package's classes are allowed inside the
  ``with`` block only (the Ultralytics integration wraps its own safe-mode loads in it);
- :func:`allow_weights_only_load`, the explicit global opt-in, for the rest of the process;
- ``weights_only=False``, for files you trust.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .. import _conv_args, blocks, layers, models

__all__ = ["allow_weights_only_load", "module_classes", "safe_load_globals"]

_MODULE_PACKAGES = (layers, blocks, models)
_STATE_MODULES = (_conv_args,)  # dataclasses held by the layers (their geometry)


@functools.cache
def module_classes() -> tuple[type, ...]:
    """The classes a pickled model of the package (an Ultralytics ``best.pt``) may reference:
    every ``nn.Module`` that dynconv defines in its layers, blocks and models, and the
    dataclasses the layers keep as attributes."""
    for package in _MODULE_PACKAGES:
        for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            importlib.import_module(info.name)
    prefixes = tuple(m.__name__ for m in _MODULE_PACKAGES + _STATE_MODULES)
    found = {
        obj for name, module in list(sys.modules.items())
        if name.startswith(prefixes)
        for obj in vars(module).values()
        if isinstance(obj, type) and obj.__module__ == name
        and (issubclass(obj, nn.Module) or dataclasses.is_dataclass(obj))
    }
    return tuple(sorted(found, key=lambda cls: f"{cls.__module__}.{cls.__qualname__}"))


_lock = threading.Lock()
_depth = 0  # how many safe_load_globals blocks are open, in every thread
_scope: torch.serialization.safe_globals | None = None  # what the outermost block added


@contextmanager
def safe_load_globals() -> Iterator[None]:
    """Allow the package's classes (:func:`module_classes`) in ``weights_only`` loads inside
    the ``with`` block::

        with dynconv.safe_load_globals():
            model = YOLO("best.pt")  # with ULTRALYTICS_SAFE_LOAD=1

    Built on ``torch.serialization.safe_globals``, with two differences: classes that were
    already allowed before the block stay allowed after it, and blocks may nest or overlap across
    threads (the classes leave the list when the last open block closes). As with torch's own,
    the list is the process's: another thread's ``weights_only`` load that runs meanwhile sees
    them too.
    """
    global _depth, _scope
    with _lock:
        if _depth == 0:
            allowed = set(torch.serialization.get_safe_globals())
            _scope = torch.serialization.safe_globals(
                [cls for cls in module_classes() if cls not in allowed])
            _scope.__enter__()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _scope is not None:
                _scope.__exit__(None, None, None)
                _scope = None


def allow_weights_only_load() -> None:
    """Allow the package's classes in every ``torch.load(..., weights_only=True)`` for the rest of
    the process: the global opt-in (``import dynconv`` does not call it). A crafted file may then
    call any of these constructors with any arguments, so prefer :func:`safe_load_globals`
    around the loads that need them."""
    global _scope
    with _lock:
        torch.serialization.add_safe_globals(list(module_classes()))
        _scope = None  # an open safe_load_globals block must not take them away when it closes
