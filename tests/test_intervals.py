"""The paired interval of ``dynconv compare``: its parts by hand, its conclusions, bit-identical
results, its errors, and its coverage on simulated answers whose true difference is known."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from dynconv.training.intervals import (
    BETTER,
    NO_DIFFERENCE,
    WORSE,
    PairedInterval,
    paired_interval,
)


def _answers(right: list[int], images: int = 100) -> torch.Tensor:
    """[S, images]: seed s answers its first right[s] images correctly."""
    return torch.arange(images)[None] < torch.tensor(right)[:, None]


def test_the_parts_by_hand() -> None:
    baseline = _answers([90, 90, 90])
    row = _answers([91, 93, 92])
    result = paired_interval(row, baseline)
    assert result.mean == pytest.approx(0.02)
    differences = [0.01, 0.03, 0.02]
    t2 = 4.302652729749462  # Student's t, 2 degrees of freedom, 97.5%
    assert result.seed_half_width == pytest.approx(t2 * statistics.stdev(differences) / 3**0.5)
    # the bootstrap's standard error of the mean of D_i against the formula's
    per_image = (row.double() - baseline.double()).mean(0)
    formula = per_image.std(unbiased=False).item() / 100**0.5
    assert result.image_half_width == pytest.approx(1.959964 * formula, rel=0.06)
    half = math.hypot(result.seed_half_width, result.image_half_width)
    assert (result.low, result.high) == pytest.approx((0.02 - half, 0.02 + half))
    assert (result.seeds, result.images, result.level) == (3, 100, 0.95)
    one_seed = paired_interval(row[:1], baseline[:1])
    assert one_seed.seed_half_width is None and one_seed.high - one_seed.mean == pytest.approx(
        one_seed.image_half_width)


def test_conclusions_and_format() -> None:
    baseline = _answers([50] * 4, 400)
    assert paired_interval(_answers([150] * 4, 400), baseline).conclusion == BETTER
    assert paired_interval(baseline, _answers([150] * 4, 400)).conclusion == WORSE
    assert paired_interval(_answers([51, 49, 52, 50], 400), baseline).conclusion == NO_DIFFERENCE
    interval = PairedInterval(0.0021, -0.001, 0.0052, 3, 100, 0.001, 0.001)
    assert interval.format() == "+0.21 [-0.10, +0.52]"


def test_bit_identical_and_seeded() -> None:
    generator = torch.Generator().manual_seed(5)
    row = torch.rand(3, 500, generator=generator) < 0.9
    baseline = torch.rand(3, 500, generator=generator) < 0.85
    first = paired_interval(row, baseline)
    assert paired_interval(row.clone(), baseline.clone()) == first
    torch.set_num_threads(1)  # the bootstrap's integer sums do not depend on the threads
    try:
        assert paired_interval(row, baseline) == first
    finally:
        torch.set_num_threads(2)
    assert paired_interval(row, baseline, bootstrap_seed=1) != first
    assert paired_interval(row.long(), baseline.float()) == first  # 0/1 in any dtype


@pytest.mark.parametrize(
    "args,message",
    [
        ((torch.ones(3, 5), torch.ones(2, 5)), r"correct \[3, 5\] and baseline \[2, 5\] must "
                                               "pair"),
        ((torch.ones(5), torch.ones(5)), r"correct must be a tensor \[seeds, images\]"),
        (([1, 0], torch.ones(1, 2)), r"got list"),
        ((torch.ones(1, 2), torch.full((1, 2), 2)), "baseline must hold only 0 and 1"),
    ],
)
def test_errors(args, message) -> None:
    with pytest.raises(ValueError, match=message):
        paired_interval(*args)


def test_level_and_resamples_errors() -> None:
    ones = torch.ones(2, 3)
    with pytest.raises(ValueError, match="level must be between 0 and 1, got 95"):
        paired_interval(ones, ones, level=95)
    with pytest.raises(ValueError, match="resamples must be an int >= 2, got 1"):
        paired_interval(ones, ones, resamples=1)


# -- coverage: answers drawn from a population whose true difference is known ---------------------

# (P(row right), P(baseline right)) per kind of image, and the share of each kind: most images
# easy for both, some hard for both, some that one network gets more often than the other
KINDS = torch.tensor([[0.99, 0.99], [0.05, 0.05], [0.7, 0.3], [0.3, 0.6]])
SHARES = torch.tensor([0.9, 0.03, 0.04, 0.03])
TRUE_DIFFERENCE = (SHARES * (KINDS[:, 0] - KINDS[:, 1])).sum().item()  # 0.007


def _draw(seeds: int, images: int, seed_shift: float, generator: torch.Generator):
    """Answers [S, N] of the row and of the baseline. Each seed moves the probabilities of the
    images neither network always gets right or wrong by a uniform draw in +-``seed_shift``
    (mean 0: training randomness), separately for both networks."""
    kind = torch.multinomial(SHARES, images, replacement=True, generator=generator)
    p = KINDS[kind]
    uncertain = ((p > 0.1) & (p < 0.9)).float()
    shift = seed_shift * (2 * torch.rand(seeds, 1, 2, generator=generator) - 1)
    answers = torch.rand(seeds, images, 2, generator=generator) < p[None] + shift * uncertain
    return answers[..., 0], answers[..., 1]


@pytest.mark.parametrize(
    "seeds,seed_shift,short",
    [(3, 0.25, "image"),  # training randomness dominates: the image part alone falls short
     (10, 0.0, "seed"),  # the test images dominate: the seed part alone falls short
     (1, 0.0, "seed")],  # one seed: the image part only (there is no seed part)
)
def test_coverage_on_simulated_answers(seeds: int, seed_shift: float, short: str) -> None:
    generator = torch.Generator().manual_seed(seeds)
    simulations = 400
    covered = {"both": 0, "seed": 0, "image": 0}
    for _ in range(simulations):
        row, baseline = _draw(seeds, 1000, seed_shift, generator)
        interval = paired_interval(row, baseline, resamples=200)
        error = abs(interval.mean - TRUE_DIFFERENCE)
        covered["both"] += interval.low <= TRUE_DIFFERENCE <= interval.high
        covered["seed"] += error <= (interval.seed_half_width or 0.0)
        covered["image"] += error <= interval.image_half_width
    coverage = {k: v / simulations for k, v in covered.items()}
    # about 95%, conservative rather than short (measured: 97.0%, 98.0%, 95.5%); the
    # binomial standard error of 400 simulations is 1.1 points
    assert 0.92 <= coverage["both"] <= 0.995, coverage
    assert coverage[short] < (0.9 if seeds > 1 else 0.01), coverage
