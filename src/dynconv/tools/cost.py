"""What a model costs: parameters, multiply-accumulates, inference latency and peak memory.

MACs of the package's layers are counted by one analytic rule per layer type (see
:func:`layer_macs` and docs/tools.md), not by what a counter sees run: the mixture formulation
that the dispatch rule picks (``'mixout'`` runs K dense convolutions) changes the work done, not
what the layer costs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from .._conv_args import parse_geometry
from ..layers.base import DynamicConvBase, LayerMacs, kernel_numel
from ..layers.temperature import set_final_temperature
from .rules import RuleTable

__all__ = [
    "LayerMacs",
    "conv_layer_macs",
    "count_macs",
    "count_parameters",
    "inference_latency_ms",
    "layer_macs",
    "peak_bytes_of",
    "peak_memory_bytes",
    "register_mac_rule",
]


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (buffers such as BatchNorm statistics not included)."""
    return sum(p.numel() for p in model.parameters())


# -- the analytic rule ------------------------------------------------------------------------


MacRule = Callable[[nn.Module, tuple[int, int]], LayerMacs]
_MAC_RULES = RuleTable("macs")


def register_mac_rule(layer_type: type, rule: MacRule) -> None:
    """Count layers of ``layer_type`` (and its subclasses) with ``rule(layer, (H_in, W_in))``:
    for a foreign layer type; a dynamic layer type counts itself
    (:meth:`~dynconv.DynamicConvBase.macs`)."""
    _MAC_RULES.register(layer_type, rule)


def layer_macs(layer: nn.Module, input_size: tuple[int, int]) -> LayerMacs:
    """The analytic MACs of ``layer`` (``nn.Conv2d`` or a dynamic layer) for one image of
    spatial size ``input_size`` (H_in, W_in); raise ``TypeError`` for a layer without a rule."""
    rule = _MAC_RULES.lookup(layer)
    if rule is None:
        raise TypeError(
            f"no MAC rule for {type(layer).__name__}; expected a dynamic layer or one of "
            f"{_MAC_RULES.registered()} (see register_mac_rule)"
        )
    return rule(layer, tuple(input_size))


def _static_rule(layer: nn.Conv2d, input_size: tuple[int, int]) -> LayerMacs:
    geometry = parse_geometry(layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                              layer.groups)
    h_out, w_out = geometry.output_size(*input_size)
    return LayerMacs(kernel_numel(layer) * h_out * w_out)


register_mac_rule(nn.Conv2d, _static_rule)


def _counted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers with a MAC rule, outermost only (not the convolutions inside a dynamic layer)."""
    found: list[tuple[str, nn.Module]] = []
    dynamic: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in dynamic):
            continue
        if isinstance(module, DynamicConvBase):
            dynamic.append(name)
        if _MAC_RULES.lookup(module) is not None:
            found.append((name, module))
    return found


def conv_layer_macs(model: nn.Module, inputs: Tensor) -> dict[str, tuple[nn.Module, LayerMacs]]:
    """Per convolution layer (static or dynamic, by module name): the layer and its analytic MACs
    per image on ``inputs`` [N, C, H, W], summed over the calls of the forward pass; in eval
    mode without gradients. Layers that did not run are left out."""
    layers = _counted_layers(model)
    seen: dict[str, list[tuple[int, int]]] = {}

    def recorder(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            seen.setdefault(name, []).append(tuple(args[0].shape[-2:]))
        return hook

    handles = [m.register_forward_pre_hook(recorder(n)) for n, m in layers]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    result = {}
    for name, module in layers:
        if name in seen:
            parts = [layer_macs(module, size) for size in seen[name]]
            result[name] = (module, LayerMacs(sum(p.conv for p in parts),
                                              sum(p.attention for p in parts),
                                              sum(p.aggregation for p in parts)))
    return result


def count_macs(model: nn.Module, inputs: Tensor) -> float:
    """Multiply-accumulates per image of an inference forward pass on ``inputs`` [N, C, H, W].

    The package's dynamic layers are counted by their analytic rule (:func:`layer_macs`: the
    per-sample convolution, the attention branch and the kernel aggregation), whatever
    formulation ran; everything else by ``torch.utils.flop_counter.FlopCounterMode`` on what
    runs (convolutions, matrix products, linear layers). Element-wise work (activations,
    normalisation, pooling, attention scaling) is not counted, as in the published tables. The
    model is evaluated in eval mode at the final temperature, then put back as it was.
    """
    was_training = model.training
    model.eval()
    set_final_temperature(model)
    counter = FlopCounterMode(display=False)
    inside: list[float] = []  # FLOPs the counter saw inside each dynamic layer call
    analytic: list[int] = []
    handles = []
    for module in model.modules():
        if isinstance(module, DynamicConvBase):
            def before(m, args):
                inside.append(-counter.get_total_flops())
                analytic.append(layer_macs(m, tuple(args[0].shape[-2:])).total)

            def after(m, args, output):
                inside[-1] += counter.get_total_flops()

            handles += [module.register_forward_pre_hook(before),
                        module.register_forward_hook(after)]
    try:
        with torch.no_grad(), counter:
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    other = (counter.get_total_flops() - sum(inside)) / 2 / inputs.shape[0]
    return other + sum(analytic)


# -- time and memory ----------------------------------------------------------------------------
def inference_latency_ms(model: nn.Module, inputs: Tensor, min_run_time: float = 0.5) -> float:
    """Median wall time (ms) of one inference forward pass on ``inputs``, in eval mode, without
    gradients, at the final temperature, with all of torch's threads.

    Measured with ``torch.utils.benchmark.Timer.blocked_autorange`` (warm-up, blocks of runs for
    at least ``min_run_time`` seconds, CUDA synchronised).
    """
    benchmark = _import_benchmark()
    was_training = model.training
    model.eval()
    set_final_temperature(model)
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


KINETO_QUIET = "6"
"""Kineto's log level above all of its messages (0 verbose ... 4 error, 5 USDT markers)."""


def peak_memory_bytes(model: nn.Module, inputs: Tensor) -> int:
    """Peak bytes of tensor memory allocated during one inference forward pass on ``inputs``
    (activations and temporaries; the parameters and ``inputs``, allocated before, are not
    included), in eval mode without gradients, at the final temperature (see
    :func:`peak_bytes_of`).
    """
    was_training = model.training
    model.eval()
    set_final_temperature(model)
    try:
        with torch.no_grad():
            model(inputs)  # warm-up: lazy initialisation and caches are not the pass's memory
            return peak_bytes_of(lambda: model(inputs), inputs.device)
    finally:
        model.train(was_training)


def peak_bytes_of(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes of tensor memory allocated while ``fn()`` runs, above what was allocated
    before (so tensors made earlier, such as parameters and inputs, are not included; what
    ``fn`` keeps alive counts until it returns).

    On CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before. On the CPU:
    the running total of the allocations and frees that ``torch.profiler`` records with
    ``profile_memory=True``, in the order they happened. The profiler's C++ part (Kineto) logs
    ``profiler_start``/``profiler_stop`` lines for every use and, on a CUDA build of torch
    without a GPU driver, ``gpuGetDeviceCount failed``: its own switch ``KINETO_LOG_LEVEL`` is
    set to silence it (read once, when the first profiler of the process starts) unless it is
    set already.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    os.environ.setdefault("KINETO_LOG_LEVEL", KINETO_QUIET)
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak
