"""A small detection dataset drawn on the fly, in the YOLO folder format, for offline runs.

Ultralytics' sample datasets (``coco8.yaml``...) download their images; this writes one that
needs nothing: filled rectangles, ellipses and triangles (three classes) on noisy backgrounds,
with their boxes as YOLO labels (``class x_center y_center width height``, normalised)::

    root/images/{train,val}/0000.jpg   root/labels/{train,val}/0000.txt   root/data.yaml

Both Ultralytics and YOLOv5 read this layout. The tests, ``benchmarks/yolo.py`` and the docs'
offline smoke test use it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["SHAPE_NAMES", "write_shapes_dataset"]

SHAPE_NAMES = ("rectangle", "ellipse", "triangle")


def _draw(rng: np.random.Generator, size: int, max_objects: int):
    """One image [size, size, 3] uint8 and its labels [(class, xc, yc, w, h)] (normalised)."""
    from PIL import Image, ImageDraw

    background = rng.integers(0, 256, 3)
    noise = rng.normal(0, 12, (size, size, 3))
    image = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    labels = []
    for _ in range(rng.integers(1, max_objects + 1)):
        cls = int(rng.integers(len(SHAPE_NAMES)))
        w, h = rng.integers(size // 8, size // 2, 2)
        x0, y0 = rng.integers(0, size - w), rng.integers(0, size - h)
        box = (int(x0), int(y0), int(x0 + w), int(y0 + h))
        colour = tuple(int(c) for c in (255 - background + rng.integers(-40, 40, 3)) % 256)
        if cls == 0:
            draw.rectangle(box, fill=colour)
        elif cls == 1:
            draw.ellipse(box, fill=colour)
        else:
            draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])],
                         fill=colour)
        labels.append((cls, (x0 + w / 2) / size, (y0 + h / 2) / size, w / size, h / size))
    return image, labels


def write_shapes_dataset(
    root: str | Path, train: int = 32, val: int = 8, imgsz: int = 64, max_objects: int = 3,
    seed: int = 0,
) -> Path:
    """Write ``train`` + ``val`` images of ``imgsz`` pixels under ``root``; return the path of
    its ``data.yaml`` (absolute ``path``, ``train``/``val`` folders, class ``names``)."""
    for name, value in (("train", train), ("val", val), ("imgsz", imgsz), ("max_objects",
                                                                          max_objects)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if imgsz < 16:
        raise ValueError(f"imgsz must be at least 16 pixels, got {imgsz}")
    root = Path(root).resolve()
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        images, labels = root / "images" / split, root / "labels" / split
        images.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, boxes = _draw(rng, imgsz, max_objects)
            image.save(images / f"{i:04d}.jpg", quality=95)
            (labels / f"{i:04d}.txt").write_text(
                "".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in boxes)
            )
    names = "".join(f"  {i}: {name}\n" for i, name in enumerate(SHAPE_NAMES))
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\n"
                    f"nc: {len(SHAPE_NAMES)}\nnames:\n{names}")
    return data
