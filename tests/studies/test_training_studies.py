"""trajectory, critical-batch and lr-batch at tiny sizes: the files they write, and the
numbers those files hold checked against their definitions."""
import json
import math

import pytest
import torch

import gradnoise
from gradnoise.studies import critical, lrbatch, trajectory
from gradnoise.studies.training import batches, diverged


def _lines(path):
    return [json.loads(s) for s in path.read_text().splitlines()]


def test_batches_draw_without_replacement_within_an_epoch():
    it = batches(10, 3, torch.Generator().manual_seed(0))
    epoch = torch.cat([next(it) for _ in range(3)])  # 3 full batches, the 10th sample dropped
    assert len(set(epoch.tolist())) == 9
    with pytest.raises(ValueError, match="batch size"):
        next(batches(10, 11, torch.Generator()))


def test_divergence_rule():
    assert diverged(math.nan, 1.0) and diverged(math.inf, 1.0) and diverged(3.5, 1.0)
    assert not diverged(2.9, 1.0)
    assert diverged(5.5, -2.0) and not diverged(-1.0, -2.0)  # negative losses (log-likelihoods)


def test_trajectory_writes_a_monitor_run_file_and_the_losses(toy, tmp_path):
    cfg = trajectory.TrajectoryConfig(batch_size=16, lr=0.3, steps=30, every=3, eval_every=10)
    summary = trajectory.run(toy, tmp_path, seed=1, config=cfg)
    lines = _lines(tmp_path / "trajectory-toy.jsonl")
    assert lines[0]["config"]["run_file"] == "trajectory-toy.run.jsonl"
    steps = [s for s in lines if s["type"] == "step"]
    assert [s["step"] for s in steps] == list(range(30))
    assert [s["step"] for s in steps if s["full_loss"] is not None] == [0, 10, 20, 29]
    header, recs = gradnoise.read_run(tmp_path / "trajectory-toy.run.jsonl")
    assert header["source"] == "per_sample" and header["every"] == 3
    assert [r["step"] for r in recs] == list(range(0, 30, 3))
    assert all(r["batch_size"] == 16 for r in recs)
    assert summary["final_loss"] == pytest.approx(steps[-1]["full_loss"])
    assert steps[-1]["full_loss"] < steps[0]["full_loss"]  # it trained
    # running it again starts a fresh run file; the old files move to previous/, intact
    old = {p.name: p.read_bytes() for p in tmp_path.glob("trajectory-toy*.jsonl")}
    trajectory.run(toy, tmp_path, seed=1, config=cfg)
    assert len(gradnoise.read_run(tmp_path / "trajectory-toy.run.jsonl")[1]) == 10
    kept = sorted((tmp_path / "previous").iterdir())
    assert [p.name.split(".")[0] for p in kept] == ["trajectory-toy", "trajectory-toy"]
    assert sorted(p.read_bytes() for p in kept) == sorted(old.values())


def test_critical_batch_fits_the_runs_it_wrote(toy, tmp_path):
    cfg = critical.CriticalConfig(batch_sizes=[4, 16, 64], lrs=[2.0, 1.0, 0.5, 0.25], seeds=1, target_loss=0.7,
                                  max_steps=400, every=5)
    summary = critical.run(toy, tmp_path, config=cfg)
    lines = _lines(tmp_path / "critical-batch-toy.jsonl")
    runs = [r for r in lines if r["type"] == "run"]
    best = [r for r in lines if r["type"] == "best"]
    usable = [b for b in best if b["lr"] not in (2.0, 0.25) and b["steps"] > critical.eval_every(cfg, b["batch_size"])]
    assert len(runs) <= 12 and len(best) == 3 == summary["runs"] and summary["points"] == len(usable)
    for b in best:  # the best is the fewest steps among the runs that reached the target
        reached = [r for r in runs if r["batch_size"] == b["batch_size"] and r["reached"]]
        assert b["steps"] == min(r["steps"] for r in reached)
        assert b["examples"] == b["steps"] * b["batch_size"]
    assert all(r["final_loss"] <= 0.7 for r in runs if r["reached"])
    # S(B) = S_min (1 + B_crit/B) with E_min = S_min * B_crit, or no number and the reason
    if summary["b_crit"] is not None:
        assert summary["e_min"] == pytest.approx(summary["s_min"] * summary["b_crit"])
        lo, hi = summary["b_crit_interval"]
        assert lo <= summary["b_crit"] <= hi
    else:
        assert summary["reason"] and "no B_crit" in summary["reason"] and summary["s_min"] is None
    assert summary["b_simple"] is not None and summary["b_simple"] > 0


def test_lr_batch_grid_and_fit(toy, tmp_path):
    cfg = lrbatch.LrBatchConfig(batch_sizes=[4, 16, 64], lrs=[0.05, 0.5, 5.0, 50.0, 500.0], steps=20)
    summary = lrbatch.run(toy, tmp_path, config=cfg)
    lines = _lines(tmp_path / "lr-batch-toy.jsonl")
    cells = [c for c in lines if c["type"] == "cell"]
    stable = {s["batch_size"]: s for s in lines if s["type"] == "stable"}
    assert len(cells) == 15 and set(stable) == {4, 16, 64}
    for b, s in stable.items():
        ok = [c for c in cells if c["batch_size"] == b and not c["diverged"]]
        assert s["lr_max"] == max(c["lr"] for c in ok)
        assert s["lr_best"] == min(ok, key=lambda c: c["final_loss"])["lr"]
    assert any(c["diverged"] for c in cells if c["lr"] == 500.0)
    skipped = [c for c in cells if c["skipped"]]
    assert all(c["diverged"] and c["final_loss"] is None for c in skipped)
    assert summary["points"] == 3 and summary["b_simple"] > 0


def test_too_small_rates_make_no_progress_without_hiding_the_good_ones(toy, tmp_path):
    cfg = lrbatch.LrBatchConfig(batch_sizes=[16, 64], lrs=[1e-9, 1e-8, 0.1, 0.5], steps=20)
    summary = lrbatch.run(toy, tmp_path, config=cfg)
    cells = [c for c in _lines(tmp_path / "lr-batch-toy.jsonl") if c["type"] == "cell"]
    tiny = [c for c in cells if c["lr"] < 1e-7]
    assert all(c["no_progress"] and not c["diverged"] for c in tiny)
    assert not any(c["skipped"] for c in cells)
    assert len(summary["best"]) == 2 and all(lr in (0.1, 0.5) for _, lr in summary["best"])
    # 0.5, the grid's top, only bounds the best rate: such points stay out of the fit
    assert summary["points"] == sum(lr == 0.1 for _, lr in summary["best"]) and summary["b_noise"] is None


def test_critical_batch_refuses_a_target_already_met(toy, tmp_path):
    cfg = critical.CriticalConfig(batch_sizes=[4, 16], lrs=[0.5], seeds=1, target_loss=50.0)
    with pytest.raises(ValueError, match="already at or below the target"):
        critical.run(toy, tmp_path, config=cfg)


def test_critical_batch_leaves_out_runs_that_do_not_measure_S():
    cfg = critical.CriticalConfig(lrs=[0.8, 0.4, 0.2], eval_examples=64)
    kept, notes = critical._usable([(16, 100, 0.8), (64, 50, 0.8), (32, 80, 0.4), (16, 4, 0.4)], cfg)
    assert kept == [(32, 80)]
    assert notes[0].startswith("B=16 reached the target at the first evaluation")
    assert notes[1].startswith("the best rate at B=16, 64 is the top of the grid (0.8)")
    assert critical._usable([(16, 100, 0.4)], cfg) == ([(16, 100)], [])


def test_a_degenerate_critical_fit_is_no_number():
    """Finding 3 of issue 9: every run at the first evaluation and at the top of the grid
    gave "B_crit 64 [43.3, 95.9]"; now it is None with the reason."""
    cfg = critical.CriticalConfig(batch_sizes=[8, 16, 32, 64, 128], lrs=[1.6, 0.8, 0.4], eval_examples=64)
    best = [(b, max(1, 64 // b), 1.6) for b in cfg.batch_sizes]  # S = evaluation spacing, top rate
    out = critical._summary(best, [5.0], cfg, 0, [])
    assert out["b_crit"] is None and out["s_min"] is None and out["points"] == 0
    assert math.isnan(out["b_crit_interval"][0])
    assert "first evaluation" in out["reason"] and "top of the grid" in out["reason"] and "no B_crit" in out["reason"]
    # usable points whose fit lies beyond the sweep: no number either, the side recorded
    flat = [(b, 100, 0.8) for b in (8, 16, 32, 64, 128)]  # S does not fall with B: B_crit ≪ 8
    out = critical._summary(flat, [5.0], cfg, 0, [])
    assert out["b_crit"] is None and out["b_crit_bound"] == "<8" and "do not bend" in out["reason"]
    # a real bend: a number with its interval
    bend = [(b, round(50 * (1 + 32 / b)), 0.8) for b in (8, 16, 32, 64, 128)]
    out = critical._summary(bend, [5.0], cfg, 0, [])
    assert out["b_crit"] == pytest.approx(32, rel=0.1) and out["b_crit_interval"][0] <= out["b_crit"]


def test_a_degenerate_lr_fit_is_no_number():
    grid = [0.1, 0.2, 0.4, 0.8]
    rows = [(b, 0.8, 0.8) for b in (8, 32, 128)]  # every best rate at the top of the grid
    out = lrbatch._summary(rows, 50.0, grid, 0, [])
    assert out["b_noise"] is None and out["eps_max"] is None and out["points"] == 0
    assert "extend the grid upwards" in out["reason"] and "no fit to the best rates" in out["reason"]
