"""Synthetic inputs for the report tests: run files written by the monitor (a tiny model)
or from hand-made records, and one study file of each study written by StudyWriter."""
import json
import math
import random
from pathlib import Path

import torch

import gradnoise
from gradnoise import stats
from gradnoise.formats import run_header as header
from gradnoise.monitor.record import StepRecord
from gradnoise.monitor.smoother import NoiseSmoother
from gradnoise.studies.output import StudyWriter

PARAMS = ["body.0.weight", "body.0.bias", "head.weight", "head.bias"]
LAYERS = {"body.0": {"type": "Linear", "params": PARAMS[:2]}, "head": {"type": "Linear", "params": PARAMS[2:]}}
INF = math.inf


def _raw(rng, batch, scale=1.0):
    """Per-parameter statistics of one synthetic step, from moments ``A ≥ C``."""
    parts = {}
    for name in PARAMS:
        c = scale * rng.uniform(0.5, 1.0)
        parts[name] = stats.from_moments(c + scale * rng.uniform(0.5, 3.0), c, batch, batch)
    return stats.total(parts)


def records(n=40, batch=32, skip_all=False, unbounded=False, seed=0, skip_at=()):
    """``n`` StepRecords as the monitor makes them, or all skipped (NaN gradients), or
    with ``(0, inf)`` ("not determined") intervals throughout; the steps in ``skip_at``
    are skipped."""
    rng = random.Random(seed)
    smoother = NoiseSmoother(0.9, {p: layer for layer, e in LAYERS.items() for p in e["params"]})
    out = []
    for i in range(n):
        raw = _raw(rng, batch, scale=1.0 / (1 + i))
        skipped = skip_all or i in skip_at
        if skipped:
            parts = {p: stats.from_moments(math.nan, 1.0, batch, batch) for p in PARAMS}
            raw = stats.total(parts)
        else:
            smoother.update(raw)
        smoothed, iv = smoother.smoothed(batch, batch)
        if unbounded:
            iv = (0.0, INF)
        t_iv, g_iv = smoother.intervals()
        out.append(StepRecord(i, "per_sample", raw, smoothed, iv, skipped=skipped, flag=raw.flag,
                              trace_cov_interval=t_iv, grad_sq_norm_interval=g_iv,
                              by_layer=smoother.layers(batch, batch)))
    return out


def write_run(path, recs, beta=0.9, version=2):
    """A gradnoise-run file of ``recs``, written through JsonlSink; ``version=1`` writes
    what a version-1 monitor wrote (no layers, no smoothed intervals, ``-inf`` for an
    unbounded lower end)."""
    if version == 2:
        sink = gradnoise.JsonlSink(path)
        sink.open(header("per_sample", 1, beta, PARAMS, LAYERS))
        for r in recs:
            sink.write(r)
        sink.close()
        return Path(path)
    head = {k: v for k, v in header("per_sample", 1, beta, PARAMS).items() if k != "layers"}
    lines = [{**head, "version": 1}]
    for r in recs:
        d = r.to_dict()
        d.pop("by_layer")
        d["smoothed"] = {k: v for k, v in d["smoothed"].items() if not k.endswith("_interval")}
        if d["b_simple_interval"] == [0.0, "inf"]:
            d["b_simple_interval"] = ["-inf", "inf"]
        lines.append(d)
    Path(path).write_text("".join(json.dumps(x) + "\n" for x in lines))
    return Path(path)


def monitor_run(path, steps=12, batch=16):
    """A run file from NoiseMonitor on a tiny MLP; returns the batch losses."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(256, 4), torch.randint(0, 3, (256,))
    losses = []
    with gradnoise.NoiseMonitor(model, sinks=[str(path)], beta=0.8) as monitor:
        for i in range(steps):
            idx = torch.randint(0, 256, (batch,))
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            monitor.step()
            with torch.no_grad():  # plain SGD: torch.optim would import torch._dynamo (seconds)
                for p in model.parameters():
                    p -= 0.1 * p.grad
                    p.grad = None
            losses.append(float(loss.detach()))
    return losses


def law_study(out, task="digits-mlp", seed=0, size="tiny"):
    with StudyWriter(out, "law", task, seed, size, {"batch_sizes": [4, 16, 64]}) as w:
        n = 256
        for cp, trace in (("init", 40.0), ("trained", 8.0)):
            w.write("checkpoint", checkpoint=cp, step=0, population=n, loss=2.3, trace_cov=trace, grad_sq_norm=0.5)
            for b in (4, 16, 64, 256):
                pred = trace / b * (n - b) / (n - 1)
                se = 0.05 * pred if pred > 0 else None
                mse = pred * 1.03
                w.write("point", checkpoint=cp, batch_size=b, batches=50, mse=mse, mse_se=se, predicted=pred,
                        z=(mse - pred) / se if se else None)
        w.write("summary", max_abs_z=0.6, checkpoint="init", batch_size=4, points=8)
    return w.path


def trajectory_study(out, task="digits-mlp"):
    Path(out).mkdir(parents=True, exist_ok=True)
    losses = monitor_run(Path(out) / f"trajectory-{task}.run.jsonl")
    with StudyWriter(out, "trajectory", task, 0, "tiny", {"run_file": f"trajectory-{task}.run.jsonl"}) as w:
        for i, loss in enumerate(losses):
            w.write("step", step=i, loss=loss, full_loss=loss * 0.98 if i % 4 == 0 else None)
        w.write("summary", final_loss=losses[-1], b_simple_first=None, b_simple_last=12.5,
                b_simple_interval=[3.0, INF])
    return w.path


def critical_study(out, task="digits-mlp", reason=None):
    s_min, e_min = 100.0, 1600.0
    with StudyWriter(out, "critical-batch", task, 0, "tiny", {"target_loss": 0.5}) as w:
        for b in (4, 16, 64, 256):
            steps = s_min * (1 + (e_min / s_min) / b)
            for lr, factor in ((0.1, 1.0), (0.03, 1.6), (1.0, None)):
                reached = factor is not None
                st = round(steps * factor) if reached else None
                w.write("run", batch_size=b, lr=lr, seed=0, reached=reached, steps=st,
                        examples=st * b if reached else None, final_loss=0.4 if reached else math.nan,
                        b_simple=14.0, b_simple_interval=[9.0, 30.0])
            w.write("best", batch_size=b, seed=0, lr=0.1, steps=round(steps), examples=round(steps) * b)
        w.write("summary", target_loss=0.5, s_min=s_min, e_min=e_min, b_crit=16.0, b_crit_interval=[10.0, INF],
                b_simple=14.0, b_simple_interval=[9.0, 30.0], points=4, reason=reason)
    return w.path


STABLE_FIT = {"eps_max": 0.7, "b_noise": 12.0, "b_noise_interval": [5.0, "inf"], "rms": 0.25}


def lr_batch_study(out, task="digits-mlp", new_fields=True):
    """An lr-batch study; with ``new_fields`` its cells have ``no_progress`` (the smallest
    rate at the smallest batch) and its summary a ``stable_fit``, else they have neither."""
    lrs = [0.01, 0.03, 0.1, 0.3, 1.0]
    with StudyWriter(out, "lr-batch", task, 0, "tiny", {}) as w:
        for b in (8, 32, 128):
            lr_max = 1.0 / (1 + 32 / b)
            stable = [lr for lr in lrs if lr <= lr_max]
            failed = 0
            for lr in lrs:
                diverged = lr > lr_max
                skipped = failed >= 2
                failed += diverged
                extra = {"no_progress": b == 8 and lr == lrs[0]} if new_fields else {}
                w.write("cell", batch_size=b, lr=lr, final_loss=math.nan if diverged else 1.0 / (lr * b),
                        diverged=diverged, skipped=skipped, **extra)
            best = stable[-2] if len(stable) > 1 else None
            w.write("stable", batch_size=b, lr_max=max(stable) if stable else None, lr_best=best,
                    best_loss=1.0 / (best * b) if best else None)
        extra = {"stable_fit": STABLE_FIT, "rms": 0.125} if new_fields else {}
        w.write("summary", eps_max=1.0, b_noise=32.0, b_noise_interval=["-inf", 80.0], b_simple=None, points=3,
                reason=None, **extra)
    return w.path


def recommend_study(out, task="digits-mlp"):
    with StudyWriter(out, "recommend", task, 0, "tiny", {}) as w:
        w.write("summary", run_file="run.jsonl", batch_size=32, b_crit=math.nan, b_crit_interval=[-INF, INF],
                steps=3, rules=[{"to_batch": b, "linear": b / 32, "sqrt": math.sqrt(b / 32), "adascale": math.nan}
                                for b in (8, 16, 64, 128)])
    return w.path
