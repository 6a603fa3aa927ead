"""Learning-rate rules and the advice read from run-file steps."""
import math

import pytest

from gradnoise.control import advise, lr_rules


def test_rules_by_formula():
    assert lr_rules.linear(32, 128) == 4.0
    assert lr_rules.sqrt(32, 128) == 2.0
    # AdaScale gain: (tr/B + G²)/(tr/B' + G²) with B_noise = tr/G² = 64
    tr, g2 = 64.0, 1.0
    assert lr_rules.adascale(32, 128, 64.0) == pytest.approx((tr / 32 + g2) / (tr / 128 + g2))
    assert lr_rules.adascale(32, 128, 0.0) == 1.0                     # no noise: keep the rate
    assert lr_rules.adascale(32, 128, 1e12) == pytest.approx(4.0)     # all noise: linear
    assert math.isnan(lr_rules.adascale(32, 128, math.nan))
    assert lr_rules.optimal_lr(64, 1.0, 64) == 0.5
    with pytest.raises(ValueError):
        lr_rules.linear(0, 4)


def _step(i, b_simple, skipped=False, interval=(10.0, "inf"), batch=32):
    return {"step": i, "batch_size": batch, "skipped": skipped, "smoothed": {"b_simple": b_simple},
            "b_simple_interval": list(interval)}


def test_advice_uses_the_last_usable_step():
    steps = [_step(0, 50.0), _step(1, 120.0), _step(2, None), _step(3, 999.0, skipped=True)]
    r = advise(steps)
    assert r["b_crit"] == 120.0 and r["step"] == 1 and r["steps"] == 2
    assert r["b_crit_interval"][0] == 10.0 and math.isinf(r["b_crit_interval"][1])
    assert r["batch_size"] == 32 and r["reason"] is None
    targets = [x["to_batch"] for x in r["rules"]]
    assert 128 in targets and 32 not in targets  # 2**round(log2(120)) = 128, the own size left out
    row = next(x for x in r["rules"] if x["to_batch"] == 128)
    assert row == {"to_batch": 128, "linear": 4.0, "sqrt": 2.0, "adascale": lr_rules.adascale(32, 128, 120.0)}


def test_no_usable_step_is_flagged_not_invented():
    r = advise([_step(0, None), _step(1, 5.0, skipped=True)], to_batches=[64])
    assert math.isnan(r["b_crit"]) and r["reason"]
    assert math.isnan(r["rules"][0]["adascale"]) and r["rules"][0]["linear"] == 2.0


def test_empty_run_is_an_error():
    with pytest.raises(ValueError, match="no steps"):
        advise([])


def test_steps_without_batch_size_or_interval():
    r = advise([{"step": 0, "skipped": False, "smoothed": {"b_simple": 40.0}, "b_simple_interval": None}],
                  batch_size=16)
    assert r["b_crit"] == 40.0 and math.isnan(r["b_crit_interval"][0])
    with pytest.raises(ValueError, match="batch_size"):
        advise([{"step": 0, "skipped": False, "smoothed": {"b_simple": 40.0}}])
