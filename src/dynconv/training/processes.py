"""Where a training run runs: its place among the processes of a ``torchrun`` launch
(:class:`Processes`), its device (:func:`resolve_device`), and the signals that ask it to stop
(:class:`StopRequest`)."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Processes", "StopRequest", "resolve_device"]


@dataclass
class Processes:
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
    def from_environment(cls, device_type: str) -> Processes:
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
        """``values`` summed over the processes (as float64 on ``device``)."""
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def sum_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (on this process's device) summed element-wise over the processes."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` is set on any process."""
        if not self.distributed:
            return flag
        return self.sum([float(flag)], device)[0] > 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group if this process joined it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(name: str, processes: Processes | None = None) -> torch.device:
    """The device ``name`` (``'auto'``: CUDA if available, else the CPU); a bare ``'cuda'`` is
    the process's local GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was asked for but CUDA is not available here")
        if device.index is None:
            device = torch.device("cuda", processes.local_rank if processes else 0)
    return device


class StopRequest:
    """The first Ctrl-C (SIGINT) or SIGTERM (a scheduler's preemption, torchrun stopping its
    workers) asks the loop to stop at the next batch boundary and save; a second Ctrl-C
    interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False

    @contextmanager
    def installed(self, announce: Callable[[str], None]) -> Iterator[StopRequest]:
        """Handle the signals inside the block (in the main thread only), calling ``announce``
        with a message at the first one."""
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
