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
    cfg = critical.CriticalConfig(batch_sizes=[4, 16, 64], lrs=[1.0, 0.5], seeds=1, target_loss=0.7,
                                  max_steps=400, every=5)
    summary = critical.run(toy, tmp_path, config=cfg)
    lines = _lines(tmp_path / "critical-batch-toy.jsonl")
    runs = [r for r in lines if r["type"] == "run"]
    best = [r for r in lines if r["type"] == "best"]
    assert len(runs) == 6 and len(best) == 3 == summary["points"]
    for b in best:  # the best is the fewest steps among the runs that reached the target
        reached = [r for r in runs if r["batch_size"] == b["batch_size"] and r["reached"]]
        assert b["steps"] == min(r["steps"] for r in reached)
        assert b["examples"] == b["steps"] * b["batch_size"]
    assert all(r["final_loss"] <= 0.7 for r in runs if r["reached"])
    # S(B) = S_min (1 + B_crit/B) with E_min = S_min * B_crit
    assert summary["e_min"] == pytest.approx(summary["s_min"] * summary["b_crit"])
    lo, hi = summary["b_crit_interval"]
    assert lo <= summary["b_crit"] <= hi
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
    assert summary["points"] == 2  # both batch sizes have a best rate among 0.1, 0.5


def test_critical_batch_refuses_a_target_already_met(toy, tmp_path):
    cfg = critical.CriticalConfig(batch_sizes=[4, 16], lrs=[0.5], seeds=1, target_loss=50.0)
    with pytest.raises(ValueError, match="already at or below the target"):
        critical.run(toy, tmp_path, config=cfg)


def test_critical_batch_notes_a_best_rate_at_the_grid_edge():
    cfg = critical.CriticalConfig(lrs=[0.8, 0.4, 0.2], eval_examples=64)
    notes = critical._edge_notes([(16, 100, 0.8), (64, 50, 0.8), (32, 80, 0.4)], cfg)
    assert notes == ["the best rate at B=16, 64 is the top of the grid (0.8), so S may be overstated there "
                     "(extend --lrs)"]
    assert "first evaluation" in critical._edge_notes([(16, 4, 0.4)], cfg)[0]
    assert critical._edge_notes([(16, 100, 0.4)], cfg) == []
