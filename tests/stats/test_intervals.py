"""The t-interval of a mean over seeds: coverage, the clip at a bound, small samples."""
import math

import numpy as np

from gradnoise.stats.intervals import mean_interval


def test_t_interval_covers_and_clips():
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(2000):
        iv = mean_interval(list(rng.normal(1.0, 2.0, size=3)))["interval"]
        covered += iv[0] <= 1.0 <= iv[1]
    assert 0.93 <= covered / 2000 <= 0.97
    assert mean_interval([0.1, 5.0, 0.2], lower=0.0)["interval"][0] == 0.0
    assert mean_interval([0.1, 5.0, 0.2])["interval"][0] < 0
    one = mean_interval([3.0, None, math.nan])
    assert one["mean"] == 3.0 and math.isnan(one["interval"][0]) and one["n"] == 1
    assert mean_interval([])["mean"] is None
