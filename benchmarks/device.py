"""The device report: what a user training on one device (a GPU, or the CPU) gets from each
dynamic layer type, in one markdown file (``make bench-gpu``; ``--device cpu --quick`` in
under 3 minutes on 2 cores).

* layers: DY-Conv, CondConv, ODConv, DRConv and KernelWarehouse at the suite's shapes, batch
  1, 32 and 128, float32 and bfloat16 autocast: forward and forward+backward time over
  ``nn.Conv2d`` of the same shape (the faster of its contiguous and channels_last runs: the
  floor) and over the seeds' grouped formulation, with the dispatch rule's pick and
  :func:`dynconv.autotune`'s pick side by side and the time of each, and the peak memory of
  forward+backward over ``nn.Conv2d``'s;
* models: a ResNet-18 (CIFAR stem) training step at batch 64, a ResNet-50 (ImageNet stem, 224)
  training step and a YOLOv8n forward+backward (if Ultralytics is installed), each conv type
  against static, with the rule and autotuned, and peak memory; the memory targets of issue 18
  (ResNet-18, batch 64: DY-Conv within 1.5x of static, ODConv 2x) marked met or missed.

Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and the profiler's allocations on the
CPU (:func:`dynconv.tools.cost.peak_bytes_of`), parameters and inputs excluded.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from common import build_resnet, markdown_table, median_times, peak_megabytes, step
from layers import SEED_OF, SHAPES, Shape, build
from torch import nn

import dynconv
from dynconv.functional import dispatch, tuning
from dynconv.models import resnet18, resnet50

LAYER_TYPES = ["DY-Conv", "CondConv", "ODConv", "DRConv", "KW"]
# the report tunes every key it meets: no budget that would leave keys to the rule
TUNE_BUDGET_S = 3600.0
MODEL_TYPES = ["static", "dynamic", "condconv", "odconv", "kw", "drconv"]
MEMORY_TARGETS = {"dynamic": 1.5, "odconv": 2.0}  # ResNet-18 training step, batch 64
# DRConv's generated kernels (N x R x C_out x C_in x kH x kW) above this: not measured
DRCONV_MAX_KERNEL_BYTES = 2**31
SEED_DR_MAX_BYTES = 2**30  # seed 003's R-fold output above this: not measured


@dataclass(frozen=True)
class Plan:
    """What one run measures: the full report, or the quick one."""

    shapes: list[Shape]
    batches: list[int]
    dtypes: list[str]
    resnet18_batch: int
    resnet50: tuple[int, int]  # batch, image size
    yolo: tuple[int, int]  # batch, image size
    model_types: list[str]
    tune_resnet18: bool = True  # tuning it at batch 64 takes over a minute on 2 CPU cores


def plan_for(device: torch.device, quick: bool) -> Plan:
    dtypes = ["float32", "bfloat16"]
    if quick:
        return Plan([SHAPES[0], SHAPES[2]], [1, 32], ["float32"], 64, (2, 96), (2, 160),
                    ["static", "dynamic", "odconv"], tune_resnet18=device.type != "cpu")
    if device.type == "cuda":
        return Plan(SHAPES, [1, 32, 128], dtypes, 64, (32, 224), (16, 640), MODEL_TYPES)
    return Plan(SHAPES, [1, 32], dtypes, 64, (8, 224), (4, 640), MODEL_TYPES[:-1])


def _autocast(device: torch.device, dtype: str):
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def _in(context: Callable[[], contextlib.AbstractContextManager], fn: Callable[[], None]):
    def run() -> None:
        with context():
            fn()

    run.drop_grads = getattr(fn, "drop_grads", None)
    return run


def _pick(run: Callable[[], None], tuned: bool) -> str:
    """The formulations a forward of ``run`` took, with autotune on or off: a mixture assembled
    by the rule shows as ``aggregate/<per-sample method>``, as autotune names it."""
    with dynconv.autotune(tuned, budget_s=TUNE_BUDGET_S), tuning.trace() as calls:
        run()
    names, pending = [], None
    for op, choice in calls:
        if pending is not None:  # the per-sample method of an assembled mixture, dense regions
            names.append(f"{pending}/{choice}")
            pending = None
        elif op != "per_sample_conv2d" and choice in ("aggregate", "dense"):
            pending = choice
        else:
            names.append(choice)
    return ", ".join(dict.fromkeys(names + ([pending] if pending else [])))


def _layer_cell(modules: dict[str, nn.Module], shape: Shape, batch: int, dtype: str,
                device: torch.device, budget: float, rounds) -> list[list[object]]:
    rows = []
    cl_conv = nn.Conv2d(shape.c_in, shape.c_out, shape.kernel, padding=shape.kernel // 2,
                        groups=shape.groups, bias=False, device=device)
    cl_conv.load_state_dict(modules["conv"].state_dict())
    cl_conv = cl_conv.to(memory_format=torch.channels_last)
    kernel_bytes = batch * 8 * shape.c_out * shape.c_in // shape.groups * shape.kernel**2 * 4
    types = [t for t in LAYER_TYPES if t != "DRConv" or kernel_bytes <= DRCONV_MAX_KERNEL_BYTES]
    amp = lambda: _autocast(device, dtype)  # noqa: E731
    off = lambda: dynconv.autotune(False)  # noqa: E731
    on = lambda: _tuned()  # noqa: E731
    result = {}
    for backward in (False, True):
        x = torch.randn(batch, shape.c_in, shape.size, shape.size, device=device,
                        requires_grad=backward)
        x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(backward)
        steps = {"conv": _in(amp, step(modules["conv"], x, backward)),
                 "conv CL": _in(amp, step(cl_conv, x_cl, backward))}
        picks = {}
        for kind in types:
            layer_step = step(modules[kind], x, backward)
            with amp():
                picks[kind] = (_pick(layer_step, False), _pick(layer_step, True))
            steps[kind] = _in(lambda: _both(amp, off), layer_step)
            steps[kind + " tuned"] = _in(lambda: _both(amp, on), layer_step)
            seed = SEED_OF[kind]
            r_fold = batch * 8 * shape.c_out * shape.size**2 * 4  # seed 003's dense output
            if seed in modules and seed not in steps and (seed != "seed DR"
                                                          or r_fold <= SEED_DR_MAX_BYTES):
                steps[seed] = _in(amp, step(modules[seed], x, backward))
        mem = {}
        if backward:
            mem = {n: peak_megabytes(fn, device) for n, fn in steps.items()
                   if n in ("conv", *types)}
        times = median_times(steps, device, budget, rounds)
        result[backward] = (times, mem, picks)
    (tf, _, picks_f), (tb, mb, picks_b) = result[False], result[True]
    for kind in types:
        floor_f, floor_b = min(tf["conv"], tf["conv CL"]), min(tb["conv"], tb["conv CL"])
        layout = "CL" if tb["conv CL"] < tb["conv"] else "-"
        seed = SEED_OF[kind]
        rule_pick = _same(picks_f[kind][0], picks_b[kind][0])
        tuned_pick = _same(picks_f[kind][1], picks_b[kind][1])
        rows.append([
            shape.name, batch, dtype, kind, f"{floor_b * 1e3:.2f}", layout,
            f"{tf[kind] / floor_f:.2f}", f"{tb[kind] / floor_b:.2f}",
            f"{tb[kind + ' tuned'] / floor_b:.2f}",
            f"{tb[kind] / tb[seed]:.2f}" if seed in tb else "-",
            f"{tb[kind + ' tuned'] / tb[seed]:.2f}" if seed in tb else "-",
            rule_pick, tuned_pick,
            f"{mb[kind] / max(mb['conv'], 1e-9):.2f}" if mb else "-",
        ])
    return rows


def _tuned() -> dynconv.autotune:
    return dynconv.autotune(budget_s=TUNE_BUDGET_S)


@contextlib.contextmanager
def _both(first, second):
    with first(), second():
        yield


def _same(forward: str, backward: str) -> str:
    return forward if forward == backward else f"{forward} / {backward}"


LAYER_HEADER = [
    "shape", "N", "dtype", "type", "conv ms f+b", "floor layout", "fwd x conv", "f+b x conv",
    "tuned f+b x conv", "f+b x seed", "tuned f+b x seed", "rule's pick (fwd / f+b)",
    "autotune's pick (fwd / f+b)", "f+b MB x conv",
]


def layers_table(device: torch.device, plan: Plan, budget: float, rounds) -> str:
    rows = []
    for shape in plan.shapes:
        modules = build(shape, device)
        for batch in plan.batches:
            for dtype in plan.dtypes:
                cell = _layer_cell(modules, shape, batch, dtype, device, budget, rounds)
                rows += cell
                for row in cell:
                    print("  " + markdown_table(LAYER_HEADER, [row]).splitlines()[-1],
                          flush=True)
    return markdown_table(LAYER_HEADER, rows)


# -- whole models ---------------------------------------------------------------------------------


def _train_step(model: nn.Module, x: torch.Tensor, loss: Callable[[object], torch.Tensor]):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def run() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss(model(x)).backward()
        optimizer.step()

    run.drop_grads = lambda: optimizer.zero_grad(set_to_none=True)
    return run


def _yolo(conv_type: str, device: torch.device) -> nn.Module | None:
    try:
        from ultralytics.nn import tasks

        import dynconv.integrations.ultralytics as dy_ultralytics
    except ImportError:
        return None
    dy_ultralytics.register()
    name = {"static": "yolov8n.yaml", "dynamic": "yolov8n-dynconv.yaml",
            "odconv": "yolov8n-odconv.yaml", "drconv": "yolov8n-drconv.yaml"}.get(conv_type)
    if name is None:
        return None
    cfg = name if conv_type == "static" else dy_ultralytics.cfg_path(name)
    torch.manual_seed(0)
    return tasks.DetectionModel(cfg, verbose=False).to(device)


def _yolo_loss(out) -> torch.Tensor:
    """The sum of every tensor the model returned (lists, tuples, dicts: whatever its version's
    training output is)."""
    if isinstance(out, torch.Tensor):
        return out.float().sum()
    values = out.values() if isinstance(out, dict) else out
    return sum(_yolo_loss(v) for v in values)


def models_table(device: torch.device, plan: Plan, budget: float, rounds) -> str:
    tasks: dict[str, dict[str, Callable[[], None]]] = {}
    labels = torch.randint(0, 10, (plan.resnet18_batch,), device=device)
    x18 = torch.randn(plan.resnet18_batch, 3, 32, 32, device=device)
    n50, size50 = plan.resnet50
    x50 = torch.randn(n50, 3, size50, size50, device=device)
    labels50 = torch.randint(0, 1000, (n50,), device=device)
    n_yolo, size_yolo = plan.yolo
    x_yolo = torch.randn(n_yolo, 3, size_yolo, size_yolo, device=device)
    ce = nn.CrossEntropyLoss()
    r18 = f"ResNet-18 CIFAR train N={plan.resnet18_batch}"
    r50 = f"ResNet-50 {size50}px train N={n50}"
    yolo = f"YOLOv8n {size_yolo}px f+b N={n_yolo}"
    for conv_type in plan.model_types:
        model = build_resnet(resnet18, conv_type, num_classes=10, stem="cifar").to(device)
        tasks.setdefault(r18, {})[conv_type] = _train_step(model, x18, lambda o: ce(o, labels))
        if conv_type != "drconv":  # DRConv's kernels at 224 px: tens of GB
            model = build_resnet(resnet50, conv_type, num_classes=1000).to(device)
            tasks.setdefault(r50, {})[conv_type] = _train_step(
                model, x50, lambda o: ce(o, labels50))
        model = _yolo(conv_type, device)
        if model is not None:
            tasks.setdefault(yolo, {})[conv_type] = _train_step(model, x_yolo, _yolo_loss)
    rows, notes = [], []
    for task, steps in tasks.items():
        print(f"  {task}", flush=True)
        timed = {}
        for name, fn in steps.items():
            timed[name] = _in(lambda: dynconv.autotune(False), fn)
            if name != "static" and (task != r18 or plan.tune_resnet18):
                started = time.perf_counter()
                _in(_tuned, fn)()  # tunes its keys
                print(f"    {name}: tuned in {time.perf_counter() - started:.1f} s", flush=True)
                timed[name + " tuned"] = _in(_tuned, fn)
        # the memory measurement is also the warm-up call
        mem = {name: peak_megabytes(fn, device) for name, fn in timed.items()}
        times = median_times(timed, device, budget * 3, rounds, warm_up=False)
        for name in steps:
            tuned = timed.get(name + " tuned")
            ratio_mem = mem[name] / max(mem["static"], 1e-9)
            goal = MEMORY_TARGETS.get(name) if task == r18 else None
            mark = "-" if goal is None else (
                "met" if ratio_mem <= goal else f"MISSED by {ratio_mem / goal - 1:.0%}")
            rows.append([
                task, name, f"{times[name] * 1e3:.1f}", f"{times[name] / times['static']:.2f}",
                "-" if tuned is None else f"{times[name + ' tuned'] / times['static']:.2f}",
                f"{mem[name]:.0f}", f"{ratio_mem:.2f}", goal or "-", mark,
            ])
            if goal is not None:
                notes.append(f"{name}: {ratio_mem:.2f}x static (target {goal}x: {mark})")
        print("    " + ", ".join(f"{n} {times[n] / times['static']:.2f}" for n in timed),
              flush=True)
    header = ["task", "conv type", "ms (rule)", "x static (rule)", "x static (autotuned)",
              "peak MB", "MB x static", "memory target", "met"]
    text = markdown_table(header, rows)
    if not plan.tune_resnet18:
        text += (f"\n\n{r18}: not autotuned in this run (--quick on the CPU: tuning it takes "
                 "over a minute on 2 cores)")
    if notes:
        text += (f"\n\nMemory targets, ResNet-18 training step at batch {plan.resnet18_batch} "
                 "(the targets are set at 64): " + "; ".join(notes))
    return text


def run(device: torch.device, quick: bool, budget: float, rounds) -> str:
    """The whole report as markdown."""
    plan = plan_for(device, quick)
    rule = dispatch.rule_for(device)
    started = time.perf_counter()
    parts = [f"Dispatch table for {device.type}: {rule.source}. Autotune: "
             "`dynconv.autotune()`, every exact formulation timed once per key.",
             "### Layers (K = 4, R = 8; times over the faster `nn.Conv2d` layout)",
             layers_table(device, plan, budget, rounds),
             "### Models",
             models_table(device, plan, budget, (2, 3) if quick else rounds)]
    tuned = tuning.autotune_summary()
    parts.append(f"{tuned or 'autotune: nothing tuned'}; report measured in "
                 f"{time.perf_counter() - started:.0f} s")
    return "\n\n".join(parts)
