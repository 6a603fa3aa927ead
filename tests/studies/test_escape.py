"""The escape study: the landscape and its noise, the sharpness estimators against an
explicit Hessian, and the study's file."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from gradnoise.studies import escape
from gradnoise.studies.landscape import Landscape, per_sample, walk, wilson
from gradnoise.studies.sharpness import hessian_trace, top_eigenvalue


def test_landscape_gradient_matches_finite_differences():
    land = Landscape()
    rng = np.random.default_rng(0)
    pts = rng.uniform(-0.6, 0.6, size=(20, 2))

    def f(p):  # the loss written out
        x, y = p[..., 0], p[..., 1]
        qs = 0.5 * land.h_sharp * (x - land.x_sharp) ** 2
        qf = 0.5 * land.h_flat * (x - land.x_flat) ** 2 - land.drop
        return y ** 2 / 2 - land.tau * np.logaddexp(-qs / land.tau, -qf / land.tau)

    h = 1e-6
    for k in range(2):
        e = np.zeros(2)
        e[k] = h
        numeric = (f(pts + e) - f(pts - e)) / (2 * h)
        np.testing.assert_allclose(land.grad(pts)[:, k], numeric, rtol=1e-5, atol=1e-6)
    assert land.sharp(np.array([land.x_sharp]))[0] and not land.sharp(np.array([land.x_flat]))[0]


def test_isotropic_noise_has_the_trace_of_sgd_noise():
    """Both walkers' steps have the same noise trace at a point: SGD's batch mean drawn
    without replacement has tr(Σ)/B·(N−B)/(N−1) around the full gradient."""
    land = Landscape()
    z = land.points(np.random.default_rng(1))
    theta = np.array([[land.x_sharp + 0.01, 0.02]])
    g = per_sample(land, theta, z)[0]
    n, b = len(z), 4
    trace = ((g - g.mean(0)) ** 2).sum(-1).sum() / (n - 1)
    rng = np.random.default_rng(2)
    means = np.stack([g[rng.permutation(n)[:b]].mean(0) for _ in range(20000)])
    measured = ((means - g.mean(0)) ** 2).sum(-1).mean()
    assert measured == pytest.approx(trace / b * (n - b) / (n - 1), rel=0.03)


def test_sgd_noise_escapes_the_sharp_well_more_than_isotropic_noise():
    land = Landscape()
    z = land.points(np.random.default_rng(0))
    frac = {}
    for kind in ("sgd", "isotropic"):
        x, level = walk(land, z, 0.02, 2, 300, 150, kind, np.random.default_rng(3))
        frac[kind] = float(np.mean(~land.sharp(x)))
    assert level > 0 and frac["sgd"] > frac["isotropic"] + 0.3
    x, _ = walk(land, z, 0.02, 32, 300, 150, "sgd", np.random.default_rng(3))
    assert np.mean(~land.sharp(x)) < 0.05  # little noise: the walkers stay
    with pytest.raises(ValueError, match="kind"):
        walk(land, z, 0.02, 2, 1, 1, "langevin", np.random.default_rng(0))


def test_wilson_interval_stays_in_0_1_and_holds_the_proportion():
    for k, n in ((0, 40), (40, 40), (7, 40)):
        lo, hi = wilson(k, n)
        assert 0.0 <= lo <= k / n <= hi <= 1.0
    rng = np.random.default_rng(4)
    covered = sum(lo <= 0.3 <= hi for lo, hi in (wilson(int(rng.binomial(100, 0.3)), 100) for _ in range(2000)))
    assert 0.92 <= covered / 2000 <= 0.98


def test_sharpness_estimators_against_the_explicit_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(40, 3, dtype=torch.float64), torch.randint(0, 2, (40,))
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(v):  # the loss as a function of all parameters in one vector
        parts = dict(zip(names, (c.reshape(s) for c, s in zip(v.split([math.prod(s) for s in shapes]), shapes))))
        return nn.functional.cross_entropy(torch.func.functional_call(model, parts, (x,)), y)

    H = torch.autograd.functional.hessian(loss_of, flat)
    eig = torch.linalg.eigvalsh(H)
    loss = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
    lam = top_eigenvalue(model, loss, iters=500, tol=1e-12, generator=torch.Generator().manual_seed(0))
    assert lam == pytest.approx(float(eig[eig.abs().argmax()]), rel=1e-6)
    tr, se = hessian_trace(model, loss, probes=400, generator=torch.Generator().manual_seed(1))
    assert abs(tr - float(torch.trace(H))) < 4 * se and se > 0


def test_the_study_writes_walks_solutions_and_a_summary(tmp_path):
    from gradnoise.studies.task import builtin

    summary = escape.run(builtin("digits-mlp"), tmp_path, size="tiny", quiet=True)
    lines = [json.loads(ln) for ln in (tmp_path / "escape-digits-mlp.jsonl").read_text().splitlines()]
    walks = [ln for ln in lines if ln["type"] == "walk"]
    sols = [ln for ln in lines if ln["type"] == "solution"]
    cfg = escape.EscapeConfig.for_size("tiny")
    assert len(walks) == 2 * len(cfg.walk_batch_sizes) and len(sols) == 2 * cfg.seeds
    for w in walks:
        assert w["escaped"] == round(w["fraction"] * w["walkers"]) and 0 <= w["interval"][0] <= w["interval"][1] <= 1
    # the noise level falls as the batch grows
    levels = [w["noise_level"] for w in walks if w["kind"] == "sgd"]
    assert levels == sorted(levels, reverse=True)
    for s in sols:
        assert s["train_accuracy"] is not None and s["gap"] == pytest.approx(s["train_accuracy"] - s["test_accuracy"])
    reached = [s for s in sols if s["reached"] and s["batch_size"] == summary["small_batch"]]
    assert summary["small"]["top_eigenvalue"]["n"] == len(reached)
    assert summary["walk"][0][0] == 1 and len(summary["walk"]) == len(cfg.walk_batch_sizes)
    # its report section and verdict line
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "report"))
    from test_report_build import check_page

    from gradnoise.report import build_report, verdict_lines
    page = check_page(build_report([tmp_path / "escape-digits-mlp.jsonl"], tmp_path / "rep"))
    visible = " ".join(page.visible)
    assert "Escape: noise and sharp minima" in visible and "top eigenvalue λ_max" in visible
    assert len(page.images) == 1
    assert "SGD's noise" in visible  # its finding stays in its own section, not in the verdict
    assert verdict_lines([tmp_path / "escape-digits-mlp.jsonl"]) == []


def test_runs_that_miss_the_training_loss_are_left_out(tmp_path):
    from dataclasses import replace

    from gradnoise.studies.task import builtin

    cfg = replace(escape.EscapeConfig.for_size("tiny"), solution_loss=1e-9, max_steps=5, seeds=1)
    summary = escape.run(builtin("digits-mlp"), tmp_path, config=cfg, quiet=True)
    assert summary["small"]["top_eigenvalue"]["mean"] is None and summary["sharpness_ratio"] is None
    assert "did not reach the training loss" in summary["reason"]
