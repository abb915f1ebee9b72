"""What a model costs: parameters, multiply-accumulates and inference latency."""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from .temperature import TemperatureSchedule, set_temperature

__all__ = ["count_macs", "count_parameters", "inference_latency_ms"]


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (buffers such as BatchNorm statistics not included)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, inputs: Tensor) -> float:
    """Multiply-accumulates per image of an inference forward pass on ``inputs`` [N, C, H, W].

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` on what actually runs: every
    convolution (the per-sample ones included, whatever their groups) and matrix product,
    those of the attention branches and of the kernel aggregation included. Element-wise work
    (activations, normalisation, attention scaling) is not counted, as in the published tables.
    The model is evaluated in eval mode at the final temperature, then put back as it was.
    """
    was_training = model.training
    model.eval()
    set_temperature(model, TemperatureSchedule.final)
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(inputs)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2 / inputs.shape[0]


def inference_latency_ms(model: nn.Module, inputs: Tensor, min_run_time: float = 0.5) -> float:
    """Median wall time (ms) of one inference forward pass on ``inputs``, in eval mode, without
    gradients, at the final temperature, with all of torch's threads.

    Measured with ``torch.utils.benchmark.Timer.blocked_autorange`` (warm-up, blocks of runs for
    at least ``min_run_time`` seconds, CUDA synchronised).
    """
    benchmark = _import_benchmark()
    was_training = model.training
    model.eval()
    set_temperature(model, TemperatureSchedule.final)
    try:
        with torch.no_grad():
            model(inputs)  # warm-up: lazy initialisation, allocator, dispatch choices
            timer = benchmark.Timer(
                stmt="model(inputs)",
                globals={"model": model, "inputs": inputs},
                num_threads=torch.get_num_threads(),
            )
            measurement = timer.blocked_autorange(min_run_time=min_run_time)
    finally:
        model.train(was_training)
    return measurement.median * 1e3


def _import_benchmark():
    """``torch.utils.benchmark``, without the warning its import logs about a missing CUDA
    toolkit on machines without one (it does not concern timing)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import benchmark
    finally:
        logger.setLevel(level)
    return benchmark
