"""Train one model on one dataset: the engine behind ``dynconv train`` and ``dynconv compare``.

The default recipe is seed 002's for CIFAR: SGD (lr 0.1, momentum 0.9, weight decay 5e-4), a
cosine learning-rate schedule stepped per epoch, random crop with padding 4 and horizontal
flip, batch 128, 200 epochs. The attention temperature of every dynamic layer follows a
:class:`~dynconv.layers.temperature.TemperatureSchedule`; evaluation always runs at temperature 1.

Nothing is lost: at the end of every epoch, and at the next batch boundary after Ctrl-C, the
whole state is written atomically to ``<out>/checkpoint.pt``; ``resume=True`` continues from it
and, on the CPU, ends with the same weights as a run that was never stopped. Mixed precision on
CUDA; several GPUs through ``torchrun`` (DistributedDataParallel, see docs/training.md).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .._io import write_atomically
from ..layers.factory import check_conv_type
from ..layers.temperature import TEMPERATURE_SCHEDULES, TemperatureSchedule, set_temperature
from ..models import check_model, create_model_for_data, fixed_conv_type
from .checkpoints import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    check_same_config,
    read_checkpoint,
    write_checkpoint,
)
from .data import (
    Augmentation,
    Dataset,
    ImageSet,
    augment,
    batch_indices,
    iterate_test,
    load_dataset,
    seeded_generator,
)

__all__ = ["LR_SCHEDULES", "TrainConfig", "TrainResult", "config_for_resume", "load_run",
           "resolve_defaults", "train"]

LR_SCHEDULES = ("cosine", "multistep", "constant")
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.csv"
CONFIG_NAME = "config.json"
MODEL_NAME = "model.pt"
METRIC_FIELDS = (
    "epoch", "lr", "temperature", "train_loss", "train_acc", "test_loss", "test_acc",
    "train_time_s", "eval_time_s", "images_per_s",
)
# Epochs when none are given: seed 002 trains CIFAR for 200; the digits are learnt in 30.
_RECIPE_EPOCHS = {"digits": 30, "CIFAR-10": 200, "CIFAR-100": 200}
_OTHER_EPOCHS = 100


@dataclass
class TrainConfig:
    """Everything that defines a training run, and how it is run.

    ``None`` means the default for the dataset or model: ``conv_type`` the model's own
    (static, or ODConv for the ``od_*`` zoo), ``epochs`` 200 for CIFAR, 30 for the digits and 100
    otherwise, ``crop_padding`` and ``flip`` the dataset's augmentation (CIFAR: 4 and on; digits: 1
    and off), ``temperature_initial`` the schedule's published start (30 or 34).
    """

    data: str = "digits"
    model: str = "small_cnn"
    conv_type: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    image_size: int | None = None
    epochs: int | None = None
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    lr_milestones: list[int] = field(default_factory=list)
    lr_gamma: float = 0.1
    crop_padding: int | None = None
    flip: bool | None = None
    temperature: str = "linear"
    temperature_initial: float | None = None
    temperature_epochs: int = 10
    seed: int = 0
    # how the run is run: may differ when a run is resumed
    out: str | None = None
    device: str = "auto"
    amp: bool | None = None
    threads: int | None = None
    test_batch_size: int = 500
    quiet: bool = False

    # fields that may change between a run and its resumption
    RUNTIME_FIELDS = ("out", "device", "amp", "threads", "test_batch_size", "quiet")

    @classmethod
    def run_fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name not in cls.RUNTIME_FIELDS]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; known: {sorted(known)}")
        return cls(**values)

    def check(self) -> None:
        """Raise a ``ValueError``/``TypeError`` for a setting that cannot work."""
        check_model(self.model)
        if self.conv_type is not None:
            check_conv_type(self.conv_type)
        _check_int(self.batch_size, "batch size", 1)
        _check_int(self.test_batch_size, "test batch size", 1)
        _check_int(self.seed, "seed", 0)
        if self.epochs is not None:
            _check_int(self.epochs, "epochs", 1)
        if self.crop_padding is not None:
            _check_int(self.crop_padding, "crop padding", 0)
        if self.image_size is not None:
            _check_int(self.image_size, "image size", 1)
        if self.threads is not None:
            _check_int(self.threads, "threads", 1)
        for name in ("lr", "momentum", "weight_decay", "lr_gamma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and value >= 0
            ):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"unknown learning-rate schedule {self.lr_schedule!r}; expected one of "
                f"{LR_SCHEDULES}"
            )
        if self.lr_schedule == "multistep" and not self.lr_milestones:
            raise ValueError("the multistep schedule needs milestones (epochs), e.g. 30 60 90")
        if self.temperature not in TEMPERATURE_SCHEDULES:
            raise ValueError(
                f"unknown temperature schedule {self.temperature!r}; expected one of "
                f"{TEMPERATURE_SCHEDULES}"
            )
        TemperatureSchedule(self.temperature, self.temperature_initial, self.temperature_epochs)
        if not isinstance(self.model_args, dict):
            raise TypeError(f"model_args must be a dict, got {type(self.model_args).__name__}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ValueError(
                    f"unknown device {self.device!r}; expected 'auto', 'cpu', 'cuda' or 'cuda:N'"
                ) from None


def _check_int(value: object, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained model (unwrapped, on its device), the metrics of
    every epoch (dicts with :data:`METRIC_FIELDS`), the resolved configuration, and whether the
    run was stopped by Ctrl-C before its last epoch (then ``out`` holds the checkpoint)."""

    model: nn.Module
    metrics: list[dict[str, float]]
    config: TrainConfig
    dataset: Dataset
    out: Path
    interrupted: bool = False
    main_process: bool = True  # False on the other processes of a distributed run


# -- distributed --------------------------------------------------------------------------------


@dataclass
class _Processes:
    """This process's place in a ``torchrun`` launch (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device_type: str) -> _Processes:
        """Join the process group that ``torchrun`` describes in the environment (RANK,
        WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): NCCL on CUDA, gloo on the CPU."""
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return cls()
        if dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(),
                       int(os.environ.get("LOCAL_RANK", 0)))
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                   owns_group=True)

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def any(self, flag: bool, device: torch.device) -> bool:
        if not self.distributed:
            return flag
        return self.sum([float(flag)], device)[0] > 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


# -- Ctrl-C -------------------------------------------------------------------------------------


class _StopRequest:
    """The first Ctrl-C (SIGINT) or SIGTERM (a scheduler's preemption, torchrun stopping its
    workers) asks the loop to stop at the next batch boundary and save; a second Ctrl-C
    interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False

    @contextmanager
    def installed(self, announce: Callable[[str], None]) -> Iterator[_StopRequest]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum, frame) -> None:
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            announce(f"{name}: stopping after this batch and saving a checkpoint "
                     "(press Ctrl-C again to quit at once, without saving)")

        previous = {s: signal.signal(s, handler) for s in self.SIGNALS}
        try:
            yield self
        finally:
            for s, old in previous.items():
                signal.signal(s, old)


# -- the run ------------------------------------------------------------------------------------


def _resolve_device(name: str, processes: _Processes | None = None) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was asked for but CUDA is not available here")
        if device.index is None:
            device = torch.device("cuda", processes.local_rank if processes else 0)
    return device


def resolve_defaults(config: TrainConfig, dataset: Dataset) -> TrainConfig:
    """``config`` with the dataset and model defaults filled in."""
    epochs = config.epochs or _RECIPE_EPOCHS.get(dataset.name, _OTHER_EPOCHS)
    conv_type = config.conv_type or fixed_conv_type(config.model) or "static"
    crop = dataset.augmentation.crop_padding if config.crop_padding is None else config.crop_padding
    flip = dataset.augmentation.flip if config.flip is None else config.flip
    initial = TemperatureSchedule(config.temperature, config.temperature_initial,
                                  config.temperature_epochs).start
    return dataclasses.replace(config, epochs=epochs, conv_type=conv_type, crop_padding=crop,
                               flip=flip, temperature_initial=initial)


def _has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _check_batch_size(config: TrainConfig, dataset: Dataset, model: nn.Module,
                      processes: _Processes) -> None:
    n = len(dataset.train)
    if config.batch_size > n:
        raise ValueError(
            f"batch size {config.batch_size} is larger than the training set ({n} images): "
            "an epoch would have no batch; choose a batch size <= the training set"
        )
    if config.batch_size % processes.world_size:
        raise ValueError(
            f"batch size {config.batch_size} (the global batch) must be divisible by the number "
            f"of processes ({processes.world_size})"
        )
    share = config.batch_size // processes.world_size
    if share < 2 and _has_batch_norm(model):
        raise ValueError(
            f"a batch of {share} image per process cannot train {config.model}: BatchNorm needs "
            "at least 2 images per batch; choose a batch size >= "
            f"{2 * processes.world_size}"
        )


def _make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer):
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


def _summary(row: dict[str, float], epochs: int) -> str:
    return (
        f"epoch {int(row['epoch']):>{len(str(epochs))}}/{epochs}  lr {row['lr']:.4g}  "
        f"T {row['temperature']:.3g}  train loss {row['train_loss']:.4f} "
        f"acc {100 * row['train_acc']:.2f}%  test loss {row['test_loss']:.4f} "
        f"acc {100 * row['test_acc']:.2f}%  {row['train_time_s']:.1f} s"
    )


def config_for_resume(out: str | Path, overrides: dict[str, Any]) -> TrainConfig:
    """The configuration stored in ``<out>/checkpoint.pt``, with ``overrides`` applied.

    ``overrides`` may change only :attr:`TrainConfig.RUNTIME_FIELDS`; another setting that
    differs from the stored run raises a :class:`~dynconv.training.checkpoints.CheckpointError`.
    """
    path = Path(out) / CHECKPOINT_NAME
    stored = read_checkpoint(path)["config"]
    changed = {k: v for k, v in overrides.items() if k not in TrainConfig.RUNTIME_FIELDS}
    check_same_config(stored, {**stored, **changed}, changed, path)
    return TrainConfig.from_dict({**stored, **overrides, "out": str(out)})


def load_run(
    out: str | Path, dataset: Dataset | None = None
) -> tuple[nn.Module, TrainConfig, Dataset]:
    """Rebuild the model of the ``dynconv train`` run in the folder ``out``: its configuration
    and weights (``model.pt`` of a finished run, else the last checkpoint's), on the CPU, in eval
    mode at the final temperature. Returns (model, configuration, dataset); the dataset is
    loaded from the configuration unless given (it fixes the model's input and classes)."""
    out = Path(out)
    if not out.is_dir():
        raise ValueError(f"{str(out)!r} is not a folder of a 'dynconv train' run")
    checkpoint = read_checkpoint(out / CHECKPOINT_NAME)
    config = TrainConfig.from_dict({**checkpoint["config"], "out": str(out)})
    dataset = dataset or load_dataset(config.data, config.image_size)
    model = create_model_for_data(
        config.model, config.conv_type, dataset.num_classes, dataset.in_channels,
        min(dataset.image_size), **config.model_args,
    )
    weights = out / MODEL_NAME
    state = (torch.load(weights, map_location="cpu", weights_only=True) if weights.exists()
             else checkpoint["model"])
    model.load_state_dict(state)
    set_temperature(model, TemperatureSchedule.final)
    return model.eval(), config, dataset


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _evaluate(model: nn.Module, test: ImageSet, dataset: Dataset, config: TrainConfig,
              device: torch.device, processes: _Processes, amp: bool) -> tuple[float, float]:
    """(mean loss, accuracy) on the test set, in eval mode at the final temperature."""
    model.eval()
    loss_sum = correct = count = 0.0
    with torch.no_grad(), _autocast(device, amp):
        for images, labels in iterate_test(test, config.test_batch_size, processes.rank,
                                           processes.world_size):
            images = dataset.normalize(images.to(device, non_blocking=True))
            labels = labels.to(device, non_blocking=True)
            logits = model(images).float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(1) == labels).sum().item()
            count += len(labels)
    loss_sum, correct, count = processes.sum([loss_sum, correct, count], device)
    model.train()
    return loss_sum / count, correct / count


def train(
    config: TrainConfig,
    resume: bool = False,
    dataset: Dataset | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``config.model`` with ``config.conv_type`` on ``config.data``; see the module doc.

    Args:
        config: the run; ``config.out`` is its folder (created), which receives
            ``checkpoint.pt``, ``metrics.csv``, ``config.json`` and, at the end, ``model.pt``
            (the state_dict).
        resume: continue the run in ``config.out``; without it, a folder that already holds a
            checkpoint is refused (nothing is overwritten).
        dataset: an already loaded dataset (else ``config.data`` is loaded).
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
    elif checkpoint_path.exists():
        raise CheckpointError(
            f"{str(out)!r} already holds a run ({CHECKPOINT_NAME}); resume it (--resume) or choose "
            "another output folder: nothing is overwritten"
        )
    dataset = dataset or load_dataset(config.data, config.image_size)
    config = resolve_defaults(config, dataset)
    if resume:
        check_same_config(checkpoint["config"], config.to_dict(), TrainConfig.run_fields(),
                          checkpoint_path)

    requested = _resolve_device(config.device)
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    processes = _Processes.from_environment(requested.type)
    try:
        return _run(config, dataset, processes, checkpoint if resume else None, on_epoch)
    finally:
        processes.close()
        torch.set_num_threads(threads)


def _run(config: TrainConfig, dataset: Dataset, processes: _Processes,
         checkpoint: dict[str, Any] | None,
         on_epoch: Callable[[dict[str, float]], None] | None) -> TrainResult:
    device = _resolve_device(config.device, processes)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    amp = device.type == "cuda" if config.amp is None else config.amp
    out = Path(config.out)
    show = processes.main and not config.quiet

    def log(message: str) -> None:
        if show:
            tqdm.write(message, file=sys.stdout)

    torch.manual_seed(config.seed)
    model = create_model_for_data(
        config.model, config.conv_type, dataset.num_classes, dataset.in_channels,
        min(dataset.image_size), **config.model_args,
    ).to(device)
    _check_batch_size(config, dataset, model, processes)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scheduler = _make_scheduler(config, optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
    schedule = TemperatureSchedule(config.temperature, config.temperature_initial,
                                   config.temperature_epochs)
    augmentation = Augmentation(config.crop_padding, config.flip)
    batches_per_epoch = len(dataset.train) // config.batch_size

    metrics: list[dict[str, float]] = []
    epoch, start_batch, partial = 0, 0, [0.0, 0.0, 0.0, 0.0]
    if checkpoint is not None:
        try:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            if scaler.is_enabled() and checkpoint.get("scaler"):
                scaler.load_state_dict(checkpoint["scaler"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise CheckpointError(
                f"the checkpoint {str(out / CHECKPOINT_NAME)!r} does not fit this model: "
                f"{str(error).splitlines()[0]}"
            ) from None
        metrics = [dict(row) for row in checkpoint["metrics"]]
        epoch, start_batch = checkpoint["position"]["epoch"], checkpoint["position"]["batch"]
        if processes.main:  # the stored sums are over all processes: count them once
            partial = list(checkpoint["position"].get("partial", partial))
        _set_rng_state(checkpoint["rng"], device)
    elif processes.main:
        write_atomically(out / CONFIG_NAME,
                         lambda f: f.write(json.dumps(config.to_dict(), indent=2).encode()))

    core = model
    if processes.distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    if checkpoint is None:
        log(f"{dataset.describe()}\n{config.model} with {config.conv_type} convolutions, "
            f"{sum(p.numel() for p in core.parameters()):,} parameters, on {device}"
            + (f" (AMP {'float16' if device.type == 'cuda' else 'bfloat16'})" if amp else "")
            + (f", {processes.world_size} processes" if processes.world_size > 1 else "")
            + f"\n{config.epochs} epochs of {batches_per_epoch} batches of {config.batch_size}; "
            f"SGD lr {config.lr:g} ({config.lr_schedule}), momentum {config.momentum:g}, "
            f"weight decay {config.weight_decay:g}; augmentation: {augmentation}; "
            f"temperature: {schedule}\n-> {out}")
        if config.temperature == "linear" and config.temperature_epochs >= config.epochs:
            log(f"note: the temperature reaches 1 only at the end of epoch "
                f"{config.temperature_epochs}, and the run has {config.epochs}")
    else:
        log(f"resuming {out} at epoch {epoch + 1}, batch {start_batch + 1} of "
            f"{batches_per_epoch}")

    def save(position: dict[str, Any]) -> None:
        if processes.main:
            write_checkpoint(out / CHECKPOINT_NAME, {
                "format": CHECKPOINT_FORMAT,
                "config": config.to_dict(),
                "model": core.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "temperature": schedule.at(position["epoch"], max(0, position["batch"] - 1),
                                           batches_per_epoch),
                "position": position,
                "rng": _rng_state(device),
                "metrics": metrics,
            })
        processes.barrier()

    stop = _StopRequest()
    interrupted = False
    train_set = dataset.train
    model.train()
    with stop.installed(log):
        while epoch < config.epochs and not interrupted:
            indices = batch_indices(len(train_set), config.batch_size, config.seed, epoch,
                                    processes.rank, processes.world_size)
            loss_sum, correct, count, train_time = partial
            lr = optimizer.param_groups[0]["lr"]
            bar = tqdm(total=batches_per_epoch, initial=start_batch, unit="batch",
                       desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, file=sys.stderr,
                       disable=not show or not sys.stderr.isatty(), dynamic_ncols=True)
            temperature = schedule.at(epoch, max(0, start_batch - 1), batches_per_epoch)
            for batch in range(start_batch, batches_per_epoch):
                if processes.any(stop.requested, device):
                    interrupted = True
                    sums = processes.sum([loss_sum, correct, count], device)
                    save({"epoch": epoch, "batch": batch, "partial": [*sums, train_time]})
                    break
                started = time.perf_counter()
                temperature = schedule.at(epoch, batch, batches_per_epoch)
                set_temperature(core, temperature)
                index = indices[batch]
                images = train_set.images[index].to(device, non_blocking=True)
                labels = train_set.labels[index].to(device, non_blocking=True)
                share = len(index)
                images = dataset.normalize(augment(
                    images, augmentation, seeded_generator(config.seed, epoch, batch),
                    start=processes.rank * share, total=share * processes.world_size))
                with _autocast(device, amp):
                    logits = model(images)
                    loss = F.cross_entropy(logits.float(), labels)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                batch_loss = loss.item()
                if not math.isfinite(batch_loss):
                    raise FloatingPointError(
                        f"the training loss became {batch_loss} at epoch {epoch + 1}, batch "
                        f"{batch + 1} (lr {lr:g}, temperature {temperature:.3g}); lower the "
                        "learning rate or resume from the last checkpoint with other settings"
                    )
                loss_sum += batch_loss * len(labels)
                correct += (logits.argmax(1) == labels).sum().item()
                count += len(labels)
                train_time += time.perf_counter() - started
                bar.update()
                bar.set_postfix(loss=f"{batch_loss:.3f}", T=f"{temperature:.3g}")
            bar.close()
            if interrupted:
                break
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            loss_sum, correct, count = processes.sum([loss_sum, correct, count], device)
            scheduler.step()
            started = time.perf_counter()
            set_temperature(core, TemperatureSchedule.final)
            test_loss, test_acc = _evaluate(core, dataset.test, dataset, config, device,
                                            processes, amp)
            row = {
                "epoch": epoch + 1, "lr": lr, "temperature": temperature,
                "train_loss": loss_sum / count, "train_acc": correct / count,
                "test_loss": test_loss, "test_acc": test_acc,
                "train_time_s": train_time, "eval_time_s": time.perf_counter() - started,
                "images_per_s": count / train_time if train_time else float("nan"),
            }
            metrics.append(row)
            epoch, start_batch, partial = epoch + 1, 0, [0.0, 0.0, 0.0, 0.0]
            save({"epoch": epoch, "batch": 0})
            if processes.main:
                _write_metrics(out / METRICS_NAME, metrics)
            log(_summary(row, config.epochs))
            if on_epoch is not None:
                on_epoch(row)

    set_temperature(core, TemperatureSchedule.final)
    if interrupted:
        log(f"stopped at epoch {epoch + 1}, batch {batch + 1}: saved {out / CHECKPOINT_NAME}; "
            "continue with --resume")
    elif processes.main:
        write_atomically(out / MODEL_NAME, lambda f: torch.save(core.state_dict(), f))
    core.eval()
    return TrainResult(core, metrics, config, dataset, out, interrupted, processes.main)
