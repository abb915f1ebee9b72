"""The paired 95% interval of ``dynconv compare``: how much better (or worse) one row's test
accuracy is than a baseline's, with what is noise.

Two sources of noise make a difference of accuracies uncertain, and both are paired: the
training randomness (initialisation, data order, augmentation), the same for both networks of
one seed, and the sample of test images, the same images for both. With S seeds and N test
images, ``c[s, i]`` (1 if image i is classified correctly by the seed-s network) for the row and
``b[s, i]`` for the baseline:

* the difference is ``Δ = mean over s and i of (c - b)``, the mean of the per-seed differences
  ``d_s = mean_i (c[s, i] - b[s, i])``;
* **seed part**: the spread of the ``d_s``, with Student's t on S - 1 degrees of freedom (a few
  seeds say little about their own spread): ``h_seed = t * sd(d_s) / sqrt(S)``;
* **image part**: a paired bootstrap over the test images of the seed-averaged per-image
  difference ``D_i = mean_s (c[s, i] - b[s, i])`` (the same resampled images for both networks
  and every seed; a fixed bootstrap seed, integer sums: bit-identical everywhere):
  ``h_image = z * se_boot``, z the normal quantile;
* the half-width is ``sqrt(h_seed^2 + h_image^2)``.

The variance of Δ over both sources is ``σ²_seed / S + σ²_image / N + σ²_interaction / (S N)``
(a crossed seeds-by-images design); the spread of the ``d_s`` estimates the first and the third
term, the bootstrap the second and the third again. Counting the interaction twice, and giving
the seed part its own t quantile instead of a pooled (Welch-Satterthwaite) one, can only widen
the interval: it is conservative when seeds are few. With one seed there is no seed part: the
interval then covers the test images only, and says so (:attr:`PairedInterval.seeds`).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BETTER", "NO_DIFFERENCE", "WORSE", "PairedInterval", "paired_interval"]

BETTER = "better"
WORSE = "worse"
NO_DIFFERENCE = "no measurable difference"

#: Bootstrap resamples of the test images, and the seed of their generator.
RESAMPLES = 2000
BOOTSTRAP_SEED = 0
_CHUNK = 50  # resamples drawn at once (memory: _CHUNK x N indices)


@dataclass(frozen=True)
class PairedInterval:
    """A difference of accuracies (fractions, not points) and its interval: ``mean`` in
    [``low``, ``high``], over ``seeds`` seeds and ``images`` test images, at ``level``;
    ``seed_half_width`` (None with one seed) and ``image_half_width`` are its two parts."""

    mean: float
    low: float
    high: float
    seeds: int
    images: int
    seed_half_width: float | None
    image_half_width: float
    level: float = 0.95

    @property
    def conclusion(self) -> str:
        """``'better'`` (the interval is above 0), ``'worse'`` (below 0) or ``'no measurable
        difference'`` (it contains 0)."""
        if self.low > 0:
            return BETTER
        if self.high < 0:
            return WORSE
        return NO_DIFFERENCE

    def format(self) -> str:
        """In points: ``+0.21 [-0.10, +0.52]``."""
        return f"{100 * self.mean:+.2f} [{100 * self.low:+.2f}, {100 * self.high:+.2f}]"


def _quantiles(level: float, seeds: int) -> tuple[float | None, float]:
    """(Student's t quantile on ``seeds - 1`` degrees of freedom or None for one seed, the
    normal quantile), two-sided at ``level``."""
    from scipy.special import ndtri, stdtrit  # scipy: a dependency of scikit-learn

    p = 0.5 + level / 2
    return (float(stdtrit(seeds - 1, p)) if seeds > 1 else None), float(ndtri(p))


def _check_correct(value: object, name: str) -> Tensor:
    if not isinstance(value, Tensor) or value.dim() != 2 or value.numel() == 0:
        got = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{name} must be a tensor [seeds, images] of correct (1) or wrong (0) "
                         f"answers, got {got}")
    if value.dtype != torch.bool and not bool(((value == 0) | (value == 1)).all()):
        raise ValueError(f"{name} must hold only 0 and 1 (or be bool)")
    return value.to(torch.int64)


def paired_interval(correct: Tensor, baseline: Tensor, level: float = 0.95,
                    resamples: int = RESAMPLES, bootstrap_seed: int = BOOTSTRAP_SEED
                    ) -> PairedInterval:
    """The interval of ``mean(correct) - mean(baseline)`` (module doc).

    Args:
        correct, baseline: [S, N], 1 (or True) where seed s's network classifies test image i
            correctly; row s of both comes from the same seed, column i from the same image.
        level: the interval's confidence level (0 to 1).
        resamples, bootstrap_seed: of the bootstrap over the images.
    """
    c, b = _check_correct(correct, "correct"), _check_correct(baseline, "baseline")
    if c.shape != b.shape:
        raise ValueError(f"correct {list(c.shape)} and baseline {list(b.shape)} must pair the "
                         "same seeds and test images")
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 2:
        raise ValueError(f"resamples must be an int >= 2, got {resamples!r}")
    seeds, images = c.shape
    t, z = _quantiles(level, seeds)
    # [N]: S * D_i, integers in [-S, S]; float64 sums of such integers are exact, hence the
    # same in any order (and 10 times faster than int64 sums)
    per_image = (c - b).sum(0).double()
    total = seeds * images
    mean = per_image.sum().item() / total
    seed_half = None
    if t is not None:
        per_seed = [d / images for d in (c - b).sum(1).tolist()]  # d_s
        seed_half = t * statistics.stdev(per_seed) / math.sqrt(seeds)
    generator = torch.Generator().manual_seed(bootstrap_seed)
    means: list[float] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small reductions: threads that share busy cores only slow them
    try:
        for start in range(0, resamples, _CHUNK):
            count = min(_CHUNK, resamples - start)
            index = torch.randint(images, (count * images,), generator=generator)
            sums = per_image.index_select(0, index).view(count, images).sum(1)
            means += [s / total for s in sums.tolist()]
    finally:
        torch.set_num_threads(threads)
    image_half = z * statistics.stdev(means)  # exact sums inside: the same in any order
    half = math.sqrt((seed_half or 0.0) ** 2 + image_half**2)
    return PairedInterval(mean, mean - half, mean + half, seeds, images, seed_half, image_half,
                          level)
