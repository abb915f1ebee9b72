"""Stock Ultralytics YOLO against the YAMLs dynconv ships: parameters, GFLOPs, time per epoch.

Run: ``PYTHONPATH=src python benchmarks/yolo.py [--scale n] [--imgsz 320] [--images 64]``
(needs the ``yolo`` extra; about 16 minutes on 2 idle CPU cores at the defaults).

Each model trains from scratch for ``--epochs`` epochs on the generated shapes dataset
(:mod:`dynconv.integrations.shapes`, offline) with ``val=False``; the table shows the fastest
epoch after the first over ``--repeats`` rounds of all models (training only, between the
trainer's epoch callbacks), so warm-up is left out and a busy spell shows less. Parameters and
GFLOPs are those of ``model.info()`` at 640x640 (thop, with the dynamic layers counted by
dynconv's rules), next to dynconv's own count (:func:`dynconv.tools.cost.count_macs`, convolutions
and matrix products only).
Ultralytics trains on the CPU with one thread fewer than the machine has cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "0")

import torch

import dynconv.integrations.ultralytics as dy_ultralytics
from dynconv.integrations.shapes import write_shapes_dataset
from dynconv.tools.cost import count_macs


def _models(scale: str) -> list[str]:
    names = []
    for family in ("yolov8", "yolo11", "yolov5"):
        names.append(f"{family}{scale}.yaml")
        names += [cfg.replace(family, family + scale, 1) for cfg in dy_ultralytics.shipped_cfgs()
                  if cfg.startswith(family + "-")]
    return names


def _row(name: str, data: Path, args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    from ultralytics import YOLO
    from ultralytics.utils.torch_utils import get_flops

    model = YOLO(name)
    params = sum(p.numel() for p in model.model.parameters())
    gflops = get_flops(model.model, 640)
    model.model.eval()
    ours = 2 * count_macs(model.model, torch.zeros(1, 3, 640, 640)) / 1e9
    times: list[float] = []
    model.add_callback("on_train_epoch_start", lambda trainer: times.append(-time.perf_counter()))
    model.add_callback("on_train_epoch_end", lambda trainer: times.__setitem__(
        -1, times[-1] + time.perf_counter()))
    model.train(data=str(data), epochs=args.epochs, imgsz=args.imgsz, batch=args.batch,
                workers=0, device="cpu", amp=False, plots=False, val=False, verbose=False,
                project=str(workdir), name=Path(name).stem, exist_ok=True, seed=0)
    return {"model": Path(name).stem, "params_m": params / 1e6, "gflops": gflops,
            "count_macs_gflops": ours, "epoch_s": min(times[1:] or times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="n", choices=list("nsmlx"))
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--images", type=int, default=64, help="training images")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2,
                        help="rounds over all models; the table keeps each one's fastest epoch")
    parser.add_argument("--only", nargs="*", help="model YAML names to run (default: all)")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="dynconv-yolo-bench-") as tmp:
        os.environ.setdefault("YOLO_CONFIG_DIR", tmp)
        data = write_shapes_dataset(Path(tmp) / "shapes", train=args.images, val=4,
                                    imgsz=args.imgsz)
        names = args.only or _models(args.scale)
        rows = {}
        for _ in range(args.repeats):  # whole rounds, so that a slow spell hits every model
            for name in names:
                row = _row(name, data, args, Path(tmp) / "runs")
                if name in rows:
                    row["epoch_s"] = min(row["epoch_s"], rows[name]["epoch_s"])
                rows[name] = row
        rows = list(rows.values())
    print(f"\n{platform.machine()} CPU, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; {args.images} images at {args.imgsz}px, batch {args.batch}, "
          f"fastest of epochs 2 to {args.epochs} over {args.repeats} rounds\n")
    print("| model | params (M) | GFLOPs (info, 640) | dynconv count (640) | s / epoch |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['model']} | {row['params_m']:.2f} | {row['gflops']:.2f} | "
              f"{row['count_macs_gflops']:.2f} | {row['epoch_s']:.1f} |")


if __name__ == "__main__":
    main()
