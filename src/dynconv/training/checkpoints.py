"""Training checkpoints: written atomically, read back with clear errors.

A checkpoint is one ``torch.save`` file, a dict of tensors and plain Python values (so it loads
with ``weights_only=True``): the run's configuration, the model, optimizer, learning-rate
scheduler and gradient-scaler states, the temperature, the position (epoch and batch) to
continue from, the RNG states and the metrics so far. ``state['model']`` is a plain state_dict,
so :func:`dynconv.load_checkpoint`-style loaders and ``torch.load`` read it too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from .._io import write_atomically

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "read_checkpoint", "write_checkpoint"]

# Bumped when the layout of the dict changes; an older layout is refused with a clear error.
CHECKPOINT_FORMAT = 1
_REQUIRED = ("format", "config", "model", "optimizer", "scheduler", "position", "rng", "metrics")


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not belong to the run that reads it."""


def write_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """Save ``state`` (which must hold the keys listed in the module doc) atomically."""
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise ValueError(f"a checkpoint needs the keys {list(_REQUIRED)}; missing {missing}")
    write_atomically(path, lambda file: torch.save(dict(state), file))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`write_checkpoint` (tensors on the CPU).

    Raises :class:`CheckpointError` if the file is missing, unreadable (truncated, not a torch
    file) or not a dynconv training checkpoint of this format.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"the checkpoint {str(path)!r} is corrupt or not a torch file ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no message'}); it was not "
            "used: delete it to start again, or keep it and choose another output folder"
        ) from None
    if not isinstance(state, dict) or any(k not in state for k in _REQUIRED):
        raise CheckpointError(
            f"{str(path)!r} is not a dynconv training checkpoint (expected a dict with the keys "
            f"{list(_REQUIRED)})"
        )
    if state["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{str(path)!r} has checkpoint format {state['format']!r}; this version of dynconv "
            f"reads format {CHECKPOINT_FORMAT}"
        )
    return state


def check_same_config(
    stored: Mapping[str, Any], requested: Mapping[str, Any], keys: Iterable[str], path: str | Path
) -> None:
    """Raise :class:`CheckpointError` naming every key of ``keys`` whose value differs."""
    differences = [
        f"{key}: checkpoint {stored.get(key)!r}, now {requested.get(key)!r}"
        for key in keys
        if stored.get(key) != requested.get(key)
    ]
    if differences:
        raise CheckpointError(
            f"the checkpoint {str(path)!r} belongs to a different run ("
            + "; ".join(differences)
            + "); resume with the same settings, or start a new run in another output folder"
        )
