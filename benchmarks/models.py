"""Whole models: a ResNet-18 (CIFAR stem, 32x32 inputs, 10 classes) with every convolution type
against the static one: a training step (forward, cross-entropy, backward, SGD step) at batch
64, and inference at batch 1 and 64; and inference at batch 64 compiled with ``torch.compile``
(compiling a training step takes many minutes on 2 cores). DRConv only at batch 1: a training
step at batch 16 measured 174x static and 7 GB, which would dominate the suite's time.
KernelWarehouse (``kw``): the official ``kw_resnet18`` at 1x (:func:`common.build_resnet`)."""

from __future__ import annotations

import time

import torch
from common import build_resnet, markdown_table, median_times, peak_megabytes
from torch import nn

from dynconv.models import resnet18

TYPES = ["static", "dynamic", "condconv", "odconv", "kw", "drconv"]
COMPILED_TYPES = ["static", "dynamic", "odconv"]
TRAIN_TARGETS = {"dynamic": 2.5, "odconv": 3.0}  # issue 10: training step over static


def build_model(conv_type: str, device: torch.device) -> nn.Module:
    return build_resnet(resnet18, conv_type, num_classes=10, stem="cifar").to(device)


def train_step(model: nn.Module, x, y):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def run() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    run.drop_grads = lambda: optimizer.zero_grad(set_to_none=True)  # see peak_megabytes
    return run


def _inference(model: nn.Module, x):
    def run() -> None:
        model.eval()
        with torch.no_grad():
            model(x)

    return run


def run(device: torch.device, quick: bool, budget: float, rounds, compile_: bool) -> str:
    """One table: every task with every type, eager and compiled, interleaved per task."""
    batch = 16 if quick else 64
    x_train = torch.randn(batch, 3, 32, 32, device=device)
    y_train = torch.randint(0, 10, (batch,), device=device)
    inputs = [torch.randn(1, 3, 32, 32, device=device), torch.randn(batch, 3, 32, 32,
                                                                     device=device)]
    models = {t: build_model(t, device) for t in TYPES}
    if compile_:
        for t in COMPILED_TYPES:
            models[t + " compiled"] = torch.compile(build_model(t, device))
    tasks = {f"train N={batch}": {n: train_step(m, x_train, y_train) for n, m in models.items()}}
    for x in inputs:
        tasks[f"infer N={x.shape[0]}"] = {n: _inference(m, x) for n, m in models.items()}
    for task, steps in tasks.items():
        if task != "infer N=1":
            del steps["drconv"]  # minutes per call and GBs of kernels: see the layer tables
    for task, steps in tasks.items():  # compiled: inference at the large batch only
        for name in [n for n in steps if n.endswith("compiled")]:
            if task != f"infer N={batch}":
                del steps[name]
                continue
            start = time.perf_counter()
            steps[name]()
            print(f"  {name}: compiled in {time.perf_counter() - start:.0f} s", flush=True)
    rows = []
    for task, steps in tasks.items():
        times = median_times(steps, device, budget * 3, rounds)
        mem = {n: peak_megabytes(fn, device) for n, fn in steps.items()}
        for n in steps:
            ratio = times[n] / times["static"]
            goal = TRAIN_TARGETS.get(n) if task.startswith("train") else None
            mark = "-" if goal is None else (
                "met" if ratio <= goal else f"MISSED by {ratio / goal - 1:.0%}")
            base = "static compiled" if n.endswith("compiled") else "static"
            rows.append([task, n, f"{times[n] * 1e3:.1f}", f"{ratio:.2f}",
                         f"{times[n] / times[base]:.2f}", goal or "-", mark, f"{mem[n]:.0f}",
                         f"{mem[n] / max(mem['static'], 1e-9):.2f}"])
        print(f"  {task}: " + ", ".join(f"{n} {times[n] / times['static']:.2f}" for n in steps),
              flush=True)
    header = ["task", "conv type", "ms", "x static", "x static (same mode)", "target", "met",
              "peak MB", "MB x static"]
    return markdown_table(header, rows)
