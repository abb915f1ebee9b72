"""Image classification data held in memory, and its batches.

Images are kept as uint8 [N, C, H, W] tensors (:class:`ImageSet`, :class:`Dataset`; the loaders
are in :mod:`dynconv.training.sources`). Batches are drawn from a permutation seeded by
(seed, epoch), and augmented (random crop after zero padding, horizontal flip) on the batch with
a generator seeded by (seed, epoch, batch), so a run is reproducible and any batch can be
replayed exactly after a resume, with no data-loader workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Augmentation",
    "Dataset",
    "ImageSet",
    "augment",
    "batch_indices",
    "iterate_test",
    "seeded_generator",
]


@dataclass
class ImageSet:
    """Images [N, C, H, W] (uint8) and their labels [N] (int64)."""

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be uint8 [N, C, H, W], got {self.images.dtype} "
                f"{list(self.images.shape)}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must have shape [{self.images.shape[0]}], got {list(self.labels.shape)}"
            )
        self.labels = self.labels.to(torch.int64)

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass(frozen=True)
class Augmentation:
    """Random crop of the original size after ``crop_padding`` zero pixels on each side, and a
    horizontal flip with probability 1/2 when ``flip``."""

    crop_padding: int = 0
    flip: bool = False

    def __str__(self) -> str:
        parts = []
        if self.crop_padding:
            parts.append(f"random crop (padding {self.crop_padding})")
        if self.flip:
            parts.append("horizontal flip")
        return " + ".join(parts) or "none"


@dataclass
class Dataset:
    """A train and a test :class:`ImageSet` with what a model needs to know about them.

    ``mean`` and ``std`` [C] are per-channel statistics of the training images on a 0-1 scale;
    ``augmentation`` is the default training augmentation for this kind of data.
    """

    name: str
    train: ImageSet
    test: ImageSet
    classes: list[str]
    augmentation: Augmentation
    mean: Tensor | None = None
    std: Tensor | None = None

    def __post_init__(self) -> None:
        if self.train.images.shape[1:] != self.test.images.shape[1:]:
            raise ValueError(
                f"train images {list(self.train.images.shape[1:])} and test images "
                f"{list(self.test.images.shape[1:])} differ in shape"
            )
        if self.mean is None or self.std is None:
            pixels = self.train.images.to(torch.float64).div_(255).transpose(0, 1).flatten(1)
            self.mean = pixels.mean(dim=1).float()
            self.std = pixels.std(dim=1).clamp_min(1e-3).float()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return self.train.images.shape[2], self.train.images.shape[3]

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 [N, C, H, W] -> float32, scaled to 0-1 and standardised per channel."""
        mean = self.mean.to(images.device).view(1, -1, 1, 1)
        std = self.std.to(images.device).view(1, -1, 1, 1)
        return (images.float() / 255 - mean) / std

    def describe(self) -> str:
        h, w = self.image_size
        return (
            f"{self.name}: {len(self.train):,} train / {len(self.test):,} test images, "
            f"{self.in_channels}x{h}x{w}, {self.num_classes} classes"
        )


# -- batches -------------------------------------------------------------------------------------


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of ints, e.g. (seed, epoch) or (seed, epoch, batch)."""
    value = len(parts)
    for part in parts:
        value = (value * 1_000_003 + part + 1) % 2**62
    return torch.Generator().manual_seed(value)


def batch_indices(
    size: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1
) -> list[Tensor]:
    """The training batches of one epoch, as index tensors, for process ``rank`` of
    ``world_size``.

    A permutation seeded by (``seed``, ``epoch``) is cut into global batches of ``batch_size``;
    the last incomplete batch is dropped (BatchNorm cannot train on a batch of one, and equal
    batches keep the processes of a distributed run in step); process ``rank`` takes its
    ``batch_size / world_size`` share of each global batch, so that the global batches do not
    depend on the number of processes.
    """
    permutation = torch.randperm(size, generator=seeded_generator(seed, epoch))
    share = batch_size // world_size
    return [
        permutation[start + rank * share : start + (rank + 1) * share]
        for start in range(0, size - batch_size + 1, batch_size)
    ]


def augment(
    images: Tensor,
    augmentation: Augmentation,
    generator: torch.Generator,
    start: int = 0,
    total: int | None = None,
) -> Tensor:
    """Augment a uint8 batch [N, C, H, W] on its device, drawing from ``generator`` (CPU).

    The random draws are made for ``total`` images (default N) and images ``start`` to
    ``start + N`` of them are used: a process that holds one share of a global batch augments it
    as a single process would augment the whole batch. In training, the generator of each batch
    is ``seeded_generator(seed, epoch, batch)``, so no generator state needs saving.
    """
    n, _, h, w = images.shape
    total = n if total is None else total
    if not 0 <= start <= total - n:
        raise ValueError(f"images {start}..{start + n} are not within a batch of {total}")
    p = augmentation.crop_padding
    if p:
        padded = F.pad(images, (p, p, p, p))
        top = torch.randint(0, 2 * p + 1, (total,), generator=generator)[start : start + n]
        left = torch.randint(0, 2 * p + 1, (total,), generator=generator)[start : start + n]
        rows = (top.to(images.device)[:, None] + torch.arange(h, device=images.device))
        cols = (left.to(images.device)[:, None] + torch.arange(w, device=images.device))
        batch = torch.arange(n, device=images.device)[:, None, None, None]
        channel = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
        images = padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]
    if augmentation.flip:
        flip = (torch.rand(total, generator=generator) < 0.5)[start : start + n]
        images = torch.where(flip.to(images.device)[:, None, None, None], images.flip(-1), images)
    return images


def iterate_test(data: ImageSet, batch_size: int, rank: int = 0,
                 world_size: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
    """(images, labels) batches of the test set, in order; process ``rank`` gets every
    ``world_size``-th batch."""
    for i, start in enumerate(range(0, len(data), batch_size)):
        if i % world_size == rank:
            yield data.images[start : start + batch_size], data.labels[start : start + batch_size]
