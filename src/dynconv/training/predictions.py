"""Each test image's predicted class at one epoch of a run: the file ``test_predictions.csv`` in
the run's folder (:data:`PREDICTIONS_NAME`), which ``dynconv compare`` pairs image by image
between convolution types for its intervals.

The training loop rewrites it, atomically, after every epoch it evaluates (``eval_every``;
always the last) and before that epoch's checkpoint, so a run's folder always holds the
predictions of the last epoch its checkpoint counts as evaluated, also after a kill and
``--resume``.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .._io import write_atomically

__all__ = ["PREDICTIONS_NAME", "Predictions", "read_predictions", "write_predictions"]

PREDICTIONS_NAME = "test_predictions.csv"
_FIELDS = ["epoch", "image", "label", "predicted"]


@dataclass
class Predictions:
    """``epoch`` (1-based), the test labels [N] and the predicted classes [N] (int64), in the
    test set's order."""

    epoch: int
    labels: Tensor
    predicted: Tensor

    def __post_init__(self) -> None:
        if self.labels.shape != self.predicted.shape or self.labels.dim() != 1:
            raise ValueError(f"labels and predicted must be two tensors [N], got "
                             f"{list(self.labels.shape)} and {list(self.predicted.shape)}")

    @property
    def correct(self) -> Tensor:
        """Whether each image was classified correctly [N] (bool)."""
        return self.predicted == self.labels


def write_predictions(path: str | Path, predictions: Predictions) -> None:
    """Write ``predictions`` as CSV (``epoch, image, label, predicted``), atomically."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(_FIELDS)
    epoch = predictions.epoch
    writer.writerows((epoch, i, label, predicted) for i, (label, predicted) in enumerate(
        zip(predictions.labels.tolist(), predictions.predicted.tolist())))
    write_atomically(path, lambda f: f.write(text.getvalue().encode()))


def read_predictions(path: str | Path) -> Predictions:
    """Read a file of :func:`write_predictions`. Raises a ``ValueError`` naming the file if it is
    missing or is not such a file (another header, a row that is not four integers, images out
    of order, several epochs)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is missing: the run kept no per-image test predictions")
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0] != _FIELDS:
        header = ",".join(rows[0]) if rows else ""
        raise ValueError(f"{str(path)!r} is not a file of per-image test predictions: expected "
                         f"the header {','.join(_FIELDS)}, got {header!r}")
    try:
        values = torch.tensor([[int(v) for v in row] for row in rows[1:]], dtype=torch.int64)
    except ValueError:
        values = None
    if values is None or values.dim() != 2 or values.shape[1] != len(_FIELDS):
        raise ValueError(f"{str(path)!r} is damaged: every row must be {len(_FIELDS)} integers "
                         f"({', '.join(_FIELDS)})")
    epochs = values[:, 0].unique().tolist()
    if len(epochs) != 1 or not torch.equal(values[:, 1], torch.arange(len(values))):
        raise ValueError(f"{str(path)!r} is damaged: expected one epoch and the images 0 to "
                         f"{len(values) - 1} in order, got epochs {epochs[:5]}")
    return Predictions(int(epochs[0]), values[:, 2].clone(), values[:, 3].clone())
