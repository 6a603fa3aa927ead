"""The pure readings of branch curves (stats/branches.py): crossings, the common target,
McCandlish's fit on a clean law, Merrill's largest batch, and intervals that never claim
a bound the data do not give."""
import math

import pytest

from gradnoise.stats import branches as b


def test_crossing_and_loss_at_interpolate_between_evaluations():
    curve = [[0, 0, 2.0], [100, 10, 1.0], [200, 20, 0.5]]
    assert b.crossing(curve, 1.5) == pytest.approx((5.0, 50.0))
    assert b.crossing(curve, 0.1) is None
    assert b.loss_at(curve, 150) == pytest.approx(0.75) and math.isnan(b.loss_at(curve, 300))
    assert b.common_target(2.0, [1.0, 1.2, 0.8], 0.5) == pytest.approx(1.5)
    assert math.isnan(b.common_target(2.0, [2.1, 2.0], 0.5))  # the base batch did not lower the loss


def test_mccandlish_recovers_a_clean_law_and_says_when_it_cannot():
    law = {B: [12 * (1 + 90 / B) * f for f in (0.97, 1.0, 1.03)] for B in (8, 16, 32, 64, 128, 256)}
    r = b.mccandlish(law)
    assert r["b_noise"] == pytest.approx(90, rel=0.02) and r["interval"][0] < 90 < r["interval"][1]
    assert r["s_min"] == pytest.approx(12, rel=0.02) and r["e_min"] == pytest.approx(r["s_min"] * r["b_noise"])
    flat = b.mccandlish({B: [10.0, 10.2, 9.9] for B in (16, 32, 64, 128)})
    assert flat["b_noise"] is None and "do not bend" in flat["reason"]
    few = b.mccandlish({16: [10.0, 11.0], 32: [math.inf, math.inf], 64: [math.inf, 5.0]})
    assert few["b_noise"] is None and "only" in few["reason"]


def test_an_interval_end_at_the_search_range_is_unbounded():
    """Seeds that disagree widely: the bootstrap reaches the search range's end, which is no
    bound — written inf, never a number the data did not give."""
    r = b.mccandlish({32: [3.2, 60.0], 64: [2.0, 30.0], 128: [1.5, 12.0], 16: [5.0, 90.0]})
    assert r["b_noise"] is not None and r["interval"][1] == math.inf and 0 < r["interval"][0] < r["b_noise"]


def test_largest_within_tolerance_and_diverged_seeds():
    losses = {16: [0.30, 0.31], 32: [0.305, 0.30], 64: [0.36, 0.37], 128: [0.6, math.inf]}
    r = b.largest_within(1.0, losses, tolerance=0.05)
    assert r["b_crit"] == 32 and r["reason"] is None and r["best_loss"] == pytest.approx(0.3025)
    assert [row[2][1] for row in r["losses"]][-1] == math.inf  # a diverged seed: inf, not NaN
    assert b.largest_within(1.0, {16: [1.1], 32: [1.2], 64: [1.3]}, 0.05)["b_crit"] is None
    every = b.largest_within(1.0, {16: [0.3], 32: [0.3], 64: [0.3]}, 0.05)
    assert every["b_crit"] == 64 and "at least" in every["reason"]


def test_ratio_interval_is_conservative():
    assert b.ratio_interval([10, 20], [2, 5]) == [2.0, 10.0]
    assert b.ratio_interval([10, 20], [0, 5]) == [2.0, math.inf]
    assert all(math.isnan(v) for v in b.ratio_interval([None, 20], [2, 5]))
