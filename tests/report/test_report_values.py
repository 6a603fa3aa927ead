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
    # intervals of quantities ≥ 0: never a negative bound, an unbounded side said in words
    assert fmt_interval(["-inf", "inf"]) == "not determined from these steps"
    assert fmt_interval([0.0, "inf"]) == "not determined from these steps"
    assert fmt_interval([66.2, "inf"]) == "≥ 66.2"
    assert fmt_interval([-3.0, 80.0]) == "[0, 80]"
    assert fmt_interval([None, None]) == "—" and fmt_interval("oops") == "—"
    assert fmt_with_interval(16.0, [10.0, "inf"]) == "16 (95 % interval ≥ 10)"
    assert fmt_with_interval(84.2, ["-inf", "inf"]) == "84.2 (interval not determined from these steps)"
    assert fmt_with_interval(16.0, [10.0, 20.0]) == "16 [10, 20]"
    assert fmt_with_interval(None, [1.0, 2.0]) == "—" and fmt_with_interval(None, None) == "—"
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


def test_series_reads_the_intervals_the_monitor_wrote():
    recs = records(25)
    s = noise_series({"beta": 0.9}, _steps(recs))
    np.testing.assert_allclose(s.smoothed["b_simple"], [r.smoothed.b_simple for r in recs])
    low, high = s.bands["trace_cov"]
    np.testing.assert_allclose(low[1:], [r.trace_cov_interval[0] for r in recs[1:]])
    assert np.isnan(low[0]) and np.all(low[1:] < s.smoothed["trace_cov"][1:])
    assert np.all(high[1:] > s.smoothed["trace_cov"][1:]) and np.all(low[1:] >= 0)


def test_a_version_1_file_has_no_bands_and_no_negative_bound(tmp_path):
    from report_synth import write_run
    header, steps = read_run(write_run(tmp_path / "v1.jsonl", records(10, unbounded=True), version=1))
    assert header["version"] == 1 and steps[-1]["b_simple_interval"] == ["-inf", "inf"]
    s = noise_series(header, steps)
    assert s.bands == {} and np.all(s.b_band[0][1:] == 0.0) and np.all(np.isinf(s.b_band[1][1:]))
    assert {layer.label for layer in s.layers} == {"body.0", "head"}  # sums of the parameters, no type
    assert all(np.isnan(layer.band[0]).all() for layer in s.layers)


def test_layers_are_read_from_the_file_with_their_type_and_share():
    recs = records(5)
    s = noise_series({"beta": 0.9, "layers": {"body.0": {"type": "Linear"}, "head": {"type": "Linear"}}},
                     _steps(recs))
    assert {layer.label for layer in s.layers} == {"body.0 (Linear)", "head (Linear)"}
    assert {layer_of(p) for p in PARAMS} == {"body.0", "head"}
    last = recs[-1].smoothed.by_param
    head = next(layer for layer in s.layers if layer.label.startswith("head"))
    t = last["head.weight"].trace_cov + last["head.bias"].trace_cov
    g = last["head.weight"].grad_sq_norm + last["head.bias"].grad_sq_norm
    assert head.b_simple[-1] == pytest.approx(t / g)
    assert head.band[0][-1] == pytest.approx(recs[-1].by_layer["head"].b_simple_interval[0])
    assert sum(layer.share for layer in s.layers) == pytest.approx(1.0)
    assert s.layers[0].share >= s.layers[1].share  # the largest share first


def test_series_of_skipped_steps_is_empty():
    s = noise_series({"beta": 0.9}, _steps(records(4, skip_all=True)))
    assert s.empty and s.skipped.all()


def test_bands_of_a_monitor_run(tmp_path):
    monitor_run(tmp_path / "run.jsonl", steps=6)
    header, steps = read_run(tmp_path / "run.jsonl")
    s = noise_series(header, steps)
    assert set(s.bands) == {"trace_cov", "grad_sq_norm"}
    assert np.isfinite(s.bands["trace_cov"][0][-1]) and len(s.step) == 6
