"""The law study: its Monte-Carlo measurement agrees with tr(Σ)/B·(N−B)/(N−1), and the
test has the power to reject the prediction without the finite-population factor."""
import json
import math

import pytest
import torch

from gradnoise.studies import law
from gradnoise.studies.training import flat_grad, full_noise
from reference import per_sample_grads, population_stats  # the float64 oracle, tests/reference.py


def _lines(path):
    return [json.loads(s) for s in path.read_text().splitlines()]


def test_batch_sizes_are_powers_of_two_up_to_half_the_data():
    assert law.batch_sizes(1797, 512) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert law.batch_sizes(100, 512) == [1, 2, 4, 8, 16, 32]


def test_full_noise_matches_the_oracle(toy):
    """trace_cov and |∇J|² of the full data set equal a per-sample float64 loop."""
    model = toy.fresh_model().double()
    t64 = law.replace(toy, model=model, x=toy.x.double())
    got = full_noise(model, t64, chunk=100)  # 3 chunks, accumulated in one capture
    grads = per_sample_grads(model, torch.nn.functional.cross_entropy, t64.x, t64.y)
    trace, g2 = population_stats(grads)
    assert math.isclose(got["grad_sq_norm"], g2, rel_tol=1e-9)
    assert math.isclose(got["trace_cov"], trace, rel_tol=1e-9)
    mean = torch.cat([g.mean(0).reshape(-1) for g in grads.values()])
    assert torch.allclose(flat_grad(model), mean, rtol=1e-9, atol=1e-12)
    assert got == pytest.approx(full_noise(model, t64, chunk=1024), rel=1e-9)


def test_measured_error_agrees_with_the_law(toy, tmp_path):
    cfg = law.LawConfig(max_batch=128, draws=150, train_steps=30, train_batch=16, lr=0.5)
    summary = law.run(toy, tmp_path, seed=3, config=cfg)
    lines = _lines(tmp_path / "law-toy.jsonl")
    points = [p for p in lines if p["type"] == "point"]
    assert lines[0]["format"] == "gradnoise-study" and lines[0]["study"] == "law"
    assert len(points) == 2 * 8 == summary["points"]
    # 16 points, each z roughly standard normal: |z| < 4 everywhere
    assert summary["max_abs_z"] < 4.0
    assert max(abs(p["z"]) for p in points) == summary["max_abs_z"]
    # power: the same data reject the law without the (N−B)/(N−1) factor at large B
    trace = {c["checkpoint"]: c["trace_cov"] for c in lines if c["type"] == "checkpoint"}
    big = [p for p in points if p["batch_size"] == 128]
    for p in big:
        wrong = trace[p["checkpoint"]] / p["batch_size"]
        assert abs(p["mse"] - wrong) / p["mse_se"] > 4.0
