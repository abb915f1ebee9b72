"""The annealing schedules give the published values at chosen iterations."""

from __future__ import annotations

import pytest

from dynconv.layers.temperature import TemperatureSchedule


@pytest.mark.parametrize(
    "epoch,iteration,expected",
    [
        # official ODConv: T = 1 + 29 * (total - done) / total, done = iterations finished
        # including this one, total = 10 epochs x 100 iterations
        (0, 0, 1 + 29 * 999 / 1000),
        (0, 99, 1 + 29 * 900 / 1000),
        (4, 99, 15.5),
        (9, 98, 1 + 29 / 1000),
        (9, 99, 1.0),
        (10, 0, 1.0),
        (57, 3, 1.0),
    ],
)
def test_linear_is_the_official_odconv_schedule(epoch, iteration, expected) -> None:
    schedule = TemperatureSchedule("linear")
    assert schedule.start == 30
    assert schedule.at(epoch, iteration, 100) == pytest.approx(expected, rel=1e-12)


def test_linear_with_other_settings() -> None:
    schedule = TemperatureSchedule("linear", initial=11, epochs=2)
    assert schedule.at(0, 4, 10) == pytest.approx(1 + 10 * 15 / 20)
    assert schedule.at(1, 9, 10) == 1.0


@pytest.mark.parametrize(
    "epoch,expected",
    [(0, 34), (1, 31), (2, 28), (5, 19), (10, 4), (11, 1), (12, 1), (100, 1)],
)
def test_step_is_the_dyconv_seed_schedule(epoch, expected) -> None:
    schedule = TemperatureSchedule("step")
    for iteration in (0, 17, 390):  # constant within an epoch
        assert schedule.at(epoch, iteration, 391) == expected


def test_none_and_final() -> None:
    assert TemperatureSchedule("none").at(0, 0, 10) == 1.0
    assert TemperatureSchedule.final == 1.0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"name": "cosine"}, r"unknown temperature schedule 'cosine'; expected one of"),
        ({"initial": 0.5}, r"initial temperature must be a finite number >= 1 \(the final "
                           r"one\), got 0.5"),
        ({"initial": 0}, "initial temperature must be a finite number >= 1"),
        ({"initial": float("nan")}, "initial temperature must be a finite number >= 1"),
        ({"initial": "hot"}, "must be a number"),
        ({"epochs": 0}, "annealing length must be >= 1 epochs, got 0"),
    ],
)
def test_bad_schedules(kwargs, message) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        TemperatureSchedule(**kwargs)


def test_described_as_each_kind_of_layer_follows_it() -> None:
    """Layers that end at 1 read the schedule's value; KernelWarehouse's, which end at 0, its
    remaining part from 1 to 0 (a model holding both names them)."""
    from torch import nn

    import dynconv
    from dynconv.layers.temperature import describe_schedule, final_temperatures

    linear = TemperatureSchedule("linear", epochs=2)
    assert linear.describe(0.0) == "linear (1 to 0 over 2 epochs, per iteration; evaluation at 0)"
    assert linear.describe(1.0) == str(linear) == "linear (30 to 1 over 2 epochs, per iteration)"
    assert TemperatureSchedule("none").describe(0.0) == "none (0)"
    assert TemperatureSchedule("step").describe(0.0) == (
        "step (1 to 0 as 34, -3 per epoch, goes to 1; evaluation at 0)")
    both = nn.Sequential(dynconv.KWConv2d(4, 4, 3), dynconv.DynamicConv2d(4, 4, 3))
    assert final_temperatures(both) == {1.0: ["DynamicConv2d"], 0.0: ["KWConv2d"]}
    assert describe_schedule(both, linear) == (
        "DynamicConv2d: linear (30 to 1 over 2 epochs, per iteration); KWConv2d: linear (1 to 0 "
        "over 2 epochs, per iteration; evaluation at 0)")
    assert describe_schedule(nn.Sequential(both[0]), linear) == linear.describe(0.0)
