"""Training checkpoints: written atomically with a checksum, the previous one kept, read back with
clear errors.

A checkpoint is one ``torch.save`` file, a dict of tensors and plain Python values (so it loads
with ``weights_only=True``): the run's configuration, the model, optimizer, learning-rate
scheduler and gradient-scaler states, the temperature, the position (epoch and batch) to
continue from, the RNG states, the metrics so far, and the checksum of all of these
(:func:`dynconv.tools.checkpoint.save_file`). ``state['model']`` is a plain state_dict, so
:func:`dynconv.load_checkpoint`-style loaders and ``torch.load`` read it too.

Each new checkpoint is read back and verified before it replaces ``checkpoint.pt``, and the one it
replaces is kept as ``checkpoint.prev.pt``: if the latest is found corrupt, the error names the
previous one and how to resume from it.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..tools.checkpoint import CheckpointError, load_file, save_file

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "previous_checkpoint",
    "read_checkpoint",
    "write_checkpoint",
]

# Bumped when the layout of the dict changes; an older layout is refused with a clear error.
CHECKPOINT_FORMAT = 1
_REQUIRED = ("format", "config", "model", "optimizer", "scheduler", "position", "rng", "metrics")


def previous_checkpoint(path: str | Path) -> Path:
    """Where the checkpoint that ``path`` replaced is kept: ``checkpoint.pt`` ->
    ``checkpoint.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def write_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """Save ``state`` (which must hold the keys listed in the module doc) atomically, with its
    checksum; the file it replaces becomes :func:`previous_checkpoint`."""
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise ValueError(f"a checkpoint needs the keys {list(_REQUIRED)}; missing {missing}")
    save_file(dict(state), path, previous=previous_checkpoint(path))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`write_checkpoint` (tensors on the CPU), checksum
    verified.

    Raises :class:`CheckpointError` (one line) if the file is missing, unreadable (truncated, not
    a torch file, checksum failed) or not a dynconv training checkpoint of this format; when
    :func:`previous_checkpoint` is intact, the message names it and how to resume from it.
    """
    path = Path(path)
    try:
        return _read(path)
    except CheckpointError as error:
        raise CheckpointError(f"{error}{_fallback(path)}") from None


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}")
    state = load_file(path)
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


def _fallback(path: Path) -> str:
    """What to do instead of using ``path``: resume from the previous checkpoint if it is
    intact, else start again."""
    previous = previous_checkpoint(path)
    unused = "; it was not used" if path.exists() else ""
    start_again = "delete it to start again, or keep it and choose another output folder"
    if not previous.is_file():
        return f"{unused}: {start_again}" if unused else ""
    try:
        state = _read(previous)
    except CheckpointError:
        return f"{unused}, and the previous checkpoint {str(previous)!r} is unusable too" + (
            f": {start_again}" if unused else "")
    epoch, batch = state["position"]["epoch"], state["position"]["batch"]
    of = f" of {state['config']['epochs']}" if state["config"].get("epochs") else ""
    done = (f"epoch {epoch + 1}{of} stopped after batch {batch}" if batch
            else f"epoch {epoch}{of} done")
    return (
        f"{unused}. The previous checkpoint {str(previous)!r} is intact ({done}): to use it "
        f"instead, run  mv {shlex.quote(str(previous))} {shlex.quote(str(path))}  and run the "
        "command again"
    )


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
