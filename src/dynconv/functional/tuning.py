"""Opt-in autotuning of the ops' formulations, as ``torch.backends.cudnn.benchmark`` does for
convolution algorithms: the first call with a new key times every exact formulation, keeps the
fastest and reuses it.

``dynconv.autotune()`` switches it on (globally, or for a ``with`` block); see
:class:`autotune`. A key is the operation, the shapes and dtypes of its tensors, the geometry
(stride, padding, dilation, groups), the input's memory format, the device, whether gradients
are needed and the autocast state. With gradients, a formulation is timed forward and backward.
The choices can be carried to the next run by a cache file, one section per device name, torch
version and dynconv version. In a distributed run (``torch.distributed`` initialised, more than
one process) rank 0 decides every key that needs gradients (from its cache or by timing) and
every process receives its choice (with the other processes' keys, checked to be the same), so
that every rank trains with the same formulation; the processes must then meet those keys in
the same order (the same model on batches of the same shape, as DistributedDataParallel
trains). Keys without gradients (evaluation, whose shards may differ between processes) are
decided by each process for itself.

Tuning never runs while a model is compiled, traced or exported, inside a backward, or under
saved-tensor hooks of the caller (activation checkpointing recomputes the forward and expects
the same formulation again): the rule decides there.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import allocator
from .._conv_args import ConvGeometry
from .._io import write_atomically
from .._version import __version__
from ._common import (
    autocast_dtype,
    is_channels_last,
    is_exporting,
    saved_tensor_hooks_active,
)

__all__ = ["AutotuneError", "TuneKey", "autotune", "autotune_enabled", "autotune_summary",
           "reset_autotune"]

#: Timer: ``timer(key, method, run)`` calls ``run()`` once and returns its seconds.
Timer = Callable[["TuneKey", str, Callable[[], None]], float]

CACHE_FORMAT = "dynconv-autotune-1"
#: A formulation whose extra buffers (im2col, K-fold outputs) would pass this is not timed.
MAX_CANDIDATE_BYTES = 2**30


class AutotuneError(ValueError):
    """A cache file that is not a dynconv autotune cache, or processes of a distributed run
    that met different keys."""


@dataclass(frozen=True)
class TuneKey:
    """What a formulation's choice depends on. ``device`` names the machine (a CUDA device's
    name, or the CPU model and torch's thread count); ``text`` is the rest, as the cache
    writes it."""

    device: str
    text: str


@dataclass
class _Settings:
    enabled: bool = False
    cache: Path | None = None
    timer: Timer | None = None
    repeats: int = 3
    budget_s: float = 60.0


@dataclass
class _Stats:
    timed: int = 0
    cached: int = 0
    received: int = 0  # decided by rank 0
    over_budget: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    cache: Path | None = None  # the file the cached choices came from
    budget_s: float = 0.0  # the budget that was spent


_settings = _Settings()
_stats = _Stats()
_choices: dict[TuneKey, str] = {}  # every key met or loaded in this process
_loaded: set[Path] = set()  # cache files read into _choices
_from_cache: set[TuneKey] = set()  # loaded keys not met yet
_agreed: set[TuneKey] = set()  # keys agreed with rank 0 in this process
_untuned: set[TuneKey] = set()  # keys left to the rule (over budget): never cached
_timing = False  # a formulation is being timed: nested 'auto' calls take the rule
_trace: list[tuple[str, str]] | None = None  # see trace()


class autotune:
    """Switch autotuning on (or off), globally and at once; as a context manager, restore the
    previous settings on exit.

    ``dynconv.autotune()`` at the top of a script tunes every dynamic layer for the rest of the
    process, as ``torch.backends.cudnn.benchmark = True`` does for convolutions;
    ``with dynconv.autotune(): ...`` tunes inside the block only. Choices made stay in the
    process (:func:`reset_autotune` forgets them).

    Args:
        enabled: switch on (default) or off.
        cache: a JSON file to read choices from and to write every new choice to (atomically;
            by rank 0 only in a distributed run). Sections for other devices, torch or dynconv
            versions are kept but not used.
        timer: ``timer(key, method, run) -> seconds`` of one ``run()`` (default: the wall clock,
            the device synchronised around the call); tests inject their own.
        repeats: timed calls per formulation after one untimed warm-up call; the median
            counts. The rule's choice is timed first; a formulation stops at a call more than
            4x slower than the best median so far.
        budget_s: seconds of tuning per process; once spent, new keys take the rule.
    """

    def __init__(self, enabled: bool = True, *, cache: str | os.PathLike | None = None,
                 timer: Timer | None = None, repeats: int = 3, budget_s: float = 60.0) -> None:
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be True or False, got {enabled!r}")
        if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
            raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
        if (not isinstance(budget_s, (int, float)) or isinstance(budget_s, bool)
                or not budget_s > 0):
            raise ValueError(f"budget_s must be a positive number of seconds, got {budget_s!r}")
        if timer is not None and not callable(timer):
            raise TypeError(f"timer must be callable as timer(key, method, run), got {timer!r}")
        if cache is not None and not isinstance(cache, (str, os.PathLike)):
            raise TypeError(f"cache must be a path or None, got {type(cache).__name__}")
        self._previous = _Settings(**vars(_settings))
        path = None if cache is None else Path(cache)
        if enabled and path is not None:
            _load_cache(path)
        _settings.enabled, _settings.cache, _settings.timer = enabled, path, timer
        _settings.repeats, _settings.budget_s = repeats, float(budget_s)

    def __enter__(self) -> autotune:
        return self

    def __exit__(self, *exc: object) -> None:
        for name, value in vars(self._previous).items():
            setattr(_settings, name, value)


def autotune_enabled() -> bool:
    """Whether :class:`autotune` is on."""
    return _settings.enabled


def reset_autotune() -> None:
    """Forget every choice and the counts of :func:`autotune_summary` (not the settings)."""
    global _stats
    _choices.clear()
    _loaded.clear()
    _from_cache.clear()
    _agreed.clear()
    _untuned.clear()
    _stats = _Stats()


def autotune_summary() -> str | None:
    """One line: how many keys were tuned and how long it took, or ``None`` if none was met."""
    s = _stats
    if not (s.timed or s.cached or s.received or s.over_budget):
        return None
    parts = [f"{s.timed} timed in {s.seconds:.1f} s"]
    if s.cached:
        parts.append(f"{s.cached} from the cache {s.cache}")
    if s.received:
        parts.append(f"{s.received} decided by rank 0")
    if s.over_budget:
        parts.append(f"{s.over_budget} left to the rule (the {s.budget_s:g} s budget was "
                     "spent)")
    total = s.timed + s.cached + s.received + s.over_budget
    line = f"autotune: {total} shape{'s' if total != 1 else ''}: " + ", ".join(parts)
    if s.failures:
        line += f"; formulations that failed and were skipped: {'; '.join(s.failures[:3])}"
    return line


def choose(
    op: str,
    tensors: Sequence[Tensor | None],
    geometry: ConvGeometry,
    candidates: Callable[[], Sequence[str]],
    run: Callable[[str, list[Tensor | None]], Tensor],
    rule: Callable[[], str],
) -> str:
    """The formulation of one call of ``op``: the rule's unless autotuning is on and may run
    here; then the key's choice, timed on first use.

    Args:
        op: the operation's name (part of the key).
        tensors: the call's tensors, the input first (``None`` for absent optional ones).
        geometry: the convolution's (its stride, padding, dilation and groups are part of the
            key; the kernel size is in the tensors' shapes).
        candidates: gives the exact formulations to time (called only then).
        run: ``run(method, tensors)`` calls the op with ``method`` forced on tensors like
            ``tensors`` and returns its output.
        rule: the dispatch rule's choice.
    """
    if not _settings.enabled or _timing or not _may_tune(tensors[0]):
        return traced(op, rule())
    return traced(op, _tuned(op, tensors, geometry, candidates, run, rule))


def _tuned(op, tensors, geometry, candidates, run, rule) -> str:
    x = tensors[0]
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors)
    key = _key(op, tensors, geometry, needs_grad)
    choice = _choices.get(key)
    # the training step runs in lockstep under DistributedDataParallel; evaluation need not
    # (its shards may differ in size): only keys with gradients are agreed between processes
    distributed = needs_grad and _world_size() > 1
    if distributed and key not in _agreed:
        if torch.distributed.get_rank() != 0:
            choice = _agree(key, None)  # rank 0's, from its cache or its timing
            _stats.received += 1
            _from_cache.discard(key)
        else:
            if choice is None:
                choice = _decide(key, x.device, tensors, needs_grad, candidates, run, rule)
            _count_if_cached(key)
            _agree(key, choice)
        _choices[key] = choice
        return choice
    if choice is None:
        choice = _choices[key] = _decide(key, x.device, tensors, needs_grad, candidates, run,
                                         rule)
    _count_if_cached(key)
    return choice


@contextlib.contextmanager
def trace() -> Iterator[list[tuple[str, str]]]:
    """Record the formulation of every ``'auto'`` call in the block (forward calls, not those
    made while timing): a list of (operation, formulation), filled as the calls run. A mixture
    that the rule assembles into per-sample kernels shows two entries (``'aggregate'``, then
    the per-sample method); a tuned one, one (``'aggregate/unfold'``)."""
    global _trace
    previous, _trace = _trace, []
    try:
        yield _trace
    finally:
        _trace = previous


def traced(op: str, choice: str) -> str:
    """Record that a call of ``op`` runs ``choice`` (when :func:`trace` is on); return it."""
    if (_trace is not None and not _timing and not _in_backward()
            and not torch.compiler.is_compiling()):
        _trace.append((op, choice))
    return choice


def _in_backward() -> bool:
    graph_task = getattr(torch._C, "_current_graph_task_id", None)
    return graph_task is not None and graph_task() != -1


def _count_if_cached(key: TuneKey) -> None:
    """Count ``key`` as taken from the cache, on its first use."""
    if key in _from_cache:
        _from_cache.discard(key)
        _stats.cached += 1
        _stats.cache = _settings.cache


def _may_tune(x: Tensor) -> bool:
    """Not on meta tensors or an empty batch, not while compiled, traced or exported, not
    inside a backward, not under the caller's saved-tensor hooks."""
    if x.is_meta or x.shape[0] == 0 or torch.compiler.is_compiling() or is_exporting():
        return False
    return not _in_backward() and not saved_tensor_hooks_active()


def _decide(key: TuneKey, device: torch.device, tensors, needs_grad: bool, candidates, run,
            rule) -> str:
    """Time every candidate (within the budget) and keep the fastest; write the cache."""
    if _stats.seconds >= _settings.budget_s:
        _stats.over_budget += 1
        _stats.budget_s = _settings.budget_s
        _untuned.add(key)
        return rule()
    global _timing
    start = time.perf_counter()
    timer = _settings.timer or functools.partial(_wall_clock, device)
    medians: dict[str, float] = {}
    _timing = True
    try:
        first = rule()  # timed first: the best so far is a good one from the start
        ordered = sorted(candidates(), key=lambda m: not m.startswith(first))
        for method in ordered:
            call = _call(method, tensors, needs_grad, run)
            try:
                call()  # warm-up: lazy initialisation, caches, first page faults
                best = min(medians.values(), default=math.inf)
                times: list[float] = []
                while len(times) < _settings.repeats and not (times and times[-1] > 4 * best):
                    times.append(timer(key, method, call))  # a clear loser stops early
            except torch.OutOfMemoryError:
                _stats.failures.append(f"{method} ran out of memory")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            medians[method] = statistics.median(times)
    finally:
        _timing = False
        _stats.seconds += time.perf_counter() - start
    _stats.timed += 1
    choice = min(medians, key=medians.__getitem__) if medians else rule()
    if _settings.cache is not None and _is_rank_zero():
        _choices[key] = choice
        _save_cache(_settings.cache)
    return choice


def _call(method: str, tensors: Sequence[Tensor | None], needs_grad: bool,
          run: Callable[[str, list[Tensor | None]], Tensor]) -> Callable[[], None]:
    """One forward (and backward, when gradients are needed) of ``method`` on detached copies
    of the call's tensors: nothing reaches the caller's graph."""
    leaves = [None if t is None else t.detach().requires_grad_(needs_grad and t.requires_grad)
              for t in tensors]
    gradient: list[Tensor] = []

    def call() -> None:
        with torch.set_grad_enabled(needs_grad):
            out = run(method, leaves)
            if not needs_grad:
                return
            if not gradient:
                gradient.append(torch.ones_like(out))
            out.backward(gradient[0])
        for t in leaves:
            if t is not None:
                t.grad = None

    return call


def _wall_clock(device: torch.device, key: TuneKey, method: str, run: Callable[[], None]
                ) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _key(op: str, tensors: Sequence[Tensor | None], geometry: ConvGeometry, needs_grad: bool
         ) -> TuneKey:
    x = tensors[0]
    shapes = ",".join("-" if t is None else f"{_join(t.shape, 'x')}:{_dtype(t.dtype)}"
                      for t in tensors)
    amp = autocast_dtype(x.device.type)
    parts = [
        op, shapes,
        "stride=" + _join(geometry.stride), "pads=" + _join(geometry.pads),
        "dilation=" + _join(geometry.dilation), f"groups={geometry.groups}",
        "channels_last" if is_channels_last(x) else "contiguous",
        "grad" if needs_grad else "no_grad",
        "autocast=" + ("off" if amp is None else _dtype(amp)),
    ]
    if x.device.type == "cpu":
        parts.append("freed_memory_kept" if allocator.freed_memory_is_kept() else "malloc")
    return TuneKey(device_name(x.device), " ".join(parts))


def _join(values: Sequence[int], sep: str = ",") -> str:
    return sep.join(map(str, values))


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@functools.cache
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def device_name(device: torch.device) -> str:
    """The machine a choice was made on: the CUDA device's name, or the CPU model and torch's
    thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"{_cpu_name()}, {torch.get_num_threads()} threads"
    return device.type


def _section(device: str) -> str:
    return f"{device} | torch {torch.__version__} | dynconv {__version__}"


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _is_rank_zero() -> bool:
    return _world_size() == 1 or torch.distributed.get_rank() == 0


def _agree(key: TuneKey, choice: str | None) -> str:
    """Rank 0's choice for ``key``, gathered by every process with every process's key; an
    :class:`AutotuneError` on every process if one met another key."""
    dist = torch.distributed
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (key, choice))
    others = {rank: k.text for rank, (k, _) in enumerate(gathered) if k != key}
    if others:
        rank, text = next(iter(others.items()))
        raise AutotuneError(
            f"dynconv.autotune: rank {dist.get_rank()} met {key.text!r} while rank {rank} met "
            f"{text!r}: the processes of a distributed run must call the dynamic layers with "
            "the same shapes in the same order (equal batch sizes on every rank)"
        )
    _agreed.add(key)
    return gathered[0][1]


def _load_cache(path: Path) -> None:
    """Read the sections of ``path`` for this torch and dynconv version into the choices."""
    if path in _loaded or not path.exists():
        return
    content = _read_cache(path)
    suffix = _section("")  # " | torch <version> | dynconv <version>"
    for section, entries in content["sections"].items():
        if not section.endswith(suffix):
            continue  # another torch or dynconv version: kept in the file, not used
        device = section[: -len(suffix)]
        for text, choice in entries.items():
            key = TuneKey(device, text)
            if key not in _choices:
                _choices[key] = choice
                _from_cache.add(key)
    _loaded.add(path)


def check_cache(path: str | os.PathLike) -> Path:
    """``path`` as a cache file: absent (to be written) or a dynconv autotune cache; else an
    :class:`AutotuneError` naming it and what is wrong."""
    path = Path(path)
    if path.exists():
        _read_cache(path)
    return path


def _read_cache(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise AutotuneError(f"autotune cache {path}: expected a JSON file, got the folder")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AutotuneError(f"autotune cache {path}: not a JSON file ({exc}); delete it or "
                            "give another path") from None
    sections = content.get("sections") if isinstance(content, dict) else None
    if (not isinstance(content, dict) or content.get("format") != CACHE_FORMAT
            or not isinstance(sections, dict)
            or not all(isinstance(e, dict) and all(isinstance(c, str) for c in e.values())
                       for e in sections.values())):
        raise AutotuneError(
            f"autotune cache {path}: expected a dynconv autotune cache ({{'format': "
            f"'{CACHE_FORMAT}', 'sections': {{...}}}}), got something else; delete it or give "
            "another path")
    return content


def _save_cache(path: Path) -> None:
    """Write every choice of this process into ``path``'s sections, keeping the others."""
    content = _read_cache(path) if path.exists() else {"format": CACHE_FORMAT, "sections": {}}
    sections: dict[str, dict[str, str]] = content["sections"]
    for key, choice in _choices.items():
        if key in _untuned:
            continue
        sections.setdefault(_section(key.device), {})[key.text] = choice
    text = json.dumps(content, indent=1, sort_keys=True) + "\n"
    write_atomically(path, lambda f: f.write(text.encode("utf-8")))
