"""glibc's malloc as is against :func:`dynconv.keep_freed_memory`: page faults and time per
training step, each in its own process (the setting is process-wide).

A DY-Conv 512 -> 512, 3x3, K = 4 layer on 4x4 maps at batch 1 (its bank gradient is 38 MB,
over glibc's 32 MB mmap threshold) against ``nn.Conv2d`` of the same shape, and a ResNet-18
(CIFAR stem) training step with DY-Conv and with ODConv against the static one. Ratios are
taken within each process, interleaved; absolute times of the two processes are not compared.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys

import torch
from common import markdown_table, median_times, step
from models import build_model, train_step
from torch import nn

from dynconv import DynamicConv2d, keep_freed_memory

_MODES = {"malloc as is": "default", "keep_freed_memory()": "keep"}


def _faults_per_step(fn, steps: int = 20) -> float:
    """Median minor page faults of one call of ``fn`` (after a warm-up call)."""
    fn()
    counts = []
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fn()
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return statistics.median(counts)


def _resnet_step(conv_type: str, batch: int):
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    return train_step(build_model(conv_type, torch.device("cpu")), x, y)


_MODEL_TYPES = ("static", "dynamic", "odconv")


def _child(mode: str, quick: bool, budget: float, rounds: tuple[int, int]) -> dict:
    """Runs in the child process: the measurements under one allocator setting."""
    applied = keep_freed_memory() if mode == "keep" else False
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    x = torch.randn(1, 512, 4, 4)
    layers = {"dynamic": DynamicConv2d(512, 512, 3, padding=1, num_kernels=4),
              "static": nn.Conv2d(512, 512, 3, padding=1)}
    layer_steps = {name: step(m, x, backward=True) for name, m in layers.items()}
    layer_times = median_times(layer_steps, cpu, budget, rounds)
    layer_faults = _faults_per_step(layer_steps["dynamic"])  # before the models grow the heap
    batch = 16 if quick else 64
    model_steps = {t: _resnet_step(t, batch) for t in _MODEL_TYPES}
    model_times = median_times(model_steps, cpu, budget * 4, rounds)
    return {
        "applied": applied,
        "layer": [layer_faults, layer_times["dynamic"] / layer_times["static"]],
        "models": {t: [_faults_per_step(model_steps[t], steps=3),
                       model_times[t] / model_times["static"]] for t in _MODEL_TYPES},
    }


def run(device: torch.device, quick: bool, budget: float, rounds) -> str:
    """The table: one row per allocator setting, each measured in a fresh process."""
    if device.type != "cpu":
        return "(CPU only: CUDA's caching allocator keeps freed memory)"
    rows = []
    for label, mode in _MODES.items():
        args = json.dumps({"mode": mode, "quick": quick, "budget": budget, "rounds": rounds})
        out = subprocess.run([sys.executable, __file__, args], capture_output=True, text=True,
                             check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        if mode == "keep" and not r["applied"]:
            label += " (not applied: not glibc)"
        models = r["models"]
        rows.append([label, round(r["layer"][0]), r["layer"][1], round(models["static"][0]),
                     *(v for t in ("dynamic", "odconv")
                       for v in (round(models[t][0]), models[t][1]))])
    batch = 16 if quick else 64
    header = ["allocator", "DY 512 4x4 N=1 f+b: faults/step", "x nn.Conv2d",
              f"ResNet-18 train N={batch}, static: faults/step", "DY: faults/step",
              "DY x static", "OD: faults/step", "OD x static"]
    return markdown_table(header, rows)


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    result = _child(spec["mode"], spec["quick"], spec["budget"], tuple(spec["rounds"]))
    print(json.dumps(result))
