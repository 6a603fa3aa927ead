"""What a run file carries for advice on the run (issue 19): the optimizer, the loss and
learning rate of each measured step, passes and tokens per sample, and for Adam-type
optimizers the noise of the update direction — checked against the float64 oracle."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import gradnoise
import reference as R
from gradnoise.monitor import precond


def _tiny_lm():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(11, 6), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 11)).double()


def ce(out, y):
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def test_adamw_run_records_optimizer_loss_tokens_and_the_preconditioned_noise(tmp_path):
    model = _tiny_lm()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 / (k + 1))
    path = tmp_path / "run.jsonl"
    monitor = gradnoise.NoiseMonitor(model, optimizer=opt, sinks=[str(path)], beta=0.0)
    names = {p: n for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        ids = torch.randint(0, 11, (8, 5), generator=gen)
        want_w = R.adam_weights(opt, names)  # the state before this step's update
        loss = ce(model(ids), ids)
        loss.backward()
        rec = monitor.step(loss=loss)
        assert rec.loss == pytest.approx(float(loss)) and rec.lr == pytest.approx(3e-3 / (step + 1))
        assert rec.passes == 1 and rec.tokens_per_sample == 5
        if step == 0:
            assert rec.preconditioned is None and not want_w  # no Adam state yet
        else:
            want = R.preconditioned_stats(R.per_sample_grads(model, ce, ids, ids), want_w).total
            got = rec.preconditioned.smoothed  # beta=0: the smoothed value is this step's
            assert got.trace_cov == pytest.approx(want.trace_cov, rel=1e-9)
            assert got.grad_sq_norm == pytest.approx(want.grad_sq_norm, rel=1e-9)
        opt.step()
        sched.step()
        opt.zero_grad()
    monitor.close()
    header, steps = gradnoise.read_run(path)
    assert header["optimizer"] == {"class": "AdamW", "family": "adam", "groups": 1, "lr": 3e-3,
                                   "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1}
    assert header["world_size"] == 1
    assert [s["passes"] for s in steps] == [1, 1, 1] and steps[0]["preconditioned"] is None
    assert steps[2]["preconditioned"]["b_simple_interval"] is not None and steps[2]["loss"] > 0


def test_sgd_and_unknown_optimizers_float_inputs_and_accumulation(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    monitor = gradnoise.NoiseMonitor(model, optimizer=opt, source="microbatch")
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    for half in (slice(0, 4), slice(4, 8)):
        (0.5 * (model(x[half]) - y[half]).pow(2).sum(1).mean()).backward()
    rec = monitor.step()
    assert rec.passes == 2 and rec.tokens_per_sample is None and rec.loss is None
    assert rec.preconditioned is None and rec.lr == 0.1
    assert precond.describe(opt)["family"] == "sgd"
    assert precond.family(torch.optim.Adagrad(model.parameters())) == "other"
    with pytest.raises(TypeError, match="optimizer"):
        gradnoise.NoiseMonitor(model, optimizer="adam")
    monitor.close()
    with pytest.raises(gradnoise.errors.GradNoiseError, match="loss"):
        m = gradnoise.NoiseMonitor(model)
        model(x).sum().backward()
        m.step(loss="low")
    m.close()


def test_old_run_files_without_these_fields_still_read(tmp_path):
    old = {"type": "header", "format": "gradnoise-run", "version": 2, "source": "per_sample", "every": 1,
           "beta": 0.95, "params": ["w"], "layers": {}, "created": "2026-01-01T00:00:00+00:00"}
    step = {"type": "step", "step": 0, "source": "per_sample", "skipped": False, "flag": None, "loss_scale": None,
            "batch_size": 4, "n_groups": 4, "raw": {"trace_cov": 1.0, "grad_sq_norm": 1.0, "b_simple": 1.0, "flag": None},
            "smoothed": {"trace_cov": 1.0, "grad_sq_norm": 1.0, "b_simple": 1.0}, "b_simple_interval": [0.0, "inf"],
            "by_param": {}, "by_layer": {}}
    path = tmp_path / "old.jsonl"
    path.write_text(json.dumps(old) + "\n" + json.dumps(step) + "\n")
    header, steps = gradnoise.read_run(path)
    assert header.get("optimizer") is None and steps[0].get("loss") is None
    assert math.isfinite(steps[0]["raw"]["b_simple"])
