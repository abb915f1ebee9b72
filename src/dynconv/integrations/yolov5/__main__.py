"""Run YOLOv5's own scripts with dynconv's blocks registered (docs/yolo.md, "YOLOv5")::

    python -m dynconv.integrations.yolov5 train --cfg yolov5s-dynconv.yaml --weights '' \\
        --data data.yaml --epochs 100
    python -m dynconv.integrations.yolov5 val --weights runs/train/exp/weights/best.pt ...

The first argument picks the script (train, val, detect, export); every other argument is
passed to it unchanged, except ``--yolov5-dir DIR``, the root of a YOLOv5 clone to use instead
of the pip package (by default the working directory if it is a clone, i.e. holds ``train.py``
and ``models/yolo.py``). A ``--cfg`` naming a YAML shipped with dynconv that is not a file here
(``yolov5s-dynconv.yaml``) is replaced by its path (:func:`dynconv.integrations.yolov5.cfg_path`).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

from . import compat, register, resolve_cfg

SCRIPTS = ("train", "val", "detect", "export")


def _is_clone(folder: Path) -> bool:
    return (folder / "train.py").is_file() and (folder / "models" / "yolo.py").is_file()


def _resolve_cfg_args(args: list[str]) -> list[str]:
    out = list(args)
    for i, arg in enumerate(out):
        if arg == "--cfg" and i + 1 < len(out):
            out[i + 1] = resolve_cfg(out[i + 1])
        elif arg.startswith("--cfg="):
            out[i] = "--cfg=" + resolve_cfg(arg.split("=", 1)[1])
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dynconv.integrations.yolov5",
        description="Run a YOLOv5 script with dynconv's blocks registered; all other arguments "
        "go to the script (see its --help).",
    )
    parser.add_argument("script", choices=SCRIPTS)
    parser.add_argument("--yolov5-dir", type=Path, default=None,
                        help="root of a YOLOv5 clone (default: the working directory if it is "
                        "one, else the pip package yolov5)")
    ours, rest = parser.parse_known_args(argv)
    clone = ours.yolov5_dir or (Path.cwd() if _is_clone(Path.cwd()) else None)
    if clone is not None:
        clone = clone.resolve()
        if not _is_clone(clone):
            parser.error(f"{clone} is not a YOLOv5 clone (no train.py and models/yolo.py)")
        sys.path.insert(0, str(clone))
        module = register(importlib.import_module("models.yolo"))
    else:
        module = register("yolov5.models.yolo")
    changed = compat(module)
    if changed:
        print(f"dynconv: for YOLOv5 with these libraries: {'; '.join(changed)}", file=sys.stderr)
    rest = _resolve_cfg_args(rest)
    if clone is not None:
        sys.argv = [str(clone / f"{ours.script}.py"), *rest]
        runpy.run_path(sys.argv[0], run_name="__main__")
    else:
        spec = importlib.util.find_spec(f"yolov5.{ours.script}")
        sys.argv = [str(spec.origin), *rest]
        runpy.run_module(f"yolov5.{ours.script}", run_name="__main__", alter_sys=False)


if __name__ == "__main__":
    main()
