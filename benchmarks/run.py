"""dynconv's benchmark suite: ``make bench`` (all tables), ``make bench ARGS=--quick``.

    PYTHONPATH=src python benchmarks/run.py [--quick] [--tables layers,models,dispatch,freed_memory]
        [--device cpu|cuda] [--threads N] [--output FILE.md]
    PYTHONPATH=src python benchmarks/run.py --tables device --device cuda --output FILE.md
        (make bench-gpu; --device cpu --quick runs it on the CPU in under 3 minutes)

Prints markdown tables (and writes them to ``--output``): the layer tables (every layer type
against ``nn.Conv2d`` and the seeds' formulation at ResNet-18 and YOLO shapes), the whole-model
table (ResNet-18, eager and ``torch.compile``), the dispatch table (every formulation forced)
and the freed-memory table (glibc's malloc as is against ``keep_freed_memory``, two processes).
The device report (``--tables device``, benchmarks/device.py) is what ``make bench-gpu`` writes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import device as device_report
import dispatch
import freed_memory
import layers
import models
from common import machine

from dynconv import keep_freed_memory

TABLES = ("layers", "models", "dispatch", "freed_memory")
# the device report (make bench-gpu): every type at batch 1-128, float32 and bfloat16, the rule's
# and autotune's picks, whole models; not part of the default tables
REPORTS = ("device",)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer shapes and batches, shorter budgets (a couple of minutes)")
    parser.add_argument("--tables", default=",".join(TABLES),
                        help=f"comma-separated subset of {TABLES + REPORTS}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's, at most the cores)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timed rounds per table cell")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile rows (--quick skips them)")
    parser.add_argument("--output", type=Path, default=None, help="also write the tables here")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc as it is (default: dynconv.keep_freed_memory, "
                             "as dynconv's train and compare commands do)")
    args = parser.parse_args()
    tables = [t for t in args.tables.split(",") if t]
    unknown = sorted(set(tables) - set(TABLES + REPORTS))
    if unknown:
        parser.error(f"unknown tables {unknown}; expected a subset of {TABLES + REPORTS}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    kept = not args.default_malloc and keep_freed_memory()
    allocator = "freed memory kept (keep_freed_memory)" if kept else "malloc as is"
    budget = args.budget if args.budget is not None else (0.3 if args.quick else 1.0)
    rounds = (3, 5) if args.quick else (3, 9)
    header = (f"dynconv benchmarks on {machine(device)}; float32, K = 4, R = 8; medians of "
              f"{rounds[0]}-{rounds[1]} interleaved rounds; ratios within one process; {allocator}")
    print(header + "\n", flush=True)
    sections = [header]
    start = time.perf_counter()
    for table in tables:
        print(f"-- {table}", flush=True)
        if table == "layers":
            text = layers.run(device, args.quick, budget, rounds, memory=True)
        elif table == "models":
            compile_ = not (args.no_compile or args.quick)
            text = models.run(device, args.quick, budget, rounds, compile_)
        elif table == "dispatch":
            text = dispatch.run(device, args.quick, budget, rounds)
        elif table == "device":
            text = device_report.run(device, args.quick, budget, rounds)
        else:
            text = freed_memory.run(device, args.quick, budget, rounds)
        print("\n" + text + "\n", flush=True)
        sections.append(f"## {table}\n\n{text}")
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text("\n\n".join(sections) + "\n")


if __name__ == "__main__":
    main()
