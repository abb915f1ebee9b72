"""The settings of a training run (:class:`TrainConfig`), their dataset and model defaults, what a
run returns (:class:`TrainResult`), and the names of the files a run writes in its folder."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..layers.factory import check_conv_type
from ..layers.temperature import TemperatureSchedule
from ..models import check_model, check_model_conv_type, fixed_conv_type
from .checkpoints import check_same_config, read_checkpoint
from .data import EVAL_SPLITS, Dataset

__all__ = [
    "CHECKPOINT_NAME",
    "CONFIG_NAME",
    "LR_SCHEDULES",
    "MAX_SEED",
    "METRICS_NAME",
    "METRIC_FIELDS",
    "MODEL_NAME",
    "SettingError",
    "TrainConfig",
    "TrainResult",
    "check_seed",
    "config_for_resume",
    "resolve_defaults",
    "setting",
]

LR_SCHEDULES = ("cosine", "multistep", "constant")
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.csv"
CONFIG_NAME = "config.json"
MODEL_NAME = "model.pt"
METRIC_FIELDS = (
    "epoch", "lr", "temperature", "train_loss", "train_acc", "test_loss", "test_acc",
    "train_time_s", "eval_time_s", "images_per_s",
)
# Epochs when none are given: seed 002 trains CIFAR for 200; the digits are learnt in 30; MNIST
# in 15 (PyTorch's MNIST example trains 14).
_RECIPE_EPOCHS = {"MNIST": 15, "digits": 30, "CIFAR-10": 200, "CIFAR-100": 200}
_OTHER_EPOCHS = 100


@dataclass
class TrainConfig:
    """Everything that defines a training run, and how it is run.

    ``None`` means the default for the dataset or model: ``conv_type`` the model's own
    (static, or ODConv for the ``od_*`` zoo), ``epochs`` 200 for CIFAR, 15 for MNIST, 30 for the
    digits and 100 otherwise, ``crop_padding`` and ``flip`` the dataset's augmentation (CIFAR: 4
    and on; MNIST: 0 and off; digits: 1 and off), ``temperature_initial`` the schedule's
    published start (30 or 34).

    ``train_images`` trains on a fixed, stratified subset of that many training images, the same
    for every seed and type; ``eval_on='val'`` evaluates on a validation split instead of the
    test images (MNIST's own 10,000, else a fixed, stratified fifth of the training images):
    choose a recipe there, and report the test images once
    (:meth:`~dynconv.training.data.Dataset.prepared`). ``eval_every`` evaluates every that many
    epochs and after the last (the other epochs' test metrics are NaN). ``autotune`` times
    the formulations of every new shape once (:class:`dynconv.autotune`), with its choices
    carried between runs by the file ``autotune_cache`` (which implies ``autotune``).
    """

    data: str = "mnist"
    model: str = "small_cnn"
    conv_type: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    image_size: int | None = None
    train_images: int | None = None
    eval_on: str = "test"
    eval_every: int = 1
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
    autotune: bool = False
    autotune_cache: str | None = None

    # fields that may change between a run and its resumption
    RUNTIME_FIELDS = ("out", "device", "amp", "threads", "test_batch_size", "quiet", "autotune",
                      "autotune_cache")

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

    def temperature_schedule(self) -> TemperatureSchedule:
        """The attention temperature's schedule of this run (checks its three settings)."""
        return TemperatureSchedule(self.temperature, self.temperature_initial,
                                   self.temperature_epochs)

    def check(self) -> None:
        """Raise a :class:`SettingError` (a ``ValueError`` naming the setting) or a ``TypeError``
        for a setting that cannot work."""
        with setting("model"):
            check_model(self.model)
        if self.conv_type is not None:
            with setting("conv_type"):
                check_conv_type(self.conv_type)
                check_model_conv_type(self.model, self.conv_type)
        _check_setting(self.batch_size, "batch_size", 1)
        _check_setting(self.test_batch_size, "test_batch_size", 1)
        check_seed(self.seed)
        if self.epochs is not None:
            _check_setting(self.epochs, "epochs", 1)
        if self.crop_padding is not None:
            _check_setting(self.crop_padding, "crop_padding", 0)
        if self.image_size is not None:
            _check_setting(self.image_size, "image_size", 1)
        if self.train_images is not None:
            _check_setting(self.train_images, "train_images", 1)
        _check_setting(self.eval_every, "eval_every", 1)
        if self.eval_on not in EVAL_SPLITS:
            raise SettingError("eval_on", f"eval_on must be one of {EVAL_SPLITS}, got "
                                          f"{self.eval_on!r}")
        if self.threads is not None:
            _check_setting(self.threads, "threads", 1)
        if not isinstance(self.autotune, bool):
            raise SettingError("autotune", f"autotune must be True or False, got "
                                           f"{self.autotune!r}")
        if self.autotune_cache is not None and not isinstance(self.autotune_cache, str):
            raise SettingError("autotune_cache", "autotune_cache must be a file name or None, "
                                                 f"got {self.autotune_cache!r}")
        for name in ("lr", "momentum", "weight_decay", "lr_gamma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and value >= 0
            ):
                raise SettingError(name, f"{name} must be a finite number >= 0, got {value!r}")
        if not self.lr > 0:
            raise SettingError("lr", f"lr must be > 0, got {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise SettingError(
                "lr_schedule", f"unknown learning-rate schedule {self.lr_schedule!r}; expected "
                f"one of {LR_SCHEDULES}"
            )
        if self.lr_schedule == "multistep" and not self.lr_milestones:
            raise SettingError("lr_milestones", "the multistep schedule needs milestones "
                                                "(epochs), e.g. 30 60 90")
        if any(isinstance(m, bool) or not isinstance(m, int) or m < 1
               for m in self.lr_milestones):
            raise SettingError("lr_milestones", "the milestones must be epochs (ints >= 1), got "
                                                f"{self.lr_milestones!r}")
        for name, schedule in (
            ("temperature", lambda: TemperatureSchedule(self.temperature)),
            ("temperature_initial",
             lambda: TemperatureSchedule(self.temperature, self.temperature_initial)),
            ("temperature_epochs", self.temperature_schedule),
        ):
            with setting(name):
                schedule()
        if not isinstance(self.model_args, dict):
            raise TypeError(f"model_args must be a dict, got {type(self.model_args).__name__}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise SettingError(
                    "device", f"unknown device {self.device!r}; expected 'auto', 'cpu', 'cuda' "
                    "or 'cuda:N'"
                ) from None


class SettingError(ValueError):
    """A training setting that cannot work. ``setting`` names it (a :class:`TrainConfig` field,
    or ``conv_types`` and ``seeds`` of :func:`~dynconv.training.compare`), so that the command
    line can name its option."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


@contextmanager
def setting(name: str, errors: tuple[type[Exception], ...] = (ValueError,)) -> Iterator[None]:
    """Raise an error of ``errors`` in the block as a :class:`SettingError` of ``name``."""
    try:
        yield
    except SettingError:
        raise
    except errors as error:
        raise SettingError(name, str(error)) from None


#: The largest seed ``torch.manual_seed`` takes.
MAX_SEED = 2**64 - 1


def check_seed(value: object) -> int:
    """Return ``value`` if it is a seed: an int from 0 to :data:`MAX_SEED`."""
    _check_setting(value, "seed", 0)
    if value > MAX_SEED:  # type: ignore[operator]
        raise SettingError("seed", f"seed must be <= 2**64 - 1 (torch's largest), got {value}")
    return value  # type: ignore[return-value]


def _check_setting(value: object, name: str, minimum: int) -> None:
    # Not _conv_args.check_int: its messages differ ("must be positive", the type's name), and
    # these are the ones `dynconv train` has always printed.
    label = name.replace("_", " ")
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{label} must be an int, got {value!r}")
    if value < minimum:
        raise SettingError(name, f"{label} must be >= {minimum}, got {value}")


@dataclass
class TrainResult:
    """What :func:`~dynconv.training.loop.train` returns: the trained model (unwrapped, on its
    device), the metrics of every epoch (dicts with :data:`METRIC_FIELDS`), the resolved
    configuration, and whether the run was stopped by Ctrl-C before its last epoch (then ``out``
    holds the checkpoint)."""

    model: nn.Module
    metrics: list[dict[str, float]]
    config: TrainConfig
    dataset: Dataset
    out: Path
    interrupted: bool = False
    main_process: bool = True  # False on the other processes of a distributed run


def resolve_defaults(config: TrainConfig, dataset: Dataset) -> TrainConfig:
    """``config`` with the dataset and model defaults filled in."""
    epochs = config.epochs or _RECIPE_EPOCHS.get(dataset.name, _OTHER_EPOCHS)
    conv_type = config.conv_type or fixed_conv_type(config.model) or "static"
    crop = dataset.augmentation.crop_padding if config.crop_padding is None else config.crop_padding
    flip = dataset.augmentation.flip if config.flip is None else config.flip
    initial = config.temperature_schedule().start
    return dataclasses.replace(config, epochs=epochs, conv_type=conv_type, crop_padding=crop,
                               flip=flip, temperature_initial=initial)


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
