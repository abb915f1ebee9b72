"""Image classification data held in memory, and its batches.

Images are kept as uint8 [N, C, H, W] tensors (:class:`ImageSet`, :class:`Dataset`; the loaders
are in :mod:`dynconv.training.sources`). Batches are drawn from a permutation seeded by
(seed, epoch), and augmented (random crop after zero padding, horizontal flip) on the batch with
a generator seeded by (seed, epoch, batch), so a run is reproducible and any batch can be
replayed exactly after a resume, with no data-loader workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "EVAL_SPLITS",
    "HOLDOUT_FRACTION",
    "SPLIT_SEED",
    "Augmentation",
    "Dataset",
    "ImageSet",
    "augment",
    "batch_indices",
    "iterate_test",
    "seeded_generator",
    "stratified_split",
    "stratified_subset",
]

#: What a run evaluates on: the test images, or a validation split of the training data.
EVAL_SPLITS = ("test", "val")
#: The fraction of each class held out by :func:`stratified_split` (a folder's test images, a
#: validation split).
HOLDOUT_FRACTION = 0.2
#: Fixed seed of every split and subset made from a data set: they never depend on the run's seed.
SPLIT_SEED = 0


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

    def take(self, index: Tensor) -> ImageSet:
        """The images and labels at ``index`` [M] (int64), in that order."""
        return ImageSet(self.images[index], self.labels[index])


def _class_indices(labels: Tensor, generator: torch.Generator) -> list[Tensor]:
    """The indices of each label present, smallest label first, each shuffled by
    ``generator``."""
    shuffled = []
    for label in labels.unique().tolist():
        idx = (labels == label).nonzero().flatten()
        shuffled.append(idx[torch.randperm(len(idx), generator=generator)])
    return shuffled


def stratified_split(data: ImageSet, fraction: float = HOLDOUT_FRACTION,
                     seed: int = SPLIT_SEED) -> tuple[ImageSet, ImageSet]:
    """(kept, held out): ``fraction`` of every class held out, at least one image of a class of
    two or more and never its last one; fixed by ``seed``. Both keep the original order."""
    kept, held = [], []
    for idx in _class_indices(data.labels, torch.Generator().manual_seed(seed)):
        n = min(len(idx) - 1, max(1, round(len(idx) * fraction)))
        held.append(idx[:n])
        kept.append(idx[n:])
    return (data.take(torch.cat(kept).sort().values),
            data.take(torch.cat(held).sort().values))


def stratified_subset(data: ImageSet, n: int, seed: int = SPLIT_SEED) -> ImageSet:
    """``n`` of the images, every class keeping its share of them (at least one image each; the
    shares rounded by largest remainder), fixed by ``seed``, in their original order.

    ``n`` must be at least the number of classes present and at most ``len(data)``.
    """
    groups = _class_indices(data.labels, torch.Generator().manual_seed(seed))
    if not len(groups) <= n <= len(data):
        raise ValueError(f"a stratified subset takes {len(groups)} to {len(data):,} images (at "
                         f"least one of each class), got {n}")
    # one image of each class, the rest in proportion to what each class has beyond its first
    spare = [len(idx) - 1 for idx in groups]
    extra = n - len(groups)
    exact = [extra * s / max(1, sum(spare)) for s in spare]
    shares = [int(x) for x in exact]
    by_remainder = sorted(range(len(groups)), key=lambda i: shares[i] - exact[i])
    for i in by_remainder[: extra - sum(shares)]:
        shares[i] += 1
    chosen = torch.cat([idx[: 1 + share] for idx, share in zip(groups, shares, strict=True)])
    return data.take(chosen.sort().values)


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
    ``augmentation`` is the default training augmentation for this kind of data; ``val`` is a
    validation split of the data set's own (MNIST's 10,000 images), if it has one.

    :meth:`prepared` gives the data a run trains and evaluates on; ``eval_on`` ('test' or 'val')
    and ``subset_of`` (the number of training images a subset was drawn from) record what it
    did, and :meth:`describe` states it.
    """

    name: str
    train: ImageSet
    test: ImageSet
    classes: list[str]
    augmentation: Augmentation
    mean: Tensor | None = None
    std: Tensor | None = None
    val: ImageSet | None = None
    eval_on: str = "test"
    subset_of: int | None = None

    def __post_init__(self) -> None:
        for name, part in (("test", self.test), ("validation", self.val)):
            if part is not None and self.train.images.shape[1:] != part.images.shape[1:]:
                raise ValueError(
                    f"train images {list(self.train.images.shape[1:])} and {name} images "
                    f"{list(part.images.shape[1:])} differ in shape"
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

    def prepared(self, train_images: int | None = None, eval_on: str = "test") -> Dataset:
        """The data a run trains and evaluates on (``self`` if it is already that data).

        ``eval_on='val'`` evaluates on a validation split instead of the test images: the data
        set's own (``val``), else a fixed, stratified :data:`HOLDOUT_FRACTION` of every class of
        the training images, which are then trained on no more. ``train_images`` then keeps a
        fixed, stratified subset of that many training images (:func:`stratified_subset`, the
        same for every seed and convolution type). Both are fixed by :data:`SPLIT_SEED`; the
        statistics of ``normalize`` are those of the images trained on.

        Raises a ``ValueError`` for ``eval_on`` other than 'test' and 'val', and for
        ``train_images`` below the number of classes or above the training images there are.
        """
        if eval_on not in EVAL_SPLITS:
            raise ValueError(f"eval_on must be one of {EVAL_SPLITS}, got {eval_on!r}")
        if train_images is not None and (
            isinstance(train_images, bool) or not isinstance(train_images, int)
        ):
            raise TypeError(f"train_images must be an int or None, got {train_images!r}")
        done = (self.eval_on == eval_on
                and (self.subset_of is None) == (train_images is None)
                and (train_images is None or len(self.train) == train_images))
        if done:
            return self
        if self.eval_on != "test" or self.subset_of is not None:
            raise ValueError(
                f"the data set {self.name!r} is already prepared ({self._prepared_as()}); "
                "prepare it once, from the data set as loaded"
            )
        data = self
        if eval_on == "val":
            train, val = ((self.train, self.val) if self.val is not None
                          else stratified_split(self.train))
            data = replace(data, train=train, test=val, mean=None, std=None, eval_on="val")
        if train_images is not None:
            available = len(data.train)
            if not data.num_classes <= train_images <= available:
                raise ValueError(
                    f"train_images must be from {data.num_classes} (one image of each class) to "
                    f"{available:,} (the training images of {data.name}"
                    + (" left beside the validation split" if eval_on == "val" else "")
                    + f"), got {train_images:,}"
                )
            data = replace(data, train=stratified_subset(data.train, train_images), mean=None,
                           std=None, subset_of=available)
        return data

    def _prepared_as(self) -> str:
        evaluated = f"evaluated on its {'validation' if self.eval_on == 'val' else 'test'} images"
        if self.subset_of is None:
            return evaluated
        return f"{len(self.train):,} of {self.subset_of:,} training images, {evaluated}"

    def describe(self) -> str:
        h, w = self.image_size
        train = f"{len(self.train):,} train"
        if self.subset_of is not None:
            train += f" (a fixed, stratified subset of {self.subset_of:,})"
        evaluated = f"{len(self.test):,} test images"
        if self.eval_on == "val":
            evaluated = f"{len(self.test):,} validation images" + (
                "" if self.val is not None else
                f" (a fixed, stratified {HOLDOUT_FRACTION:.0%} of the training images)")
        return (f"{self.name}: {train} / {evaluated}, {self.in_channels}x{h}x{w}, "
                f"{self.num_classes} classes")


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
