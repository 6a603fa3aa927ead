"""Numbers as printed, grid positions of the heat map, and the arrays read from run files."""
import math

import numpy as np
import pytest

from gradnoise.report.fmt import fmt_count, fmt_interval, fmt_num, fmt_with_interval, slug, to_float
from gradnoise.report.heatmap import log_index
from gradnoise.report.series import layer_of, noise_series
from gradnoise import read_run
from report_synth import PARAMS, monitor_run, records


@pytest.mark.parametrize("value,text", [
    (None, "—"), (math.nan, "—"), ("garbage", "—"), ("inf", "∞"), ("-inf", "−∞"), (math.inf, "∞"),
    (0, "0"), (1000, "1000"), (12.34, "12.3"), (-3.14159, "−3.14"), (2.0, "2"), (0.0123, "0.0123"),
    (123456, "1.23×10⁵"), (2.5e-5, "2.5×10⁻⁵"),
])
def test_fmt_num(value, text):
    assert fmt_num(value) == text


def test_counts_and_intervals():
    assert fmt_count(256) == "256" and fmt_count(None) == "—" and fmt_count(2.5) == "2.5"
    assert fmt_interval(["-inf", "inf"]) == "[−∞, ∞]"
    assert fmt_interval([None, None]) == "—" and fmt_interval("oops") == "—"
    assert fmt_with_interval(16.0, [10.0, "inf"]) == "16 [10, ∞]"
    assert fmt_with_interval(None, None) == "—"
    assert to_float(True) == 1.0 and math.isnan(to_float(None))
    assert slug("Law / Digits MLP.jsonl") == "law-digits-mlp-jsonl" and slug("///") == "figure"


def test_log_index_places_values_between_grid_points():
    grid = np.array([0.01, 0.1, 1.0])
    idx = log_index(np.array([0.01, math.sqrt(0.1), 1.0, 10.0, 0.0, math.nan]), grid)
    np.testing.assert_allclose(idx[:4], [0.0, 1.5, 2.0, 3.0])
    assert np.isnan(idx[4]) and np.isnan(idx[5])
    single = log_index(np.array([4.0, 8.0]), np.array([4.0]))
    assert single[0] == 0.0 and np.isnan(single[1])


def _steps(recs):
    return [r.to_dict() for r in recs]


def test_series_replays_the_smoothing():
    recs = records(25)
    s = noise_series({"beta": 0.9}, _steps(recs))
    np.testing.assert_allclose(s.smoothed["b_simple"], [r.smoothed.b_simple for r in recs])
    low, high = s.bands["trace_cov"]
    assert np.isnan(low[0]) and np.all(low[1:] < s.smoothed["trace_cov"][1:])
    assert np.all(high[1:] > s.smoothed["trace_cov"][1:])


def test_series_drops_bands_that_do_not_match():
    s = noise_series({"beta": 0.5}, _steps(records(10)))  # the file was smoothed with 0.9
    assert s.bands == {}
    assert noise_series({}, _steps(records(3))).bands == {}


def test_layers_sum_their_parameters():
    recs = records(5)
    s = noise_series({"beta": 0.9}, _steps(recs))
    assert set(s.layers) == {layer_of(p) for p in PARAMS} == {"body.0", "head"}
    last = recs[-1].smoothed.by_param
    t = last["head.weight"].trace_cov + last["head.bias"].trace_cov
    g = last["head.weight"].grad_sq_norm + last["head.bias"].grad_sq_norm
    assert s.layers["head"].b_simple[-1] == pytest.approx(t / g)


def test_series_of_skipped_steps_is_empty():
    s = noise_series({"beta": 0.9}, _steps(records(4, skip_all=True)))
    assert s.empty and s.skipped.all()


def test_bands_replay_a_monitor_run(tmp_path):
    monitor_run(tmp_path / "run.jsonl", steps=6)
    header, steps = read_run(tmp_path / "run.jsonl")
    s = noise_series(header, steps)
    assert set(s.bands) == {"trace_cov", "grad_sq_norm"}
    assert np.isfinite(s.bands["trace_cov"][0][-1]) and len(s.step) == 6
