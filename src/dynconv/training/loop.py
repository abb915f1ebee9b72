"""Train one model on one dataset: the engine behind ``dynconv train`` and ``dynconv compare``.

The default recipe is seed 002's for CIFAR: SGD (lr 0.1, momentum 0.9, weight decay 5e-4), a
cosine learning-rate schedule stepped per epoch, random crop with padding 4 and horizontal
flip, batch 128, 200 epochs. The attention temperature of every dynamic layer follows a
:class:`~dynconv.layers.temperature.TemperatureSchedule`; evaluation runs at the layers' final
temperature (1; KernelWarehouse's, which anneals from 1 to 0, at 0).

Nothing is lost: at the end of every epoch, and at the next batch boundary after Ctrl-C, the
whole state is written atomically to ``<out>/checkpoint.pt``, with a checksum, read back and
verified first, the one it replaces kept as ``checkpoint.prev.pt``; ``resume=True`` continues
from it and, on the CPU, ends with the same weights as a run that was never stopped. Mixed
precision on CUDA; several GPUs through ``torchrun`` (DistributedDataParallel, see
docs/training.md).
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler
from tqdm import tqdm

from .._io import write_atomically
from ..functional.tuning import autotune, autotune_summary
from ..layers.temperature import (
    TemperatureSchedule,
    anneal_temperature,
    describe_schedule,
    dynamic_layers,
    final_temperatures,
    set_final_temperature,
    temperature_at,
)
from ..models import create_model_for_data
from ..tools.checkpoint import load_checkpoint, save_file
from .checkpoints import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    check_same_config,
    previous_checkpoint,
    read_checkpoint,
    write_checkpoint,
)
from .config import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    METRIC_FIELDS,
    METRICS_NAME,
    MODEL_NAME,
    SettingError,
    TrainConfig,
    TrainResult,
    resolve_defaults,
    setting,
)
from .data import (
    Augmentation,
    Dataset,
    ImageSet,
    augment,
    batch_indices,
    iterate_test,
    seeded_generator,
)
from .predictions import PREDICTIONS_NAME, Predictions, read_predictions, write_predictions
from .processes import Processes, StopRequest, resolve_device
from .sources import dataset_for

__all__ = ["build_model", "load_run", "time_training_step", "train"]


def build_model(config: TrainConfig, dataset: Dataset) -> nn.Module:
    """``config.model`` with ``config.conv_type``, sized for ``dataset``'s images and classes
    (an error of the model's keywords is a :class:`SettingError` of ``model_args``)."""
    blamed = setting("model_args", (ValueError, TypeError)) if config.model_args else nullcontext()
    with blamed:
        return create_model_for_data(
            config.model, config.conv_type, dataset.num_classes, dataset.in_channels,
            min(dataset.image_size), **config.model_args,
        )


def _has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _check_batch_size(config: TrainConfig, dataset: Dataset, model: nn.Module,
                      processes: Processes) -> None:
    n = len(dataset.train)
    if config.batch_size > n:
        raise SettingError(
            "batch_size",
            f"batch size {config.batch_size} is larger than the training set ({n} images): "
            "an epoch would have no batch; choose a batch size <= the training set"
        )
    if config.batch_size % processes.world_size:
        raise SettingError(
            "batch_size",
            f"batch size {config.batch_size} (the global batch) must be divisible by the number "
            f"of processes ({processes.world_size})"
        )
    share = config.batch_size // processes.world_size
    if share < 2 and _has_batch_norm(model):
        raise SettingError(
            "batch_size",
            f"a batch of {share} image per process cannot train {config.model}: BatchNorm needs "
            "at least 2 images per batch; choose a batch size >= "
            f"{2 * processes.world_size}"
        )


def _make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer) -> LRScheduler:
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    if config.lr_schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, sorted(config.lr_milestones),
                                                    gamma=config.lr_gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _write_metrics(path: Path, metrics: list[dict[str, float]]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=METRIC_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(metrics)
    write_atomically(path, lambda file: file.write(text.getvalue().encode()))


def _summary(row: dict[str, float], epochs: int, temperature: bool = True) -> str:
    """The line printed after an epoch; ``temperature``: whether the model has a temperature."""
    evaluated = not math.isnan(row["test_acc"])
    return (
        f"epoch {int(row['epoch']):>{len(str(epochs))}}/{epochs}  lr {row['lr']:.4g}  "
        + (f"T {row['temperature']:.3g}  " if temperature else "")
        + f"train loss {row['train_loss']:.4f} acc {100 * row['train_acc']:.2f}%  "
        + (f"test loss {row['test_loss']:.4f} acc {100 * row['test_acc']:.2f}%  " if evaluated
           else "")
        + f"{row['train_time_s']:.1f} s"
    )


def load_run(
    out: str | Path, dataset: Dataset | None = None
) -> tuple[nn.Module, TrainConfig, Dataset]:
    """Rebuild the model of the ``dynconv train`` run in the folder ``out``: its configuration
    and weights (``model.pt`` of a finished run, else the last checkpoint's), on the CPU, in eval
    mode at the final temperature. Returns (model, configuration, dataset); the dataset is
    loaded from the configuration unless given (it fixes the model's input and classes): the
    run's own, with its ``train_images`` and ``eval_on``.

    Raises a ``ValueError`` (:class:`~dynconv.tools.checkpoint.CheckpointError` for a file) in
    one line naming the file: a missing, corrupt or tampered checkpoint or ``model.pt``, or
    weights that do not fit the configured model (the first key that does not fit)."""
    out = Path(out)
    if not out.is_dir():
        raise ValueError(f"{str(out)!r} is not a folder of a 'dynconv train' run")
    checkpoint = read_checkpoint(out / CHECKPOINT_NAME)
    config = TrainConfig.from_dict({**checkpoint["config"], "out": str(out)})
    dataset = dataset or dataset_for(config)
    model = build_model(config, dataset)
    weights = out / MODEL_NAME
    load_checkpoint(model, weights if weights.exists() else out / CHECKPOINT_NAME)
    set_final_temperature(model)
    return model.eval(), config, dataset


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _evaluate(model: nn.Module, test: ImageSet, dataset: Dataset, config: TrainConfig,
              device: torch.device, processes: Processes,
              amp: bool) -> tuple[float, float, Tensor]:
    """(mean loss, accuracy, the predicted class of every test image [N] int64 on the CPU) on
    the test set, in eval mode at the final temperature."""
    model.eval()
    loss_sum = correct = count = 0.0
    # each process fills its batches with (class + 1); the sum over the processes fills all
    predicted = torch.zeros(len(test), dtype=torch.int64, device=device)
    starts = range(0, len(test), config.test_batch_size)[processes.rank::processes.world_size]
    with torch.no_grad(), _autocast(device, amp):
        for start, (images, labels) in zip(starts, iterate_test(
                test, config.test_batch_size, processes.rank, processes.world_size)):
            images = dataset.normalize(images.to(device, non_blocking=True))
            labels = labels.to(device, non_blocking=True)
            logits = model(images).float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            classes = logits.argmax(1)
            correct += (classes == labels).sum().item()
            count += len(labels)
            predicted[start : start + len(labels)] = classes + 1
    loss_sum, correct, count = processes.sum([loss_sum, correct, count], device)
    predicted = processes.sum_tensor(predicted).cpu() - 1
    model.train()
    return loss_sum / count, correct / count, predicted


def train(
    config: TrainConfig,
    resume: bool = False,
    dataset: Dataset | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``config.model`` with ``config.conv_type`` on ``config.data``; see the module doc.

    Args:
        config: the run; ``config.out`` is its folder (created), which receives
            ``checkpoint.pt`` (and ``checkpoint.prev.pt``, the one before), ``metrics.csv``,
            ``config.json`` and, at the end, ``model.pt`` (the state_dict, with its checksum).
        resume: continue the run in ``config.out``; without it, a folder that already holds a
            checkpoint is refused (nothing is overwritten).
        dataset: an already loaded dataset (else ``config.data`` is loaded); the run's
            ``eval_on`` and ``train_images`` are applied to it unless it is already prepared
            so (:func:`~dynconv.training.sources.dataset_for`).
        on_epoch: called with each epoch's metrics row (on every process).

    Raises:
        ValueError, TypeError: a setting that cannot work (unknown model, conv type or schedule,
            missing dataset folder, a batch size the model cannot train with...).
        CheckpointError: ``resume`` without a usable checkpoint, a corrupt checkpoint, or one of a
            different run.
    """
    config.check()
    if config.out is None:
        raise ValueError("config.out must name the output folder of the run")
    out = Path(config.out)
    checkpoint_path = out / CHECKPOINT_NAME
    if resume:
        checkpoint = read_checkpoint(checkpoint_path)
    elif checkpoint_path.exists() or previous_checkpoint(checkpoint_path).exists():
        raise CheckpointError(
            f"{str(out)!r} already holds a run ({CHECKPOINT_NAME}); resume it (--resume) or choose "
            "another output folder: nothing is overwritten"
        )
    dataset = dataset_for(config, dataset)
    config = resolve_defaults(config, dataset)
    if resume:
        # a checkpoint of an earlier version lacks the settings added since: their defaults
        stored = TrainConfig.from_dict(checkpoint["config"]).to_dict()
        check_same_config(stored, config.to_dict(), TrainConfig.run_fields(), checkpoint_path)

    requested = resolve_device(config.device)
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    processes = Processes.from_environment(requested.type)
    try:
        with autotuning(config):
            return _run(config, dataset, processes, checkpoint if resume else None, on_epoch)
    finally:
        processes.close()
        torch.set_num_threads(threads)


def autotuning(config: TrainConfig) -> AbstractContextManager:
    """:class:`dynconv.autotune` for the run, with its cache file, if ``config.autotune`` or
    ``config.autotune_cache``; else nothing changes (an autotune switched on by the caller
    stays on)."""
    if not (config.autotune or config.autotune_cache):
        return nullcontext()
    return autotune(cache=config.autotune_cache)


def time_training_step(config: TrainConfig, dataset: Dataset, steps: int = 2) -> float:
    """Seconds of one training step of ``config``'s run (forward, backward, optimizer step on a
    batch of ``config.batch_size``, augmentation included) on a throwaway model, on this process
    alone: the last of ``steps`` steps (the first ones warm up). Nothing is written; the run
    itself is not changed (it seeds everything it draws). What ``dynconv compare``'s progress
    bar weighs its runs by before it has timed their epochs."""
    config = resolve_defaults(config, dataset)
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        run = _build(config, dataset, Processes())
        indices = batch_indices(len(dataset.train), config.batch_size, config.seed, 0)
        seconds = 0.0
        with autotuning(config):
            for batch in range(min(steps, len(indices))):
                started = time.perf_counter()
                _train_step(run, indices[batch], 0, batch)  # .item() waits for the GPU
                seconds = time.perf_counter() - started
        return seconds
    finally:
        torch.set_num_threads(threads)


# -- the run ------------------------------------------------------------------------------------


@dataclass
class _Run:
    """One run's parts on this process. ``core`` is the model; ``model`` is what trains it:
    ``core`` or, in a distributed run, its DistributedDataParallel wrapper."""

    config: TrainConfig
    dataset: Dataset
    processes: Processes
    device: torch.device
    amp: bool
    core: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    scaler: torch.amp.GradScaler
    schedule: TemperatureSchedule
    augmentation: Augmentation
    batches_per_epoch: int
    # whether the model has a layer with an attention temperature (a static network has none:
    # its run neither shows nor needs a temperature schedule); found once, not at every batch
    has_temperature: bool
    metrics: list[dict[str, float]] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    @property
    def show(self) -> bool:
        """Whether this process reports (the main one, unless the run is quiet)."""
        return self.processes.main and not self.config.quiet

    def log(self, message: str) -> None:
        if self.show:
            tqdm.write(message, file=sys.stdout)


def _build(config: TrainConfig, dataset: Dataset, processes: Processes) -> _Run:
    """The model (initialised from ``config.seed``), its optimizer and schedules, on the device
    of this process."""
    device = resolve_device(config.device, processes)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    amp = device.type == "cuda" if config.amp is None else config.amp
    torch.manual_seed(config.seed)
    model = build_model(config, dataset).to(device)
    _check_batch_size(config, dataset, model, processes)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scheduler = _make_scheduler(config, optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
    return _Run(config, dataset, processes, device, amp, core=model, model=model,
                optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                schedule=config.temperature_schedule(),
                augmentation=Augmentation(config.crop_padding, config.flip),
                batches_per_epoch=len(dataset.train) // config.batch_size,
                has_temperature=bool(dynamic_layers(model)))


def _restore(run: _Run, checkpoint: dict[str, Any]) -> tuple[int, int, list[float]]:
    """Load the states, metrics and RNG state of ``checkpoint`` into ``run``; return where to
    continue: (epoch, batch, this process's partial sums of the epoch)."""
    try:
        run.core.load_state_dict(checkpoint["model"])
        run.optimizer.load_state_dict(checkpoint["optimizer"])
        run.scheduler.load_state_dict(checkpoint["scheduler"])
        if run.scaler.is_enabled() and checkpoint.get("scaler"):
            run.scaler.load_state_dict(checkpoint["scaler"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise CheckpointError(
            f"the checkpoint {str(run.out / CHECKPOINT_NAME)!r} does not fit this model: "
            f"{str(error).splitlines()[0]}"
        ) from None
    run.metrics = [dict(row) for row in checkpoint["metrics"]]
    position = checkpoint["position"]
    partial = [0.0, 0.0, 0.0, 0.0]
    if run.processes.main:  # the stored sums are over all processes: count them once
        partial = list(position.get("partial", partial))
    _set_rng_state(checkpoint["rng"], run.device)
    return position["epoch"], position["batch"], partial


def _describe(run: _Run) -> None:
    """Report what a new run trains, on what, and how."""
    config, processes = run.config, run.processes
    run.log(f"{run.dataset.describe()}\n{config.model} with {config.conv_type} convolutions, "
            f"{sum(p.numel() for p in run.core.parameters()):,} parameters, on {run.device}"
            + (f" (AMP {'float16' if run.device.type == 'cuda' else 'bfloat16'})"
               if run.amp else "")
            + (f", {processes.world_size} processes" if processes.world_size > 1 else "")
            + f"\n{config.epochs} epochs of {run.batches_per_epoch} batches of "
            f"{config.batch_size}; SGD lr {config.lr:g} ({config.lr_schedule}), momentum "
            f"{config.momentum:g}, weight decay {config.weight_decay:g}; augmentation: "
            f"{run.augmentation}"
            + (f"; temperature: {describe_schedule(run.core, run.schedule)}"
               if run.has_temperature else "")
            + f"\n-> {run.out}")
    if (run.has_temperature and config.temperature == "linear"
            and config.temperature_epochs >= config.epochs):
        finals = " or ".join(f"{final:g}" for final in final_temperatures(run.core))
        run.log(f"note: the temperature reaches {finals} only at the end of epoch "
                f"{config.temperature_epochs}, and the run has {config.epochs}")


def _save(run: _Run, position: dict[str, Any]) -> None:
    """Write the checkpoint at ``position`` (epoch, batch[, partial sums]) from the main
    process, then wait for every process."""
    if run.processes.main:
        write_checkpoint(run.out / CHECKPOINT_NAME, {
            "format": CHECKPOINT_FORMAT,
            "config": run.config.to_dict(),
            "model": run.core.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(),
            "temperature": _last_temperature(run, position["epoch"], position["batch"]),
            "position": position,
            "rng": _rng_state(run.device),
            "metrics": run.metrics,
        })
    run.processes.barrier()


def _last_temperature(run: _Run, epoch: int, batch: int) -> float | None:
    """The model's temperature (its first dynamic layer's; None for a static model) at the
    last batch trained before batch ``batch`` of epoch ``epoch`` (0-based): the value the
    epoch's row and the checkpoint show."""
    if batch == 0 and epoch > 0:
        epoch, batch = epoch - 1, run.batches_per_epoch
    return temperature_at(run.core, run.schedule, epoch, max(0, batch - 1), run.batches_per_epoch)


def _train_step(run: _Run, index: Tensor, epoch: int, batch: int) -> tuple[float, int, int]:
    """One optimizer step on the training images ``index`` [B] (this process's share of batch
    ``batch`` of ``epoch``), augmented and normalised: (loss, correct predictions, B)."""
    processes, device = run.processes, run.device
    images = run.dataset.train.images[index].to(device, non_blocking=True)
    labels = run.dataset.train.labels[index].to(device, non_blocking=True)
    share = len(index)
    images = run.dataset.normalize(augment(
        images, run.augmentation, seeded_generator(run.config.seed, epoch, batch),
        start=processes.rank * share, total=share * processes.world_size))
    with _autocast(device, run.amp):
        logits = run.model(images)
        loss = F.cross_entropy(logits.float(), labels)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return loss.item(), (logits.argmax(1) == labels).sum().item(), len(labels)


def _check_loss(loss: float, epoch: int, batch: int, lr: float, temperature: float) -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"the training loss became {loss} at epoch {epoch + 1}, batch {batch + 1} (lr "
            f"{lr:g}, temperature {temperature:.3g}); lower the learning rate or resume from the "
            "last checkpoint with other settings"
        )


def _epoch_row(run: _Run, epoch: int, lr: float, temperature: float,
               totals: list[float]) -> tuple[dict[str, float], Tensor | None]:
    """Close epoch ``epoch`` (0-based) from this process's (loss sum, correct, count, training
    seconds): sum them over the processes, step the learning rate and, every ``eval_every``
    epochs and after the last, evaluate at the final temperature. Returns the epoch's row of
    :data:`METRIC_FIELDS` (test metrics NaN when not evaluated) and the predicted class of every
    test image [N] (None when not evaluated)."""
    loss_sum, correct, count, train_time = totals
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    loss_sum, correct, count = run.processes.sum([loss_sum, correct, count], run.device)
    run.scheduler.step()
    started = time.perf_counter()
    test_loss = test_acc = math.nan
    predicted = None
    if (epoch + 1) % run.config.eval_every == 0 or epoch + 1 == run.config.epochs:
        set_final_temperature(run.core)
        test_loss, test_acc, predicted = _evaluate(run.core, run.dataset.test, run.dataset,
                                                   run.config, run.device, run.processes,
                                                   run.amp)
    return {
        "epoch": epoch + 1, "lr": lr, "temperature": temperature,
        "train_loss": loss_sum / count, "train_acc": correct / count,
        "test_loss": test_loss, "test_acc": test_acc,
        "train_time_s": train_time,
        "eval_time_s": 0.0 if predicted is None else time.perf_counter() - started,
        "images_per_s": count / train_time if train_time else float("nan"),
    }, predicted


def _write_predictions(run: _Run, epoch: int, predicted: Tensor) -> None:
    """Keep the predicted classes [N] of epoch ``epoch`` (1-based) in the run's folder."""
    if run.processes.main:
        write_predictions(run.out / PREDICTIONS_NAME,
                          Predictions(epoch, run.dataset.test.labels, predicted))


def _has_predictions(run: _Run, epoch: int) -> bool:
    """Whether the run's folder holds the predictions of epoch ``epoch`` (on every process:
    the main process reads the file)."""
    found = False
    if run.processes.main:
        try:
            found = read_predictions(run.out / PREDICTIONS_NAME).epoch == epoch
        except ValueError:
            found = False
    return not run.processes.any(run.processes.main and not found, run.device)


def _run(config: TrainConfig, dataset: Dataset, processes: Processes,
         checkpoint: dict[str, Any] | None,
         on_epoch: Callable[[dict[str, float]], None] | None) -> TrainResult:
    run = _build(config, dataset, processes)
    epoch, start_batch, partial = 0, 0, [0.0, 0.0, 0.0, 0.0]
    if checkpoint is not None:
        epoch, start_batch, partial = _restore(run, checkpoint)
    elif processes.main:
        write_atomically(run.out / CONFIG_NAME,
                         lambda f: f.write(json.dumps(config.to_dict(), indent=2).encode()))
    if processes.distributed:
        run.model = nn.parallel.DistributedDataParallel(
            run.core, device_ids=[run.device.index] if run.device.type == "cuda" else None
        )
    if checkpoint is None:
        _describe(run)
    elif epoch >= config.epochs:
        epochs = f"{config.epochs} epoch" + ("s" if config.epochs != 1 else "")
        run.log(f"the run in {run.out} finished its {epochs}: nothing to resume. "
                "To train longer, start a new run with a larger --epochs and another --out: a "
                "run's epochs cannot change"
                + (" (its cosine learning-rate schedule is laid out over them)"
                   if config.lr_schedule == "cosine" else ""))
    else:
        run.log(f"resuming {run.out} at epoch {epoch + 1}, batch {start_batch + 1} of "
                f"{run.batches_per_epoch}")

    stop = StopRequest()
    interrupted = trained = False
    run.model.train()
    with stop.installed(run.log):
        while epoch < config.epochs and not interrupted:
            indices = batch_indices(len(dataset.train), config.batch_size, config.seed, epoch,
                                    processes.rank, processes.world_size)
            loss_sum, correct, count, train_time = partial
            lr = run.optimizer.param_groups[0]["lr"]
            bar = tqdm(total=run.batches_per_epoch, initial=start_batch, unit="batch",
                       desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, file=sys.stderr,
                       disable=not run.show or not sys.stderr.isatty(), dynamic_ncols=True)
            temperature = _last_temperature(run, epoch, start_batch) or 0.0
            for batch in range(start_batch, run.batches_per_epoch):
                if processes.any(stop.requested, run.device):
                    interrupted = True
                    sums = processes.sum([loss_sum, correct, count], run.device)
                    _save(run, {"epoch": epoch, "batch": batch, "partial": [*sums, train_time]})
                    break
                started = time.perf_counter()
                temperature = anneal_temperature(run.core, run.schedule, epoch, batch,
                                                 run.batches_per_epoch)
                if temperature is None:  # no dynamic layer: the schedule's value, as before
                    temperature = run.schedule.at(epoch, batch, run.batches_per_epoch)
                batch_loss, batch_correct, images = _train_step(run, indices[batch], epoch, batch)
                _check_loss(batch_loss, epoch, batch, lr, temperature)
                loss_sum += batch_loss * images
                correct += batch_correct
                count += images
                train_time += time.perf_counter() - started
                bar.update()
                bar.set_postfix(loss=f"{batch_loss:.3f}",
                                **({"T": f"{temperature:.3g}"} if run.has_temperature else {}))
            bar.close()
            if interrupted:
                break
            row, predicted = _epoch_row(run, epoch, lr, temperature,
                                        [loss_sum, correct, count, train_time])
            run.metrics.append(row)
            epoch, start_batch, partial = epoch + 1, 0, [0.0, 0.0, 0.0, 0.0]
            if predicted is not None:  # before the checkpoint that counts it
                _write_predictions(run, epoch, predicted)
            trained = True
            _save(run, {"epoch": epoch, "batch": 0})
            if processes.main:
                _write_metrics(run.out / METRICS_NAME, run.metrics)
            run.log(_summary(row, config.epochs, run.has_temperature))
            if on_epoch is not None:
                on_epoch(row)

    set_final_temperature(run.core)
    if interrupted:
        run.log(f"stopped at epoch {epoch + 1}, batch {batch + 1}: saved "
                f"{run.out / CHECKPOINT_NAME}; continue with --resume")
    else:
        # a finished run of a dynconv that kept no predictions: evaluate its final model once
        if not trained and not _has_predictions(run, config.epochs):
            predicted = _evaluate(run.core, dataset.test, dataset, config, run.device,
                                  processes, run.amp)[2]
            _write_predictions(run, config.epochs, predicted)
        if processes.main:
            save_file(run.core.state_dict(), run.out / MODEL_NAME)
    if config.autotune or config.autotune_cache:
        run.log(autotune_summary() or "autotune: no dynamic layer met")
    run.core.eval()
    return TrainResult(run.core, run.metrics, config, dataset, run.out, interrupted,
                       processes.main)
