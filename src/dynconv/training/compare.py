"""``dynconv compare``: train the same network with each convolution type and several seeds, and
report what each type costs and buys.

The rows: each convolution type, and ``static-wide``, the static network widened (its ``width``
model argument) to the parameter count of DY-Conv, so that a dynamic convolution is also compared
with simply a bigger static network. For every row: parameters, MACs per image
(``FlopCounterMode``: the per-sample convolutions and the attention included), training time per
epoch (median over all epochs of all seeds), inference latency at batch 1 and 64 (median, eval
mode), the final test accuracy as mean, standard deviation, minimum and maximum over the seeds,
and the difference to the static network (and to the widened one) trained with the same seeds,
with a paired 95% interval over the seeds and the test images
(:func:`~dynconv.training.intervals.paired_interval`) and its conclusion. The final epoch is
reported, never the best one: picking the best epoch on the test set would flatter every type.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from tqdm import tqdm

from .._io import write_atomically
from ..functional.tuning import autotune_summary
from ..layers.factory import check_conv_type, conv_types
from ..layers.temperature import EVAL_TEMPERATURE, final_temperatures
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
from .intervals import BOOTSTRAP_SEED, RESAMPLES, PairedInterval, paired_interval
from .loop import build_model, time_training_step, train
from .predictions import PREDICTIONS_NAME, read_predictions
from .sources import dataset_for
from .summary import LATENCY_BATCHES, WIDE_STATIC, CompareResult, RowSummary, format_table

__all__ = ["COMPARE_EPOCHS", "COMPARE_EVAL_EVERY", "COMPARE_SEEDS", "COMPARE_TRAIN_IMAGES",
           "DEFAULT_CONV_TYPES", "QUICK_SEEDS", "WIDE_STATIC", "check_row", "compare", "wide_width"]

DEFAULT_CONV_TYPES = ("static", "dynamic", "condconv", "odconv", "drconv")
# The default comparison, sized to train every row with six seeds in about 8 minutes on 2 CPU
# cores (docs/training.md, "How the default comparison and its recipes were chosen"): 6 epochs
# on a fixed, stratified tenth of MNIST's training images (other data: all its training
# images), evaluated on every test image after epochs 3 and 6.
COMPARE_EPOCHS = 6
COMPARE_EVAL_EVERY = 3
COMPARE_SEEDS = (0, 1, 2, 3, 4, 5)
COMPARE_TRAIN_IMAGES = {"mnist": 5000}
#: ``--quick``: seed 0 of the default comparison, in under 2 minutes: the same accuracies as the
#: full run's seed-0 networks, intervals over the test images only. (Fewer epochs or images
#: were tried first: 3 epochs on 2,000 images left static at 34% and ODConv at 10%.)
QUICK_SEEDS = (0,)
RUNS_FOLDER = "runs"


#: The conv type whose parameter count :data:`~dynconv.training.summary.WIDE_STATIC` matches.
WIDE_TARGET = "dynamic"


@dataclass(frozen=True)
class Row:
    """One row of the comparison: a name, the conv type and the model's keywords it trains
    with, and the label the table shows."""

    name: str
    conv_type: str
    model_args: dict[str, Any]
    label: str


def check_row(name: str) -> str:
    """Return ``name`` if it is a registered conv type or :data:`WIDE_STATIC`; otherwise raise
    a ``ValueError`` saying what is accepted."""
    if name == WIDE_STATIC:
        return name
    try:
        return check_conv_type(name)
    except ValueError as error:
        raise ValueError(f"{error}, or {WIDE_STATIC!r} (static, widened to the parameters of "
                         f"{WIDE_TARGET})") from None


def _resolve_rows(requested: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """(rows to run, default rows skipped because their type is not registered)."""
    if requested:
        with setting("conv_types"):
            for name in requested:
                check_row(name)
        if len(set(requested)) != len(requested):
            raise SettingError("conv_types", f"a conv type is listed twice: {list(requested)}")
        return list(requested), []
    available = set(conv_types())
    defaults = [DEFAULT_CONV_TYPES[0], WIDE_STATIC, *DEFAULT_CONV_TYPES[1:]]
    return ([t for t in defaults if t == WIDE_STATIC or t in available],
            [t for t in defaults if t != WIDE_STATIC and t not in available])


def _parameters(base: TrainConfig, dataset: Dataset, conv_type: str,
                model_args: dict[str, Any]) -> int:
    config = dataclasses.replace(base, conv_type=conv_type, model_args=model_args)
    return count_parameters(build_model(config, dataset))


def wide_width(base: TrainConfig, dataset: Dataset) -> tuple[int, int, int] | None:
    """(width, its parameter count, the parameter count of :data:`WIDE_TARGET`): the integer
    ``width`` model argument of ``base.model`` whose static network has the parameter count
    closest to that of ``base``'s model with :data:`WIDE_TARGET` convolutions (the smaller width
    on a tie), or None if the model takes no ``width``."""
    target = _parameters(base, dataset, WIDE_TARGET, base.model_args)

    def parameters(width: int) -> int:
        return _parameters(base, dataset, "static", {**base.model_args, "width": width})

    try:
        low = parameters(1)
    except SettingError as error:
        if "unexpected keyword argument 'width'" in str(error):
            return None
        raise
    if low >= target:
        return 1, low, target
    # the parameter count grows with the width: double, then bisect, to the first width >= target
    low_width, high_width = 1, 2
    while parameters(high_width) < target:
        low_width, high_width = high_width, 2 * high_width
    while high_width - low_width > 1:
        middle = (low_width + high_width) // 2
        low_width, high_width = ((middle, high_width) if parameters(middle) < target
                                 else (low_width, middle))
    below, above = parameters(low_width), parameters(high_width)
    if target - below <= above - target:
        return low_width, below, target
    return high_width, above, target


def _build_rows(names: list[str], base: TrainConfig, dataset: Dataset,
                explicit: bool) -> tuple[list[Row], str | None]:
    """The rows of ``names`` and a note on the wide static row (its width, or why it is
    skipped). An explicitly asked wide row that the model cannot build is an error."""
    rows, note = [], None
    for name in names:
        if name != WIDE_STATIC:
            rows.append(Row(name, name, dict(base.model_args), name))
            continue
        found = wide_width(base, dataset)
        if found is None:
            if explicit:
                raise SettingError("conv_types", f"{WIDE_STATIC!r} widens the model's width "
                                   f"argument, and {base.model} has none")
            note = f"skipped: {base.model} has no width argument to widen"
            continue
        width, parameters, target = found
        reference = base.model_args.get("width")
        note = (f"{base.model} width {width}: {parameters:,} parameters, the closest to "
                f"{WIDE_TARGET}'s {target:,}"
                + (f" (width {reference})" if reference is not None else ""))
        rows.append(Row(name, "static", {**base.model_args, "width": width},
                        f"{name} (width {width})"))
    return rows, note


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


def _machine(device: torch.device, threads: int | None) -> str:
    """The processor the timings were taken on, in words (``threads``: the runs' torch threads,
    None for torch's default)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), name)
    except OSError:
        pass
    default = torch.get_num_threads()  # the latencies' (inference_latency_ms: all of them)
    if threads is None or threads == default:
        return f"{name}, {os.cpu_count()} cores, {default} torch threads"
    return (f"{name}, {os.cpu_count()} cores, {threads} torch thread{'s' if threads > 1 else ''} "
            f"in training and {default} in the latencies")


def _interval_method(seeds: int, images: int) -> str:
    bootstrap = (f"paired bootstrap over the {images:,} test images ({RESAMPLES:,} resamples, "
                 f"seed {BOOTSTRAP_SEED})")
    if seeds == 1:
        return (f"95%, {bootstrap} only: one seed, so the training randomness is not covered")
    return (f"paired 95%: over the {seeds} seeds (Student's t, {seeds - 1} degrees of freedom) "
            f"and {bootstrap}, combined as sqrt(h_seed^2 + h_image^2); docs/training.md")


def _settings(base: TrainConfig, rows: list[Row], seeds: list[int], skipped: list[str],
              wide_note: str | None, ending: dict[float, list[str]], dataset: Dataset,
              wall_s: float,
              device: torch.device) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "data": dataset.describe(),
        "model": base.model + (f" {base.model_args}" if base.model_args else ""),
        "conv types": ", ".join(row.label for row in rows),
        "not registered, skipped": ", ".join(skipped) or "-",
    }
    if wide_note is not None:
        settings[WIDE_STATIC] = wide_note
    settings.update({
        "seeds": ", ".join(map(str, seeds)),
        "epochs": base.epochs if base.eval_every == 1 else (
            f"{base.epochs}, evaluated after epochs "
            + ", ".join(str(e) for e in range(1, base.epochs + 1)
                        if e % base.eval_every == 0 or e == base.epochs)),
        "recipe": (f"SGD lr {base.lr:g} ({base.lr_schedule}), momentum {base.momentum:g}, "
                   f"weight decay {base.weight_decay:g}, batch {base.batch_size}"),
    })
    if ending:  # a comparison of static networks only has no temperature
        settings["temperature"] = _temperature_setting(base, ending)
    settings.update({
        "interval": _interval_method(len(seeds), len(dataset.test)),
        "machine": f"{_machine(device, base.threads)}, torch {torch.__version__}",
        "wall time": f"{wall_s / 60:.1f} min",
    })
    if base.autotune or base.autotune_cache:
        settings["autotune"] = (autotune_summary() or "no dynamic layer met").removeprefix(
            "autotune: ")
    return settings


def _temperature_setting(base: TrainConfig, ending: dict[float, list[str]]) -> str:
    """The temperature schedule in words: as the layers that end at 1 follow it, then the rows
    whose layers end elsewhere (KernelWarehouse: from 1 to 0), named."""
    epochs = f"{base.temperature_epochs} epoch" + ("s" if base.temperature_epochs != 1 else "")
    parts = []
    if EVAL_TEMPERATURE in ending:
        parts.append(f"{base.temperature}, from {base.temperature_initial:g} over {epochs}; "
                     "evaluation at 1" if base.temperature == "linear" else base.temperature)
    schedule = base.temperature_schedule()
    parts += [f"{', '.join(rows)}: {schedule.describe(final)}"
              for final, rows in ending.items() if final != EVAL_TEMPERATURE]
    return "; ".join(parts)


def _markdown(result: CompareResult) -> str:
    lines = ["# dynconv compare", ""]
    lines += [f"- **{k}**: {v}" for k, v in result.settings.items()]
    lines += ["", format_table(result.summaries, markdown=True), "",
              "Accuracy: the final epoch's test accuracy over the seeds (not the best epoch). "
              "Δ vs static: mean difference to the static network trained with the same seed, "
              "in points, with its paired 95% interval over the seeds and the test images "
              "(docs/training.md); 'better' or 'worse' when the interval excludes 0, 'no "
              "measurable difference' when it contains 0. MACs per image: each convolution "
              "layer by its analytic rule (the per-sample convolution, attention and kernel "
              "aggregation; docs/tools.md), the rest by FlopCounterMode. Training time: median "
              "seconds per epoch. Latency: median ms per forward pass, eval mode.", ""]
    return "\n".join(lines)


class _Progress:
    """The progress bar of a comparison: every run's epochs, each weighted by its row's
    seconds per epoch (a DRConv epoch costs many static ones), so that tqdm's remaining time
    holds over all runs. A row's weight is first a timed training step times the batches of an
    epoch (``estimates``), then the mean of its measured epochs (training and evaluation).
    Epochs found already done (a resumed comparison) count as done but not in the rate."""

    FORMAT = "{desc} {percentage:3.0f}%|{bar}| {elapsed} elapsed, {remaining} left"

    def __init__(self, rows: list[str], runs_per_row: int, epochs: int, enabled: bool,
                 estimates: dict[str, float] | None = None, file: TextIO | None = None) -> None:
        self.weight = {row: 1.0 for row in rows}
        self.weight.update(estimates or {})
        self.planned = {row: runs_per_row * epochs for row in rows}
        self.trained = dict.fromkeys(rows, 0)
        self.found = dict.fromkeys(rows, 0)
        self.seconds: dict[str, list[float]] = {row: [] for row in rows}
        self.runs = len(rows) * runs_per_row
        self.row, self.run_trained = rows[0], 0
        self.bar = tqdm(total=1.0, unit="s", desc="compare", disable=not enabled, leave=False,
                        smoothing=0, bar_format=self.FORMAT, file=file or sys.stderr,
                        dynamic_ncols=True)

    def start(self, row: str, seed: int, run: int) -> None:
        """Run number ``run`` (from 1), of ``row`` with ``seed``, starts."""
        self.row, self.run_trained = row, 0
        self.bar.set_description(f"{row} seed {seed} (run {run}/{self.runs})")

    def epoch(self, metrics: dict[str, float]) -> None:
        """The run trained an epoch: its metrics row (training and evaluation time)."""
        self.run_trained += 1
        self.trained[self.row] += 1
        self.seconds[self.row].append(metrics["train_time_s"] + metrics["eval_time_s"])
        self.weight[self.row] = statistics.fmean(self.seconds[self.row])
        self._refresh()

    def finished(self, epochs: int) -> None:
        """The run ended with ``epochs`` epochs done (those it did not train were found done)."""
        self.found[self.row] += epochs - self.run_trained
        self._refresh()

    @property
    def fraction(self) -> float:
        return self.bar.n / self.bar.total

    def _refresh(self) -> None:
        bar, w = self.bar, self.weight
        bar.total = sum(self.planned[r] * w[r] for r in w)
        bar.initial = sum(self.found[r] * w[r] for r in w)
        bar.n = bar.initial + sum(self.trained[r] * w[r] for r in w)
        bar.refresh()

    def write(self, message: str) -> None:
        self.bar.write(message)

    def close(self) -> None:
        self.bar.close()


def _step_estimates(rows: list[Row], base: TrainConfig, seed: int,
                    dataset: Dataset) -> dict[str, float]:
    """Each row's estimated seconds per epoch: a timed training step x the batches of an epoch."""
    batches = len(dataset.train) // base.batch_size
    return {row.name: batches * time_training_step(
        _run_config(base, row, seed), dataset) for row in rows}


def _run_config(base: TrainConfig, row: Row, seed: int, out: Path | None = None) -> TrainConfig:
    """The configuration of ``row``'s run with ``seed`` (in the folder ``out``)."""
    return dataclasses.replace(base, conv_type=row.conv_type, model_args=row.model_args,
                               seed=seed, out=None if out is None else str(out), quiet=True)


def _correct(run_out: Path, dataset: Dataset, epochs: int) -> torch.Tensor:
    """Whether the run in ``run_out`` classified each test image correctly at its last epoch
    [N] (bool), checked to be of this test set and this epoch."""
    predictions = read_predictions(run_out / PREDICTIONS_NAME)
    if not torch.equal(predictions.labels, dataset.test.labels) or predictions.epoch != epochs:
        raise ValueError(
            f"{str(run_out / PREDICTIONS_NAME)!r} holds the predictions of epoch "
            f"{predictions.epoch} on {len(predictions.labels):,} test images, not of epoch "
            f"{epochs} on this data's {len(dataset.test):,}: the folder holds another run"
        )
    return predictions.correct


def compare(
    base: TrainConfig,
    out: str | Path,
    conv_types_: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> CompareResult:
    """Train ``base.model`` with each row of ``conv_types_`` (conv types, and
    :data:`~dynconv.training.summary.WIDE_STATIC` for the static network widened to the
    parameters of DY-Conv; default: static, static-wide and the registered ones of
    :data:`DEFAULT_CONV_TYPES`) and each seed; write the table, metrics and plots to ``out``.

    Each run is an ordinary :func:`~dynconv.training.loop.train` run in
    ``out/runs/<row>-seed<seed>``, so ``resume=True`` skips finished runs and continues
    interrupted ones. The same seed gives every row the same data order and augmentation.

    Returns the :class:`~dynconv.training.summary.CompareResult`; on Ctrl-C, the runs so far are
    saved and the result has no summary for the unfinished rows (``result.settings
    ['interrupted']`` is set).
    """
    started = time.perf_counter()
    names, skipped = _resolve_rows(conv_types_)
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
    rows, wide_note = _build_rows(names, base, dataset, explicit=bool(conv_types_))
    ending: dict[float, list[str]] = {}  # each final temperature -> the rows that end there
    for row in rows:
        for final in final_temperatures(build_model(_run_config(base, row, seeds[0]), dataset)):
            ending.setdefault(final, []).append(row.label)
    log(f"{dataset.describe()}; {base.model}, {base.epochs} epochs; rows: "
        f"{', '.join(row.label for row in rows)}; seeds: {', '.join(map(str, seeds))}"
        + (f"\n(not registered, skipped: {', '.join(skipped)})" if skipped else "")
        + (f"\n({WIDE_STATIC}: {wide_note})" if wide_note else ""))

    summaries: list[RowSummary] = []
    metrics: list[dict[str, Any]] = []
    correct: dict[str, torch.Tensor] = {}  # row name -> [S, N] bool
    interrupted = False
    estimates = _step_estimates(rows, base, seeds[0], dataset) if progress else None
    bar = _Progress([row.name for row in rows], len(seeds), base.epochs, progress, estimates)
    measured_model = None  # a trained model, to name the device of the timings
    label_width = max(len(row.label) for row in rows)
    for index, row in enumerate(rows):
        results: list[TrainResult] = []
        for k, seed in enumerate(seeds):
            run_out = out / RUNS_FOLDER / f"{row.name}-seed{seed}"
            bar.start(row.name, seed, index * len(seeds) + k + 1)
            checkpoint = run_out / CHECKPOINT_NAME
            result = train(_run_config(base, row, seed, run_out),
                           resume=checkpoint.exists() or previous_checkpoint(checkpoint).exists(),
                           dataset=dataset, on_epoch=bar.epoch)
            bar.finished(len(result.metrics))
            metrics += [{"row": row.name, "seed": seed, **m} for m in result.metrics]
            if result.interrupted:
                interrupted = True
                break
            results.append(result)
            epoch_s = statistics.median(m["train_time_s"] for m in result.metrics)
            note = bar.write if progress else log
            note(f"{row.label:>{label_width}} seed {seed}: {base.eval_on} acc "
                 f"{100 * result.metrics[-1]['test_acc']:.2f}%  ({epoch_s:.2f} s/epoch)")
        if interrupted:
            break
        correct[row.name] = torch.stack([
            _correct(out / RUNS_FOLDER / f"{row.name}-seed{seed}", dataset, base.epochs)
            for seed in seeds])
        parameters, macs, latency = _measure(results[0], dataset)
        measured_model = results[0].model
        summaries.append(RowSummary(
            row.name, row.conv_type, row.label, parameters, macs,
            statistics.median(m["train_time_s"] for res in results for m in res.metrics),
            latency, [res.metrics[-1]["test_acc"] for res in results], row.model_args,
        ))
    bar.close()
    _add_intervals(summaries, correct)

    device = (next(measured_model.parameters()).device if measured_model is not None
              else torch.device("cpu"))
    settings = _settings(base, rows, seeds, skipped, wide_note, ending, dataset,
                         time.perf_counter() - started, device)
    if interrupted:
        settings["interrupted"] = "yes: resume with --resume"
    result = CompareResult(summaries, metrics, settings, out)
    _write_outputs(result)
    return result


def _add_intervals(summaries: list[RowSummary], correct: dict[str, torch.Tensor]) -> None:
    """Each row's paired interval against static and, for the dynamic rows, against the
    widened static network, where those were trained."""
    def against(row: str, baseline: str) -> PairedInterval | None:
        if baseline not in correct:
            return None
        return paired_interval(correct[row], correct[baseline])

    for s in summaries:
        if s.name != "static":
            s.delta_vs_static = against(s.name, "static")
        if s.name not in ("static", WIDE_STATIC):
            s.delta_vs_wide = against(s.name, WIDE_STATIC)


def _write_outputs(result: CompareResult) -> None:
    from .plots import plot_accuracy_vs_cost, plot_curves  # matplotlib, only when drawing

    out = result.out
    out.mkdir(parents=True, exist_ok=True)
    rows = [s.as_row() for s in result.summaries]
    if rows:
        _write_csv(out / "table.csv", rows, list(rows[0]))
        write_atomically(out / "table.md", lambda f: f.write(_markdown(result).encode()))
        result.files += ["table.csv", "table.md"]
    _write_csv(out / "metrics.csv", result.metrics, ["row", "seed", *METRIC_FIELDS])
    result.files.append("metrics.csv")
    if result.metrics:
        plot_curves(result.metrics, out / "curves.png")
        result.files.append("curves.png")
    if result.summaries:
        plot_accuracy_vs_cost(result.summaries, out / "accuracy_vs_macs.png")
        result.files.append("accuracy_vs_macs.png")
