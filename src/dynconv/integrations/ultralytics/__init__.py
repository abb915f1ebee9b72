"""Ultralytics YOLO with dynamic convolutions, without editing Ultralytics.

Importing this module (``pip install 'dynconv[yolo]'``) registers the package's YOLO blocks
(:mod:`dynconv.blocks.yolo`: ``C2f_ODConv``, ``C3k2_DynamicConv``, ``DRConv``, ...) with
Ultralytics, so that model YAMLs naming them build, train, validate, fuse and export with the
usual API::

    import dynconv.integrations.ultralytics  # noqa: F401  (registers the blocks)
    from ultralytics import YOLO

    model = YOLO("yolo11n-odconv.yaml")  # a YAML shipped with dynconv, found by name
    model.train(data="data.yaml", epochs=100)

What :func:`register` does, all in memory and undone by :func:`unregister`:

- puts the block classes (and the seed-compatible name ``Dynamic_conv2d``) in
  ``ultralytics.nn.tasks``' namespace, where ``parse_model`` looks YAML names up;
- installs a ``parse_model`` recompiled from Ultralytics' own source in which every class test
  on the block reads the stock class it stands in for (:mod:`dynconv.integrations._patching`),
  so a ``C3k2_ODConv`` gets exactly ``C3k2``'s channels, width and depth scaling, repeats and
  special cases (the inner C3k forced at scales m/l/x, the v11 head);
- makes ``yaml_model_load`` find the YAMLs shipped in ``cfg/`` by name (a file of the same name
  in the working directory still wins);
- wraps ``BaseModel.fuse`` to fold BatchNorm into the dynamic blocks as well (exact);
- wraps ``torch_safe_load`` so that Ultralytics' safe-load mode (``ULTRALYTICS_SAFE_LOAD=1``)
  allows the package's classes during its own checkpoint loads, and only then
  (:func:`~dynconv.integrations.safe_load.safe_load_globals`);

GFLOPs in ``model.info()`` are right because ``import dynconv`` registers the layers' FLOP rules
with thop (:mod:`dynconv.tools.counters`). Checkpoints pickle the block classes by their
``dynconv.blocks.yolo`` path, so a saved ``best.pt`` loads wherever dynconv is installed; in
Ultralytics' safe-load mode, once this module is imported (or inside
``with dynconv.safe_load_globals():``).
"""

from __future__ import annotations

import functools
import re
import threading
from pathlib import Path
from typing import Any

from ...blocks import yolo as blocks
from .._patching import (
    ALIAS_FUNCTION,
    Patches,
    alias_parse_model,
    check_version,
    fuse_blocks_first,
    stock_aliases,
)
from ..safe_load import safe_load_globals

__all__ = [
    "BLOCKS",
    "CFG_DIR",
    "SUPPORTED_VERSIONS",
    "cfg_path",
    "is_registered",
    "register",
    "shipped_cfgs",
    "unregister",
]

SUPPORTED_VERSIONS = ((8, 4), (8, 5))
"""Ultralytics versions tested: ``>=8.4,<8.5`` (8.4.190)."""

CFG_DIR = Path(__file__).parent / "cfg"
"""The model YAMLs shipped with dynconv (scale-free names, ``scales:`` inside)."""

_STOCK_NAMES = {blocks.Conv: "Conv", blocks.Bottleneck: "Bottleneck", blocks.C3: "C3",
                blocks.C3k: "C3k", blocks.C2f: "C2f", blocks.C3k2: "C3k2"}

BLOCKS = blocks.YAML_NAMES
"""YAML name -> block class registered (:data:`dynconv.blocks.yolo.YAML_NAMES`)."""

_lock = threading.Lock()
_patches = Patches()


def shipped_cfgs() -> list[str]:
    """Names of the model YAMLs shipped with dynconv, e.g. ``['yolo11-odconv.yaml', ...]``."""
    return sorted(path.name for path in CFG_DIR.glob("*.yaml"))


def cfg_path(name: str) -> str:
    """Absolute path for a shipped model YAML, keeping the scale letter Ultralytics reads:
    ``cfg_path('yolov8s-odconv.yaml')`` -> ``.../cfg/yolov8s-odconv.yaml`` (built from
    ``yolov8-odconv.yaml`` at scale s). Raises ``ValueError`` for a name not shipped."""
    path = Path(name)
    unified = re.sub(r"(\d+)([nslmx])(.+)?$", r"\1\3", path.stem) + (path.suffix or ".yaml")
    if unified not in shipped_cfgs():
        raise ValueError(
            f"no shipped model YAML named {name!r}; expected one of {shipped_cfgs()} with an "
            "optional scale letter after the version (e.g. 'yolo11s-odconv.yaml')"
        )
    return str(CFG_DIR / (path.stem + (path.suffix or ".yaml")))


def _resolve_cfg(path: Any) -> Any:
    """A shipped YAML's path for a bare name that is not a file here; ``path`` otherwise."""
    if isinstance(path, (str, Path)) and not Path(path).exists() and Path(path).parent == Path():
        try:
            return cfg_path(str(path))
        except ValueError:
            return path
    return path


def register() -> None:
    """Register the blocks with the installed Ultralytics (idempotent, thread-safe).

    Raises ``RuntimeError`` naming the tested range if the Ultralytics version is not supported
    or its ``parse_model`` no longer has the class tests this relies on.
    """
    with _lock:
        if _patches:
            return
        import ultralytics
        import ultralytics.engine.model as engine_model
        from ultralytics.nn import tasks
        from ultralytics.nn.modules import block as stock_blocks
        from ultralytics.nn.modules import conv as stock_convs

        check_version("ultralytics", ultralytics.__version__, SUPPORTED_VERSIONS, "8.4.190")
        aliases = stock_aliases(set(BLOCKS.values()), _STOCK_NAMES, stock_blocks, stock_convs)
        parse_model = alias_parse_model(tasks, aliases)
        load = tasks.yaml_model_load

        @functools.wraps(load)
        def yaml_model_load(path):
            return load(_resolve_cfg(path))

        safe_load = tasks.torch_safe_load

        @functools.wraps(safe_load)
        def torch_safe_load(weight, safe_only=None):
            if not (tasks.SAFE_LOAD if safe_only is None else safe_only):
                return safe_load(weight, safe_only)  # weights_only=False: nothing to allow
            with safe_load_globals():
                return safe_load(weight, safe_only)

        _patches.update(tasks, BLOCKS)
        _patches.set(tasks, "parse_model", parse_model)
        _patches.set(tasks, "yaml_model_load", yaml_model_load)
        _patches.set(engine_model, "yaml_model_load", yaml_model_load)
        _patches.set(tasks, "torch_safe_load", torch_safe_load)
        _patches.set(tasks.BaseModel, "fuse", fuse_blocks_first(tasks.BaseModel.fuse))


def unregister() -> None:
    """Undo :func:`register`."""
    with _lock:
        _patches.undo()
        # alias_parse_model put its lookup table in the module: drop it too
        from ultralytics.nn import tasks

        vars(tasks).pop(ALIAS_FUNCTION, None)


def is_registered() -> bool:
    """Whether :func:`register` is in effect."""
    return bool(_patches)


register()
