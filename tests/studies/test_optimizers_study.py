"""The optimizers study: the update noise estimator, SGD's update noise against the exact
batch-gradient variance, and the study's file and report section."""
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from gradnoise.studies import optimizers
from gradnoise.studies.task import builtin
from gradnoise.studies.training import full_noise

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "report"))


def test_noise_and_signal_are_unbiased():
    rng = np.random.default_rng(0)
    mu = rng.normal(size=20) * 0.3
    sd = np.linspace(0.1, 1.0, 20)
    est = np.array([optimizers.noise_to_signal(mu + sd * rng.normal(size=(8, 20)))[:2] for _ in range(4000)])
    assert est[:, 0].mean() == pytest.approx(float(np.sum(sd ** 2)), rel=0.02)
    assert est[:, 1].mean() == pytest.approx(float(mu @ mu), rel=0.05)


def test_sgd_update_noise_is_the_batch_gradient_variance_times_lr_squared():
    """At a fixed state SGD's update is −ε ĝ_B, so tr Cov(u) = ε² tr(Σ)/B·(N−B)/(N−1), with
    tr(Σ) the exact full-data per-sample covariance trace."""
    task = builtin("digits-mlp")
    model = task.fresh_model()
    exact = full_noise(model, task)
    b, lr, n = 16, 0.1, task.size
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    make = lambda p: torch.optim.SGD(p, lr=lr)  # noqa: E731
    u = optimizers._updates("SGD", make, model, opt, task, b, 300, torch.Generator().manual_seed(0))
    noise, signal, _ = optimizers.noise_to_signal(u)
    predicted = lr ** 2 * exact["trace_cov"] / b * (n - b) / (n - 1)
    assert noise == pytest.approx(predicted, rel=0.15)  # 300 draws: about 5 % standard error here
    assert signal == pytest.approx(lr ** 2 * exact["grad_sq_norm"], rel=0.5)


def test_the_study_file_and_its_section(tmp_path):
    from gradnoise.report import build_report
    from test_report_build import check_page

    cfg = optimizers.OptimizersConfig.for_size("tiny")
    summary = optimizers.run(builtin("digits-mlp"), tmp_path, size="tiny", quiet=True)
    lines = [json.loads(ln) for ln in (tmp_path / "optimizers-digits-mlp.jsonl").read_text().splitlines()]
    noise = [ln for ln in lines if ln["type"] == "noise"]
    assert len(noise) == len(cfg.optimizers) * cfg.checkpoints
    assert set(summary["optimizers"]) == set(cfg.optimizers)
    for r in noise:
        lo, hi = r["ratio_interval"]
        if r["ratio"] is not None and r["ratio"] > 0:
            assert 0 <= lo <= r["ratio"] <= (math.inf if hi == "inf" else hi)
    svrg = [r for r in noise if r["optimizer"] == "SVRG"]
    assert all("sgd_variance" in r for r in svrg) and svrg[0]["estimator_variance"] == pytest.approx(0, abs=1e-12)
    losses = [ln for ln in lines if ln["type"] == "loss"]
    assert len(losses) == len(cfg.optimizers) * cfg.steps
    page = check_page(build_report([tmp_path / "optimizers-digits-mlp.jsonl"], tmp_path / "rep"))
    visible = " ".join(page.visible)
    assert "Optimizers: the noise of the update" in visible and "SVRG estimator tr Cov" in visible


def test_unknown_optimizer_is_refused(tmp_path):
    cfg = replace(optimizers.OptimizersConfig.for_size("tiny"), optimizers=["SGD", "Lion"])
    with pytest.raises(ValueError, match="unknown optimizer"):
        optimizers.run(builtin("digits-mlp"), tmp_path, config=cfg, quiet=True)
