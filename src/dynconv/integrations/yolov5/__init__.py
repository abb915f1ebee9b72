"""YOLOv5 with dynamic convolutions, without pasting code into ``common.py`` and ``yolo.py``.

One call registers the package's YOLO blocks (:mod:`dynconv.blocks.yolo`: ``DynamicConv``,
``C3_ODConv``, ... and the seed-compatible name ``Dynamic_conv2d``) with YOLOv5's
``models/yolo.py``, so that model YAMLs naming them build, train, fuse and export with YOLOv5's
own scripts::

    from dynconv.integrations import yolov5 as dyn_yolov5

    yolo = dyn_yolov5.register()  # YOLOv5's models.yolo (pip package or a clone on sys.path)
    model = yolo.Model(dyn_yolov5.cfg_path("yolov5s-dynconv.yaml"), nc=80)

or, from the command line, with the usual ``train.py`` arguments (docs/yolo.md)::

    python -m dynconv.integrations.yolov5 train --cfg yolov5s-dynconv.yaml --weights '' ...

What :func:`register` does, all in memory and undone by :func:`unregister`:

- puts the block classes in the namespace of YOLOv5's ``models.yolo``, where ``parse_model``
  resolves YAML names with ``eval``;
- installs a ``parse_model`` recompiled from YOLOv5's own source in which every class test on
  the block (``m in {Conv, ..., C3x}``, ``m is Concat``, ...) reads the stock class it stands in
  for (:mod:`dynconv.integrations._patching`): ``DynamicConv``/``ODConv``/... get ``Conv``'s
  channel and width handling, ``C3_*`` (and ``C2f_*``, ``C3k2_*``, whose arguments are C3's)
  get ``C3``'s, repeats included;
- wraps ``BaseModel.fuse`` to fold BatchNorm into the dynamic blocks as well (exact);
- wraps ``model_info`` (the model summary) so that the GFLOPs of a model holding dynamic
  layers are counted at the image size itself (see below).

Checkpoints pickle the block classes by their ``dynconv.blocks.yolo`` path, so a saved
``best.pt`` loads wherever dynconv is installed (``import dynconv`` is enough to unpickle it).
GFLOPs in YOLOv5's model summary count the dynamic layers because ``import dynconv`` registers
their rules with thop (:mod:`dynconv.tools.counters`). YOLOv5 profiles a model at 32x32 and
multiplies by the area ratio, right for convolutions but not for the attention's fixed
per-image cost, which it would multiply by 400 at 640 (yolov5s: 17.2 GFLOPs shown for DY-Conv
and 19.9 for ODConv where 16.6 run). For a model with dynamic layers the wrapped ``model_info``
has thop profile at the image size itself, so the summary shows what runs (docs/yolo.md).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import re
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import MethodType, ModuleType
from typing import Any

from ...blocks import yolo as blocks
from ...layers.base import DynamicConvBase
from .._patching import (
    ALIAS_FUNCTION,
    Patches,
    alias_parse_model,
    check_version,
    fuse_blocks_first,
    parse_version,
    stock_aliases,
)

__all__ = [
    "BLOCKS",
    "CFG_DIR",
    "SCALES",
    "SUPPORTED_VERSIONS",
    "cfg_path",
    "compat",
    "find_module",
    "is_registered",
    "local_font",
    "register",
    "resolve_cfg",
    "shipped_cfgs",
    "unregister",
]

SUPPORTED_VERSIONS = ((7, 0), (7, 1))
"""Versions of the pip package ``yolov5`` tested: ``>=7.0,<7.1`` (7.0.14, which packages
ultralytics/yolov5 v7.0). A git clone has no version: its layout is checked instead."""

CFG_DIR = Path(__file__).parent / "cfg"
"""The model YAMLs shipped with dynconv (scale-free names, multiples of scale s inside)."""

SCALES = {"n": (0.33, 0.25), "s": (0.33, 0.50), "m": (0.67, 0.75), "l": (1.0, 1.0),
          "x": (1.33, 1.25)}
"""YOLOv5's (depth_multiple, width_multiple) per scale letter."""

BLOCKS = blocks.YAML_NAMES
"""YAML name -> block class registered (:data:`dynconv.blocks.yolo.YAML_NAMES`)."""

# YOLOv5 has no C2f/C3k/C3k2: their variants take C3's arguments (c1, c2, n, shortcut, ...),
# so parse_model treats them as C3 (channels, width, repeats folded into the arguments).
_STOCK_NAMES = {blocks.Conv: "Conv", blocks.Bottleneck: "Bottleneck", blocks.C3: "C3",
                blocks.C2f: "C3"}
_REQUIRED = ("parse_model", "BaseModel", "Conv", "Bottleneck", "C3", "Detect", "Concat")

_lock = threading.RLock()
_patches: dict[str, tuple[ModuleType, Patches]] = {}  # module name -> (module, its patches)


def _in_pip_package(module: ModuleType) -> bool:
    """Whether ``module`` is a file of the pip package ``yolov5`` (imported under another name:
    YOLOv5's ``attempt_load`` imports ``models.yolo`` from the package folder)."""
    package = sys.modules.get("yolov5")
    file = getattr(module, "__file__", None)
    if package is None or not file or not getattr(package, "__file__", None):
        return False
    return Path(file).resolve().is_relative_to(Path(package.__file__).resolve().parent)


def find_module(module: ModuleType | str | None = None) -> ModuleType:
    """YOLOv5's ``models.yolo`` module: ``module`` itself (or the module of that name), else a
    clone's ``models.yolo`` already imported, else the pip package's ``yolov5.models.yolo``,
    else a clone's ``models.yolo`` importable from ``sys.path``. Raises ``ImportError`` if none.
    """
    if isinstance(module, ModuleType):
        return module
    if isinstance(module, str):
        return importlib.import_module(module)
    clone = sys.modules.get("models.yolo")
    if clone is not None and not _in_pip_package(clone):
        return clone
    try:
        return importlib.import_module("yolov5.models.yolo")
    except ModuleNotFoundError as error:
        if error.name != "yolov5":
            raise
    try:
        return importlib.import_module("models.yolo")
    except ModuleNotFoundError as error:
        if error.name not in ("models", "models.yolo"):
            raise
        raise ImportError(
            "YOLOv5 not found: install the package (pip install --no-deps yolov5==7.0.14, then "
            "pip install 'dynconv[yolov5]'), or put the root of a YOLOv5 clone on sys.path "
            "(run from it), or pass its models.yolo module to register()"
        ) from None


def _check_layout(module: ModuleType) -> None:
    missing = [name for name in _REQUIRED if name not in vars(module)]
    if missing or not callable(getattr(vars(module).get("BaseModel"), "fuse", None)):
        raise RuntimeError(
            f"{module.__name__} ({getattr(module, '__file__', '?')}) is not a YOLOv5 "
            f"models/yolo.py that dynconv supports (missing {', '.join(missing) or 'fuse'}); "
            "tested with ultralytics/yolov5 v7.0 (pip yolov5 7.0.14)"
        )
    package = sys.modules.get("yolov5")
    if module.__name__.startswith("yolov5.") and package is not None:
        check_version("yolov5", getattr(package, "__version__", "0"), SUPPORTED_VERSIONS,
                      "7.0.14")


class _ThopAtImageSize:
    """Stands in for ``thop`` in the namespace of YOLOv5's ``model_info`` during one call.

    ``model_info`` runs ``thop.profile(model, inputs=(im,))`` on a ``stride x stride`` image
    ``im`` and multiplies the count by ``(H / stride) * (W / stride)``; :meth:`profile` runs thop
    on an image of the full size ``(H, W)`` instead and returns its count divided by that area
    ratio, so that the figure printed is thop's count at ``(H, W)``.
    """

    def __init__(self, thop: ModuleType, size: tuple[int, int]) -> None:
        self.thop, self.size = thop, size

    def profile(self, model, inputs: tuple, **kwargs: Any) -> tuple[float, float]:
        (image,) = inputs  # [1, C, stride, stride]
        height, width = self.size
        full = image.new_zeros((*image.shape[:-2], height, width))
        ops, params = self.thop.profile(model, inputs=(full,), **kwargs)
        return ops * image.shape[-2] * image.shape[-1] / (height * width), params


def _profile_at_image_size(model_info: Callable) -> Callable:
    """Wrap YOLOv5's ``model_info(model, verbose=False, imgsz=640)``: a model holding dynamic
    layers is profiled by thop at ``imgsz`` itself, where YOLOv5 profiles at 32x32 and scales
    by area (which multiplies the attentions' fixed per-image cost); other models as before."""
    namespace = model_info.__globals__  # utils/torch_utils.py, where model_info reads ``thop``
    lock = threading.Lock()

    @functools.wraps(model_info)
    def wrapper(model, verbose=False, imgsz=640):
        thop = namespace.get("thop")
        if thop is None or not any(isinstance(m, DynamicConvBase) for m in model.modules()):
            return model_info(model, verbose, imgsz)
        height, width = imgsz if isinstance(imgsz, (list, tuple)) else (imgsz, imgsz)
        with lock:
            namespace["thop"] = _ThopAtImageSize(thop, (int(height), int(width)))
            try:
                return model_info(model, verbose, imgsz)
            finally:
                namespace["thop"] = thop

    wrapper.__dynconv_original__ = model_info
    return wrapper


def register(module: ModuleType | str | None = None) -> ModuleType:
    """Register the blocks with YOLOv5's ``models.yolo`` (see :func:`find_module` for which one
    when ``module`` is None) and return that module. Idempotent and thread-safe.

    Raises ``ImportError`` if no YOLOv5 is found and ``RuntimeError`` naming the tested version
    if the module is not a YOLOv5 ``models/yolo.py`` this supports.
    """
    with _lock:
        module = find_module(module)
        if module.__name__ in _patches:
            return module
        _check_layout(module)
        aliases = stock_aliases(set(BLOCKS.values()), _STOCK_NAMES, module)
        parse_model = alias_parse_model(module, aliases)
        patches = Patches()
        patches.update(module, BLOCKS)
        patches.set(module, "parse_model", parse_model)
        patches.set(module.BaseModel, "fuse", fuse_blocks_first(module.BaseModel.fuse))
        if callable(vars(module).get("model_info")):
            patches.set(module, "model_info", _profile_at_image_size(module.model_info))
        _patches[module.__name__] = (module, patches)
        return module


def unregister(module: ModuleType | str | None = None) -> None:
    """Undo :func:`register` for ``module`` (by module or name), or everywhere if None."""
    with _lock:
        name = module.__name__ if isinstance(module, ModuleType) else module
        for key in [name] if name is not None else list(_patches):
            target, patches = _patches.pop(key, (None, None))
            if patches is not None:
                patches.undo()
                vars(target).pop(ALIAS_FUNCTION, None)


def is_registered(module: ModuleType | str | None = None) -> bool:
    """Whether :func:`register` is in effect for ``module`` (anywhere, if None)."""
    name = module.__name__ if isinstance(module, ModuleType) else module
    return bool(_patches) if name is None else name in _patches


def shipped_cfgs() -> list[str]:
    """Names of the model YAMLs shipped with dynconv, e.g. ``['yolov5-dynconv.yaml', ...]``."""
    return sorted(path.name for path in CFG_DIR.glob("*.yaml"))


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "dynconv" / "yolov5"


def cfg_path(name: str, out_dir: str | Path | None = None) -> str:
    """Absolute path of a shipped model YAML, for ``--cfg`` or ``Model(...)``.

    ``'yolov5-dynconv.yaml'`` is the shipped file (multiples of s). With a scale letter,
    ``'yolov5m-dynconv.yaml'``, YOLOv5 itself reads no scale: the file is written (once) to
    ``out_dir`` (default ``~/.cache/dynconv/yolov5``) with that scale's ``depth_multiple`` and
    ``width_multiple`` (:data:`SCALES`), keeping the name, which YOLOv5 shows in its summary.
    Raises ``ValueError`` for a name not shipped.
    """
    path = Path(name)
    match = re.fullmatch(r"yolov5([nsmlx]?)(-.+)", path.stem)
    shipped = f"yolov5{match[2]}.yaml" if match else None
    if shipped not in shipped_cfgs() or path.suffix not in ("", ".yaml", ".yml"):
        raise ValueError(
            f"no shipped model YAML named {name!r}; expected one of {shipped_cfgs()} with an "
            f"optional scale letter {'/'.join(SCALES)} after 'yolov5' (e.g. 'yolov5s-odconv.yaml')"
        )
    if not match[1]:
        return str(CFG_DIR / shipped)
    depth, width = SCALES[match[1]]
    text = (CFG_DIR / shipped).read_text()
    text = re.sub(r"(?m)^depth_multiple:\s*[\d.]+", f"depth_multiple: {depth}", text)
    text = re.sub(r"(?m)^width_multiple:\s*[\d.]+", f"width_multiple: {width}", text)
    target = Path(out_dir) if out_dir is not None else _cache_dir()
    target.mkdir(parents=True, exist_ok=True)
    out = target / f"{path.stem}.yaml"
    if not out.exists() or out.read_text() != text:
        partial = out.with_name(f".{out.name}.{os.getpid()}.{threading.get_ident()}")
        partial.write_text(text)
        partial.replace(out)  # atomic: concurrent callers never see half a file
    return str(out.resolve())


def resolve_cfg(cfg: str) -> str:
    """``cfg`` if it is a file (or not a shipped name), else its :func:`cfg_path`."""
    if not cfg or Path(cfg).exists() or Path(cfg).parent != Path():
        return cfg
    try:
        return cfg_path(cfg)
    except ValueError:
        return cfg


def _font_file(function: Callable, font: str | Path) -> Path | None:
    """The file YOLOv5's ``function`` (``check_font``, ``check_pil_font``) takes for ``font``:
    the path itself, else its name in the ``CONFIG_DIR`` of the function's module (read at call
    time); None if neither is a file (where YOLOv5 would download it)."""
    settings = function.__globals__["CONFIG_DIR"]
    for path in (Path(font), Path(settings) / Path(font).name):
        if path.is_file():
            return path
    return None


def local_font() -> str:
    """Path of the TTF that YOLOv5's plots use where YOLOv5 would download ``Arial.ttf``
    (:func:`compat`): DejaVu Sans, shipped with matplotlib, which YOLOv5's plots import."""
    import matplotlib

    return str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf")


def _getsize(font, text: str, *args: Any, **kwargs: Any) -> tuple[int, int]:
    """Pillow 9's ``FreeTypeFont.getsize(text)``: (right, bottom) of ``getbbox(text)``, the
    size with the offset from the drawing origin (YOLOv5's own later fix reads the same)."""
    _, _, right, bottom = font.getbbox(text, *args, **kwargs)
    return right, bottom


def _arguments(function: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
    """``function``'s arguments by name for a call with ``args`` and ``kwargs``, defaults
    included."""
    bound = inspect.signature(function).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def _check_font_offline(check_font: Callable) -> Callable:
    """Wrap YOLOv5's ``check_font(font=FONT, progress=False)``, which downloads a font missing
    from ``CONFIG_DIR``: a missing font stays missing (``check_pil_font`` draws with
    :func:`local_font` instead); otherwise as before."""

    @functools.wraps(check_font)
    def wrapper(*args, **kwargs):
        if _font_file(check_font, _arguments(check_font, args, kwargs)["font"]) is None:
            return None
        return check_font(*args, **kwargs)

    wrapper.__dynconv_original__ = check_font
    return wrapper


def _check_pil_font_local(check_pil_font: Callable) -> Callable:
    """Wrap YOLOv5's ``check_pil_font(font=FONT, size=10)``: the font as before if YOLOv5 has
    its file, else :func:`local_font` at that size (no download); either way with a
    ``getsize`` method where Pillow has none (Pillow 10 removed it; YOLOv5 7.0's ``Annotator``
    calls it)."""
    from PIL import ImageFont

    @functools.wraps(check_pil_font)
    def wrapper(*args, **kwargs):
        arguments = _arguments(check_pil_font, args, kwargs)
        if _font_file(check_pil_font, arguments["font"]) is None:
            loaded = ImageFont.truetype(local_font(), arguments["size"])
        else:
            loaded = check_pil_font(*args, **kwargs)
        if loaded is not None and not hasattr(loaded, "getsize"):
            loaded.getsize = MethodType(_getsize, loaded)
        return loaded

    wrapper.__dynconv_original__ = check_pil_font
    return wrapper


def _compat_fonts(yolo: ModuleType) -> list[str]:
    """YOLOv5's fonts without a download, and ``getsize`` on them for Pillow >= 10 (see
    :func:`compat`); ``yolo`` is YOLOv5's ``models.yolo``, which names the package's root."""
    from PIL import ImageFont

    root = yolo.__name__[: -len("models.yolo")]  # 'yolov5.' for the package, '' for a clone
    general = importlib.import_module(f"{root}utils.general")
    plots = importlib.import_module(f"{root}utils.plots")
    if hasattr(plots.check_pil_font, "__dynconv_original__"):
        return []
    plots.check_pil_font = _check_pil_font_local(plots.check_pil_font)
    for module in (general, plots):  # plots imported its own name for check_font
        module.check_font = _check_font_offline(module.check_font)
    changed = [f"fonts missing from {general.CONFIG_DIR}: {Path(local_font()).name} "
               "(matplotlib), not downloaded"]
    if not hasattr(ImageFont.FreeTypeFont, "getsize"):
        changed.append("fonts: getsize from getbbox")
    return changed


def compat(module: ModuleType | str | None = None) -> list[str]:
    """Let YOLOv5 7.0's scripts (train/val/detect/export) run offline with today's libraries;
    return what was changed. The launcher calls it; call it before ``yolov5.train.run(...)``
    yourself. ``module`` picks the YOLOv5 as for :func:`register` (by default the package, or
    a clone's ``models.yolo`` already imported).

    - torch >= 2.6 loads checkpoints with ``weights_only=True`` by default, but YOLOv5 pickles
      whole models and loads them with plain ``torch.load``: sets
      ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` (torch's own switch back to the old default;
      explicit ``weights_only=`` arguments still win), unless either switch is already set.
      Only load checkpoints you trust, as with any YOLOv5 checkpoint.
    - NumPy 2.4 removed ``np.trapz`` (YOLOv5's mAP): aliases it to ``np.trapezoid``.
    - huggingface_hub 1.0 removed ``huggingface_hub.utils._errors`` (imported by YOLOv5's
      ``train.py`` for every run): aliases it to ``huggingface_hub.errors``.
    - YOLOv5 downloads ``Arial.ttf`` (``Arial.Unicode.ttf`` for non-ASCII class names) into its
      settings folder ``CONFIG_DIR`` when checking a data set and for its plots: wraps
      ``utils.general.check_font`` and ``utils.plots.check_font``/``check_pil_font`` so that a
      font missing there is not downloaded and :func:`local_font` (DejaVu Sans) is drawn with
      instead; a font that is there is used as before. Changes nothing on disk.
    - Pillow 10 removed ``FreeTypeFont.getsize``, which YOLOv5's ``Annotator`` calls for every
      label it draws with PIL (training and validation plots; ``detect`` with non-ASCII class
      names): the fonts ``check_pil_font``
      returns get a ``getsize`` computed from ``getbbox``, Pillow's own class is left alone.

    Idempotent: a second call changes nothing and returns ``[]``.
    """
    changed = []
    switches = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    import torch

    if parse_version(torch.__version__)[:2] >= (2, 6) and not any(map(os.environ.get, switches)):
        os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
        changed.append("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1")
    import numpy as np

    if not hasattr(np, "trapz") and hasattr(np, "trapezoid"):
        np.trapz = np.trapezoid
        changed.append("numpy.trapz = numpy.trapezoid")
    try:
        importlib.import_module("huggingface_hub.utils._errors")
    except ModuleNotFoundError as error:
        if error.name == "huggingface_hub.utils._errors":
            sys.modules[error.name] = importlib.import_module("huggingface_hub.errors")
            changed.append("huggingface_hub.utils._errors = huggingface_hub.errors")
    with _lock:
        changed += _compat_fonts(find_module(module))
    return changed
