"""The batch-size schedule: it only grows, respects bounds and factors, waits (hysteresis),
follows the right noise basis and units, couples the learning rate by the optimizer's
rule, is scaled by a probe's calibration, round-trips through AdaptiveBatchSampler's
fixed mode, and its Megatron ramp reproduces it within one increment."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from gradnoise.control import AdaptiveBatchSampler, megatron
from gradnoise.control import schedule as sc
from gradnoise.control.schedule_text import render
from gradnoise.errors import GradNoiseError
from gradnoise.formats import run_header
from gradnoise.stats import rules


# ------------------------------------------------------------------------- a run file's dicts
def header(family="sgd", lr=0.1):
    opt = None if family is None else {"class": "X", "family": family, "lr": lr}
    return run_header("per_sample", 1, 0.95, ["w"], optimizer=opt)


def step(t, value, low=None, batch=32, tps=None, pre=None, every=1):
    low = 0.5 * value if low is None and value is not None else low
    d = {"type": "step", "step": t * every, "batch_size": batch, "smoothed": {"b_simple": value},
         "b_simple_interval": [low, "inf" if value is None else 2 * value], "lr": 0.1, "loss": 1.0,
         "tokens_per_sample": tps, "preconditioned": None}
    if pre is not None:
        d["preconditioned"] = {"smoothed": {"b_simple": pre}, "b_simple_interval": [0.5 * pre, 2 * pre]}
    return d


def run(values, **kw):
    return [step(t, v, **kw) for t, v in enumerate(values)]


def noisy_values(seed, n=300):
    """A noise scale that rises from ~10 to ~3000 with multiplicative noise (lower end: half)."""
    rnd = random.Random(seed)
    return [10 * math.exp(6 * t / n) * math.exp(rnd.gauss(0, 0.4)) for t in range(n)]


# ------------------------------------------------------------------------- the sizes
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("factor,lo,hi", [(2, None, None), (2, 64, 512), (3, None, 900), (4, 32, 2048)])
def test_only_grows_in_powers_of_the_factor_inside_the_bounds(seed, factor, lo, hi):
    s = sc.build(header(), run(noisy_values(seed)), base=16, factor=factor, min_batch=lo, max_batch=hi, patience=3)
    sizes = [g.batch_size for g in s.segments]
    assert all(b2 > b1 for b1, b2 in zip(sizes, sizes[1:]))
    assert all(b1 < b2 for b1, b2 in zip([g.samples for g in s.segments], [g.samples for g in s.segments[1:]]))
    grid = {16 * factor ** k for k in range(12)}
    assert set(sizes) <= grid
    assert all((lo or 16) <= b <= (hi or math.inf) for b in sizes)
    assert sizes[0] == min(b for b in grid if b >= (lo or 16))
    assert len(sizes) > 1  # the rising noise makes it grow


def test_grows_only_after_patience_steps_above_the_margin():
    # lower end = half the value; next size 64 needs a lower end ≥ 1.1 × 64 = 70.4
    below = run([140.0] * 20)  # lower end 70 < 70.4
    assert [g.batch_size for g in sc.build(header(), below, patience=3).segments] == [32]
    blip = run([10.0, 200.0, 200.0, 10.0, 200.0, 200.0, 10.0])  # never 3 in a row
    assert len(sc.build(header(), blip, patience=3).segments) == 1
    held = run([10.0, 200.0, 200.0, 200.0, 10.0])
    s = sc.build(header(), held, patience=3)
    assert [(g.step, g.samples, g.batch_size) for g in s.segments] == [(None, 0, 32), (3, 4 * 32, 64)]
    # the value criterion reads the smoothed value, not the lower end
    assert sc.build(header(), below, patience=3, criterion="value").segments[-1].batch_size == 64


def test_a_jump_takes_the_level_held_throughout():
    s = sc.build(header(), run([10.0, 2000.0, 300.0, 2000.0]), patience=3)  # calls 512, 128, 512
    assert [g.batch_size for g in s.segments] == [32, 128]


def test_samples_tokens_and_logging_every_few_steps():
    steps = [step(t, 10.0 if t < 3 else 300.0, tps=128, every=4) for t in range(8)]  # steps 0, 4, 8, ...
    s = sc.build(header(), steps, patience=2)
    g = s.segments[1]
    assert g.step == 16 and g.samples == 17 * 32 and g.tokens == 17 * 32 * 128
    assert s.run_samples == 29 * 32
    j = sc.to_json(s)
    assert j["segments"][1]["tokens_per_batch"] == 128 * 128 and j["run_tokens"] == 29 * 32 * 128
    assert sc.build(header(), run([300.0] * 4), patience=2).segments[1].tokens is None


def test_adam_uses_the_preconditioned_noise_scale_when_present():
    steps = [step(t, 10.0, pre=300.0) for t in range(5)]
    adam = sc.build(header("adam", 1e-3), steps, patience=2)
    assert adam.basis == "preconditioned" and adam.segments[-1].batch_size == 128
    sgd = sc.build(header("sgd"), steps, patience=2)
    assert sgd.basis == "raw" and len(sgd.segments) == 1
    no_state = sc.build(header("adam", 1e-3), run([300.0] * 5), patience=2)
    assert no_state.basis == "raw" and no_state.segments[-1].batch_size == 128


def test_learning_rate_coupling_uses_the_rules():
    steps = run([10.0, 1000.0, 1000.0])
    adam = sc.build(header("adam", 1e-3), steps, patience=2)
    assert adam.lr_rule == "adam_sqrt"  # as the report's verdict advises the same run
    g = adam.segments[-1]
    ada = sc.build(header("adam", 1e-3), steps, patience=2, lr_rule="adascale").segments[-1]
    assert g.lr_multiplier == pytest.approx(ada.lr_multiplier ** 0.5)  # √ of AdaScale's gain at the same switch
    assert g.lr == pytest.approx(1e-3 * g.lr_multiplier)
    sgd = sc.build(header("sgd"), steps, patience=2)
    g = sgd.segments[-1]
    assert sgd.lr_rule == "adascale" and g.lr_multiplier == pytest.approx(rules.adascale(32, g.batch_size, 1000.0))
    lin = sc.build(header("sgd"), steps, patience=2, lr_rule="linear").segments[-1]
    assert lin.lr_multiplier == g.batch_size / 32
    assert sc.build(header(None), steps, patience=2).lr_rule == "sqrt"
    assert sc.build(header(None), steps, patience=2).base_lr == 0.1  # from the first step's lr


# ------------------------------------------------------------------------- calibration
def probe(ratio=3.0, pre_ratio=1.5, fmt="gradnoise-probe", version=1):
    return {"format": fmt, "version": version, "mccandlish": {"b_noise": 120.0, "reason": None},
            "proxy": {"b_simple": 40.0, "ratio": ratio, "preconditioned_ratio": pre_ratio}}


def test_the_calibration_scales_the_schedule():
    values = noisy_values(1)
    plain = sc.build(header(), run([4 * v for v in values]), patience=3)
    scaled = sc.build(header(), run(values), patience=3, ratio=4.0)
    assert [(g.samples, g.batch_size) for g in scaled.segments] == [(g.samples, g.batch_size) for g in plain.segments]
    assert scaled.segments[-1].batch_size > sc.build(header(), run(values), patience=3).segments[-1].batch_size
    assert sc.calibration(probe(), "raw")[0] == 3.0 and sc.calibration(probe(), "preconditioned")[0] == 1.5
    assert "B_noise 120 / B_simple 40" in sc.calibration(probe(), "raw")[1]
    ratio, note = sc.calibration(probe(ratio=None), "raw")
    assert ratio is None and "no calibration" in note and "proxy.ratio" in note
    assert sc.calibration({"format": "gradnoise-probe", "version": 1}, "preconditioned")[0] is None


# ------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw", [dict(factor=1), dict(factor=2.5), dict(base=0), dict(min_batch=64, max_batch=32),
                                dict(base=32, min_batch=40, max_batch=60), dict(margin=-0.1), dict(patience=0),
                                dict(criterion="mean"), dict(ratio=0.0), dict(lr_rule="cubic")])
def test_bad_options_are_one_line_value_errors(kw):
    with pytest.raises(ValueError) as e:
        sc.build(header(), run([100.0] * 3), **kw)
    assert "\n" not in str(e.value)


def test_a_run_without_b_simple_is_an_error():
    with pytest.raises(GradNoiseError, match="no step of the run has a defined B_simple"):
        sc.build(header(), run([None] * 5))
    with pytest.raises(GradNoiseError, match="no step lines"):
        sc.build(header(), [])


# ------------------------------------------------------------------------- AdaptiveBatchSampler
def _fixed_run(sampler, n):
    """(samples consumed before the step, its size, the lr) of every step over 3 epochs."""
    opt = sampler.optimizer
    loader = DataLoader(TensorDataset(torch.arange(n)), batch_sampler=sampler)
    out, consumed = [], 0
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for st in sampler.steps(loader):
            assert sum(len(x) for (x,), _ in st) == st.n_samples
            out.append((consumed, st.batch_size, opt.param_groups[0]["lr"] if opt else None))
            consumed += st.n_samples
    return out


@pytest.mark.parametrize("from_file", [False, True])
def test_fixed_mode_round_trips_the_schedule(tmp_path, from_file):
    s = sc.build(header("adam", 1e-3), run(noisy_values(2, 60), tps=64), patience=2, max_batch=256)
    assert len(s.segments) >= 3
    obj = json.loads(render(s, "json"))
    if from_file:
        (tmp_path / "s.json").write_text(json.dumps(obj))
        obj = str(tmp_path / "s.json")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sampler = AdaptiveBatchSampler(1000, schedule=obj, optimizer=opt, shuffle=False)
    seen = _fixed_run(sampler, 1000)
    for consumed, size, lr in seen:
        g = sc.batch_at(s.segments, consumed)
        assert size == g.batch_size and lr == pytest.approx(g.lr)
    assert {b for _, b, _ in seen} == {g.batch_size for g in s.segments}


def test_fixed_mode_resumes_its_clock_and_checks_its_input():
    obj = {"format": "gradnoise-schedule", "version": 1,
           "segments": [{"samples": 0, "batch_size": 8, "lr_multiplier": 1.0},
                        {"samples": 40, "batch_size": 16, "lr_multiplier": 1.5}]}
    a = AdaptiveBatchSampler(100, schedule=obj)
    loader = DataLoader(TensorDataset(torch.arange(100)), batch_sampler=a)
    it = a.steps(loader)
    sizes = [next(it).batch_size for _ in range(5)]
    it.close()
    assert sizes == [8] * 5 and a.state_dict()["samples"] == 40
    b = AdaptiveBatchSampler(100, schedule=obj)
    b.load_state_dict(a.state_dict())
    assert b.batch_size == 8 and [st.batch_size for st in b.steps(loader_for(b))][:1] == [16]
    for bad, match in [(dict(monitor=object()), "monitor=None"), (dict(lr_rule="sqrt"), "lr_rule=None"),
                       (dict(multiple_of=16), "schedule size=8"), (dict(max_batch=8), "schedule size=16")]:
        with pytest.raises(ValueError, match=match):
            AdaptiveBatchSampler(100, schedule=obj, **bad)
    shrinks = {**obj, "segments": obj["segments"][::-1]}
    for broken in (shrinks, {**obj, "format": "gradnoise-run"}, {**obj, "segments": []}):
        with pytest.raises(ValueError):
            AdaptiveBatchSampler(100, schedule=broken)


def loader_for(sampler):
    return DataLoader(TensorDataset(torch.arange(sampler.dataset_size)), batch_sampler=sampler)


# ------------------------------------------------------------------------- Megatron
def test_megatron_rule_is_megatrons():
    # start 32, increment 32, 700 samples to 256: 7 increments, one every 100 samples
    got = [megatron.megatron_batch(c, 32, 32, 700, 256) for c in (0, 99, 100, 250, 699, 700, 701)]
    assert got == [32, 32, 64, 96, 224, 256, 256]


@pytest.mark.parametrize("seed", range(8))
def test_megatron_arguments_reproduce_the_schedule_within_one_increment(seed):
    rnd = random.Random(seed)
    s = sc.build(header(), run(noisy_values(seed, 200), batch=rnd.choice([8, 16, 32])), base=rnd.choice([4, 8, 16]),
                 factor=rnd.choice([2, 2, 4]), patience=rnd.choice([1, 3, 5]))
    ramp = megatron.fit(s)
    assert ramp.start == s.segments[0].batch_size and ramp.global_batch == s.segments[-1].batch_size
    assert (ramp.global_batch - ramp.start) % ramp.increment == 0 and ramp.increment % s.base_batch == 0
    end = max(s.run_samples, ramp.samples) + 1
    for c in sorted({int(end * i / 4000) for i in range(4001)} | {g.samples for g in s.segments}):
        want = sc.batch_at(s.segments, c).batch_size
        assert abs(megatron.megatron_batch(c, ramp.start, ramp.increment, ramp.samples, ramp.global_batch)
                   - want) <= ramp.increment
    assert ramp.max_error <= ramp.increment


def test_megatron_fits_an_evenly_growing_schedule_exactly():
    seg = sc.Segment
    s = sc.build(header(), run([10.0] * 3), base=32)._replace(
        segments=[seg(0, None, None, 32, 1, None, None), seg(1000, None, 5, 64, 1, None, None)], run_samples=5000)
    ramp = megatron.fit(s)
    assert (ramp.start, ramp.increment, ramp.samples, ramp.global_batch, ramp.max_error) == (32, 32, 1000, 64, 0)
    assert megatron.fit(sc.build(header(), run([10.0] * 3))) is None
    assert render(sc.build(header(), run([10.0] * 3)), "megatron").startswith("--global-batch-size 32\n")
