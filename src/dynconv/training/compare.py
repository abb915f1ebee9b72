"""``dynconv compare``: train the same network with each convolution type and several seeds, and
report what each type costs and buys.

For every type: parameters, MACs per image (``FlopCounterMode``: the per-sample convolutions and
the attention included), training time per epoch (median over all epochs of all seeds),
inference latency at batch 1 and 64 (median, eval mode), and the final test accuracy as mean,
standard deviation, minimum and maximum over the seeds, with the mean difference to the static
network trained with the same seeds. The final epoch is reported, never the best one: picking
the best epoch on the test set would flatter every type.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .._io import write_atomically
from ..layers.factory import check_conv_type, conv_types
from ..tools.cost import count_macs, count_parameters, inference_latency_ms
from .checkpoints import previous_checkpoint
from .config import (
    CHECKPOINT_NAME,
    METRIC_FIELDS,
    SettingError,
    TrainConfig,
    TrainResult,
    resolve_defaults,
    setting,
)
from .data import Dataset
from .loop import train
from .sources import dataset_for
from .summary import LATENCY_BATCHES, CompareResult, TypeSummary, format_table

__all__ = ["COMPARE_EPOCHS", "DEFAULT_CONV_TYPES", "compare"]

DEFAULT_CONV_TYPES = ("static", "dynamic", "condconv", "odconv", "drconv")
# Epochs of a comparison unless given: enough for the small network to converge on the digits.
COMPARE_EPOCHS = 15
RUNS_FOLDER = "runs"


def _resolve_types(requested: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """(types to run, default types skipped because they are not registered)."""
    if requested:
        with setting("conv_types"):
            for name in requested:
                check_conv_type(name)
        if len(set(requested)) != len(requested):
            raise SettingError("conv_types", f"a conv type is listed twice: {list(requested)}")
        return list(requested), []
    available = set(conv_types())
    return ([t for t in DEFAULT_CONV_TYPES if t in available],
            [t for t in DEFAULT_CONV_TYPES if t not in available])


def _measure(result: TrainResult, dataset: Dataset) -> tuple[int, float, dict[int, float]]:
    """(parameters, MACs per image, latency in ms per batch size) of a trained model."""
    model = result.model
    device = next(model.parameters()).device
    images = dataset.test.images
    repeats = math.ceil(max(LATENCY_BATCHES) / len(images))
    images = dataset.normalize(images.repeat(repeats, 1, 1, 1)[: max(LATENCY_BATCHES)].to(device))
    macs = count_macs(model, images[:1])
    latency = {b: inference_latency_ms(model, images[:b]) for b in LATENCY_BATCHES}
    return count_parameters(model), macs, latency


def _write_csv(path: Path, rows: list[dict[str, Any]], fields: Sequence[str]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(path, lambda f: f.write(text.getvalue().encode()))


def _machine(device: torch.device) -> str:
    """The processor the timings were taken on, in words."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _settings(base: TrainConfig, types: list[str], seeds: list[int], skipped: list[str],
              dataset: Dataset, wall_s: float, device: torch.device) -> dict[str, Any]:
    return {
        "data": dataset.describe(),
        "model": base.model + (f" {base.model_args}" if base.model_args else ""),
        "conv types": ", ".join(types),
        "not registered, skipped": ", ".join(skipped) or "-",
        "seeds": ", ".join(map(str, seeds)),
        "epochs": base.epochs,
        "recipe": (f"SGD lr {base.lr:g} ({base.lr_schedule}), momentum {base.momentum:g}, "
                   f"weight decay {base.weight_decay:g}, batch {base.batch_size}"),
        "temperature": (f"{base.temperature}, from {base.temperature_initial:g} over "
                        f"{base.temperature_epochs} epochs; evaluation at 1"
                        if base.temperature == "linear" else base.temperature),
        "machine": f"{_machine(device)}, torch {torch.__version__}",
        "wall time": f"{wall_s / 60:.1f} min",
    }


def _markdown(result: CompareResult) -> str:
    lines = ["# dynconv compare", ""]
    lines += [f"- **{k}**: {v}" for k, v in result.settings.items()]
    lines += ["", format_table(result.summaries, markdown=True), "",
              "Accuracy: the final epoch's test accuracy over the seeds (not the best epoch). "
              "Δ vs static: mean difference to the static network trained with the same seed, "
              "in points. MACs per image: each convolution layer by its analytic rule (the "
              "per-sample convolution, attention and kernel aggregation; docs/tools.md), the "
              "rest by FlopCounterMode. Training time: median seconds per epoch. "
              "Latency: median ms per forward pass, eval mode.", ""]
    return "\n".join(lines)


def compare(
    base: TrainConfig,
    out: str | Path,
    conv_types_: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> CompareResult:
    """Train ``base.model`` with each type of ``conv_types_`` (default: the registered ones of
    :data:`DEFAULT_CONV_TYPES`) and each seed; write the table, metrics and plots to ``out``.

    Each run is an ordinary :func:`~dynconv.training.loop.train` run in
    ``out/runs/<type>-seed<seed>``,
    so ``resume=True`` skips finished runs and continues interrupted ones.

    Returns the :class:`CompareResult`; on Ctrl-C, the runs so far are saved and the result has
    no summary for the unfinished types (``result.settings['interrupted']`` is set).
    """
    started = time.perf_counter()
    types, skipped = _resolve_types(conv_types_)
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise SettingError("seeds", f"seeds must be distinct and at least one, got {seeds}")
    out = Path(out)
    if not resume and (out / RUNS_FOLDER).exists() and any((out / RUNS_FOLDER).iterdir()):
        raise ValueError(f"{str(out)!r} already holds a comparison; resume it (--resume) or "
                         "choose another output folder: nothing is overwritten")
    base.check()
    dataset = dataset_for(base)
    base = resolve_defaults(dataclasses.replace(base, conv_type="static"), dataset)
    log(f"{dataset.describe()}; {base.model}, {base.epochs} epochs; types: {', '.join(types)}; "
        f"seeds: {', '.join(map(str, seeds))}"
        + (f"\n(not registered, skipped: {', '.join(skipped)})" if skipped else ""))

    summaries: list[TypeSummary] = []
    metrics: list[dict[str, Any]] = []
    interrupted = False
    total = len(types) * len(seeds) * base.epochs
    bar = tqdm(total=total, unit="epoch", desc="compare", disable=not progress, leave=False)
    finals: dict[tuple[str, int], float] = {}
    done = 0  # epochs of the finished runs, for the progress bar
    measured_model = None  # a trained model, to name the device of the timings
    for conv_type in types:
        results: list[TrainResult] = []
        for seed in seeds:
            run_out = out / RUNS_FOLDER / f"{conv_type}-seed{seed}"
            bar.set_description(f"{conv_type} seed {seed}")
            config = dataclasses.replace(base, conv_type=conv_type, seed=seed,
                                         out=str(run_out), quiet=True)
            checkpoint = run_out / CHECKPOINT_NAME
            result = train(config, resume=checkpoint.exists()
                           or previous_checkpoint(checkpoint).exists(),
                           dataset=dataset, on_epoch=lambda row: bar.update())
            done += len(result.metrics)
            bar.n = done
            bar.refresh()
            metrics += [{"conv_type": conv_type, "seed": seed, **row} for row in result.metrics]
            if result.interrupted:
                interrupted = True
                break
            results.append(result)
            finals[conv_type, seed] = result.metrics[-1]["test_acc"]
            epoch_s = statistics.median(r["train_time_s"] for r in result.metrics)
            note = bar.write if progress else log
            note(f"{conv_type:>10} seed {seed}: test acc {100 * finals[conv_type, seed]:.2f}%  "
                 f"({epoch_s:.2f} s/epoch)")
        if interrupted:
            break
        parameters, macs, latency = _measure(results[0], dataset)
        measured_model = results[0].model
        summaries.append(TypeSummary(
            conv_type, parameters, macs,
            statistics.median(r["train_time_s"] for res in results for r in res.metrics),
            latency, [finals[conv_type, s] for s in seeds],
        ))
    bar.close()
    if "static" in types:
        for s in summaries:
            if s.conv_type != "static":
                s.delta_vs_static = statistics.fmean(
                    finals[s.conv_type, seed] - finals["static", seed] for seed in seeds)

    device = (next(measured_model.parameters()).device if measured_model is not None
              else torch.device("cpu"))
    settings = _settings(base, types, seeds, skipped, dataset, time.perf_counter() - started,
                         device)
    if interrupted:
        settings["interrupted"] = "yes: resume with --resume"
    result = CompareResult(summaries, metrics, settings, out)
    _write_outputs(result)
    return result


def _write_outputs(result: CompareResult) -> None:
    from .plots import plot_accuracy_vs_cost, plot_curves  # matplotlib, only when drawing

    out = result.out
    out.mkdir(parents=True, exist_ok=True)
    rows = [s.as_row() for s in result.summaries]
    if rows:
        _write_csv(out / "table.csv", rows, list(rows[0]))
        write_atomically(out / "table.md", lambda f: f.write(_markdown(result).encode()))
        result.files += ["table.csv", "table.md"]
    _write_csv(out / "metrics.csv", result.metrics, ["conv_type", "seed", *METRIC_FIELDS])
    result.files.append("metrics.csv")
    if result.metrics:
        plot_curves(result.metrics, out / "curves.png")
        result.files.append("curves.png")
    if result.summaries:
        plot_accuracy_vs_cost(result.summaries, out / "accuracy_vs_macs.png")
        result.files.append("accuracy_vs_macs.png")
