"""Read and set the attention temperature of every dynamic layer in a model with one call, and
the published annealing schedules (:class:`TemperatureSchedule`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from .base import DynamicConvBase


def dynamic_layers(model: nn.Module) -> dict[str, DynamicConvBase]:
    """The package's dynamic layers in ``model`` (the model itself included), by module name."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return {name: m for name, m in model.named_modules() if isinstance(m, DynamicConvBase)}


def set_temperature(model: nn.Module, value: float) -> int:
    """Set the temperature of every dynamic layer in ``model``; return how many were set."""
    layers = dynamic_layers(model)
    for layer in layers.values():
        layer.set_temperature(value)
    return len(layers)


def temperatures(model: nn.Module) -> dict[str, float]:
    """The temperature of each dynamic layer in ``model``, by module name."""
    return {name: float(layer.temperature) for name, layer in dynamic_layers(model).items()}


def get_temperature(model: nn.Module) -> float:
    """The temperature shared by every dynamic layer in ``model``.

    Raises ``ValueError`` if the model has no dynamic layer or the layers disagree (then
    :func:`temperatures` lists them).
    """
    values = temperatures(model)
    if not values:
        raise ValueError(f"{type(model).__name__} holds no dynamic layer of dynconv")
    distinct = set(values.values())
    if len(distinct) > 1:
        raise ValueError(
            f"the dynamic layers have different temperatures {sorted(distinct)}; "
            "dynconv.temperatures(model) lists them by layer"
        )
    return distinct.pop()


def set_final_temperature(model: nn.Module) -> int:
    """Set every dynamic layer of ``model`` to the temperature it evaluates at (its
    ``final_temperature``: 1, or 0 for KernelWarehouse); return how many were set."""
    layers = dynamic_layers(model)
    for layer in layers.values():
        layer.set_temperature(layer.final_temperature)
    return len(layers)


def anneal_temperature(model: nn.Module, schedule: TemperatureSchedule, epoch: int,
                       iteration: int, iterations_per_epoch: int) -> float | None:
    """Set every dynamic layer of ``model`` to its temperature under ``schedule`` at iteration
    ``iteration`` of epoch ``epoch``; return the first layer's (what a log shows; None without
    a dynamic layer)."""
    values = [layer.scheduled_temperature(schedule, epoch, iteration, iterations_per_epoch)
              for layer in dynamic_layers(model).values()]
    for layer, value in zip(dynamic_layers(model).values(), values):
        layer.set_temperature(value)
    return values[0] if values else None


def temperature_at(model: nn.Module, schedule: TemperatureSchedule, epoch: int, iteration: int,
                   iterations_per_epoch: int) -> float | None:
    """The temperature that :func:`anneal_temperature` gives the first dynamic layer of
    ``model`` at that iteration (what a log or a checkpoint shows), without setting it; None
    without a dynamic layer."""
    layer = next(iter(dynamic_layers(model).values()), None)
    if layer is None:
        return None
    return layer.scheduled_temperature(schedule, epoch, iteration, iterations_per_epoch)


def final_temperatures(model: nn.Module) -> dict[float, list[str]]:
    """The temperatures ``model``'s dynamic layers end at and evaluate at (1, or 0 for
    KernelWarehouse), each with the names of its layer types, highest first."""
    found: dict[float, set[str]] = {}
    for layer in dynamic_layers(model).values():
        found.setdefault(float(layer.final_temperature), set()).add(type(layer).__name__)
    return {final: sorted(found[final]) for final in sorted(found, reverse=True)}


def describe_schedule(model: nn.Module, schedule: TemperatureSchedule) -> str:
    """``schedule`` in words as ``model``'s dynamic layers follow it (:meth:`TemperatureSchedule.
    describe`), each kind named by its layer types where the model holds both."""
    finals = final_temperatures(model)
    if len(finals) <= 1:
        return schedule.describe(next(iter(finals), schedule.final))
    return "; ".join(f"{', '.join(names)}: {schedule.describe(final)}"
                     for final, names in finals.items())


# -- annealing schedules ------------------------------------------------------------------------

TEMPERATURE_SCHEDULES = ("linear", "step", "none")
#: The temperature of evaluation and inference (and of every schedule once annealing is over).
EVAL_TEMPERATURE = 1.0
# Published defaults: ODConv anneals per iteration from 30 to 1 over the first 10 epochs; the
# DY-Conv seeds start at 34 and subtract 3 per epoch until 1.
_DEFAULT_INITIAL = {"linear": 30.0, "step": 34.0, "none": 1.0}
_STEP_DECREMENT = 3.0


@dataclass(frozen=True)
class TemperatureSchedule:
    """The attention temperature at each training iteration; 1 once annealing is over.

    * ``'linear'`` (official ODConv code): at iteration ``i`` of the run (0-based, counted over
      all epochs) the temperature is ``1 + (initial - 1) * max(0, 1 - (i + 1) / total)`` with
      ``total = epochs * iterations_per_epoch``; it reaches 1 on the last iteration of epoch
      ``epochs - 1`` (0-based).
    * ``'step'`` (DY-Conv seeds 001 and 004): epoch ``e`` (0-based) trains at
      ``max(1, initial - 3 e)``: 34, 31, ..., 4, 1 from epoch 11 on. ``epochs`` is unused.
    * ``'none'``: always 1.

    Evaluation and inference always run at :attr:`final`, 1.
    """

    name: str = "linear"
    initial: float | None = None
    epochs: int = 10

    final: ClassVar[float] = EVAL_TEMPERATURE

    def __post_init__(self) -> None:
        if self.name not in TEMPERATURE_SCHEDULES:
            raise ValueError(
                f"unknown temperature schedule {self.name!r}; expected one of "
                f"{TEMPERATURE_SCHEDULES}"
            )
        if self.initial is not None:
            if isinstance(self.initial, bool) or not isinstance(self.initial, (int, float)):
                raise TypeError(f"the initial temperature must be a number, got {self.initial!r}")
            if not (math.isfinite(self.initial) and self.initial >= self.final):
                raise ValueError("the initial temperature must be a finite number >= 1 (the final "
                                 f"one), got {self.initial}")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"the annealing length must be >= 1 epochs, got {self.epochs!r}")

    @property
    def start(self) -> float:
        """The initial temperature (the published one unless ``initial`` was given)."""
        return _DEFAULT_INITIAL[self.name] if self.initial is None else float(self.initial)

    def at(self, epoch: int, iteration: int, iterations_per_epoch: int) -> float:
        """The temperature for iteration ``iteration`` (0-based) of epoch ``epoch`` (0-based)."""
        if self.name == "none":
            return self.final
        if self.name == "step":
            return max(self.final, self.start - _STEP_DECREMENT * epoch)
        remaining = self.remaining(epoch, iteration, iterations_per_epoch)
        return self.final + (self.start - self.final) * remaining

    def remaining(self, epoch: int, iteration: int, iterations_per_epoch: int) -> float:
        """How much of the annealing is left at that iteration, from 1 to 0: the weight of
        KernelWarehouse's assigned cells, which its official code anneals from 1 to 0 with the
        linear formula (``engine.py``, ``get_temperature`` with ``temp_end=0``)."""
        if self.name == "none":
            return 0.0
        if self.name == "step":
            if self.start == self.final:
                return 0.0
            return (self.at(epoch, iteration, iterations_per_epoch) - self.final) / (
                self.start - self.final)
        total = self.epochs * iterations_per_epoch
        done = epoch * iterations_per_epoch + iteration + 1
        return max(0.0, 1.0 - done / total)

    def describe(self, final: float = EVAL_TEMPERATURE) -> str:
        """In words, for layers that end at temperature ``final`` (their ``final_temperature``):
        1, ``str(self)``; 0, KernelWarehouse's weight of the assigned cells, which follows
        :meth:`remaining` from 1 to 0 and evaluates at 0."""
        if final == self.final:
            return str(self)
        if self.name == "none":
            return "none (0)"
        if self.name == "step":
            return (f"step (1 to 0 as {self.start:g}, -3 per epoch, goes to 1; evaluation at "
                    "0)")
        epochs = "1 epoch" if self.epochs == 1 else f"{self.epochs} epochs"
        return f"linear (1 to 0 over {epochs}, per iteration; evaluation at 0)"

    def __str__(self) -> str:
        if self.name == "none":
            return "none (1)"
        if self.name == "step":
            return f"step ({self.start:g}, -3 per epoch, to 1)"
        epochs = "1 epoch" if self.epochs == 1 else f"{self.epochs} epochs"
        return f"linear ({self.start:g} to 1 over {epochs}, per iteration)"
