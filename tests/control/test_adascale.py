"""AdaScale over a NoiseMonitor: the gain against hand computations (float64), its
bounds and undefined cases, τ and a schedule by τ, checkpoints, the per-sample (one
worker) and micro-batch sources, the Adam variant, and option errors."""
import copy
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradnoise
from gradnoise.control.adascale import AdaScale, gain_ratio
from gradnoise.errors import GradNoiseError
from gradnoise.stats import from_estimates

F64 = torch.float64


# --------------------------------------------------------------------------- helpers
def hand_gain(t, g, b, b0):
    """The gain written out: (t/b0 + g)/(t/b + g), clipped to [min(1,S), max(1,S)]."""
    s = b / b0
    r = (t / b0 + g) / (t / b + g)
    return min(max(r, min(1.0, s)), max(1.0, s))


def two_layer(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)


def fake_record(by_param, batch_size=64):
    """A record as the monitor makes it: ``smoothed`` with ``by_param`` totals."""
    parts = {n: from_estimates(t, g, batch_size, batch_size) for n, (t, g) in by_param.items()}
    T = sum(t for t, _ in by_param.values())
    G = sum(g for _, g in by_param.values())
    smoothed = replace(from_estimates(T, G, batch_size, batch_size), by_param=parts)
    return SimpleNamespace(smoothed=smoothed, raw=SimpleNamespace(batch_size=batch_size))


def fake_monitor(model, by_param=None, batch_size=64):
    return SimpleNamespace(model=model, last=None if by_param is None else fake_record(by_param, batch_size))


def uniform(model, t, g):
    """Every parameter gets the same (tr Σ, |G|²)."""
    return {n: (t, g) for n, _ in model.named_parameters()}


# ------------------------------------------------------------------ the gain formula
def test_gain_ratio_by_hand_and_bounds():
    assert gain_ratio(64.0, 1.0, 128, 32) == pytest.approx(hand_gain(64.0, 1.0, 128, 32), rel=1e-15)
    assert gain_ratio(64.0, 1.0, 32, 32) == 1.0                      # S = 1
    assert gain_ratio(0.0, 1.0, 128, 32) == 1.0                      # no noise: base rate
    assert gain_ratio(1e12, 1.0, 128, 32) == pytest.approx(4.0)      # all noise: linear
    assert gain_ratio(5.0, -0.3, 128, 32) == 4.0                     # |G|² ≤ 0 < tr Σ -> S
    assert gain_ratio(-5.0, 2.0, 128, 32) == 1.0                     # tr Σ ≤ 0 < |G|² -> 1
    assert math.isnan(gain_ratio(0.0, 0.0, 128, 32))                 # nothing known
    assert math.isnan(gain_ratio(-1.0, -1.0, 128, 32))
    assert math.isnan(gain_ratio(math.nan, 1.0, 128, 32))
    assert math.isnan(gain_ratio(1.0, math.inf, 128, 32))
    # B < B0: S < 1, r in [S, 1]
    r = gain_ratio(64.0, 1.0, 16, 32)
    assert r == pytest.approx(hand_gain(64.0, 1.0, 16, 32)) and 0.5 <= r < 1.0
    assert gain_ratio(5.0, -1.0, 16, 32) == 0.5
    for t, g in [(3.0, 0.1), (1e-9, 5.0), (1e9, 1e-9), (7.0, 7.0)]:
        for b in (8, 32, 100, 1000):
            assert min(1, b / 32) <= gain_ratio(t, g, b, 32) <= max(1, b / 32)


def test_gain_per_group_from_a_record():
    model = two_layer()
    stats = {"0.weight": (3.0, 0.2), "0.bias": (0.5, 0.05), "2.weight": (40.0, 0.01), "2.bias": (2.0, 0.3)}
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.5}], lr=0.1)
    mon = fake_monitor(model, stats)
    ada = AdaScale(opt, mon, base_batch_size=8, batch_size=64)
    ada.step()
    want0 = hand_gain(3.5, 0.25, 64, 8)
    want1 = hand_gain(42.0, 0.31, 64, 8)
    want = hand_gain(45.5, 0.56, 64, 8)
    assert ada.gain == pytest.approx([want0, want1], rel=1e-14)
    assert ada.model_gain == pytest.approx(want, rel=1e-14)
    assert ada.progress == pytest.approx(want, rel=1e-14)     # τ advances by the model's gain
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1 * want0, 0.5 * want1], rel=1e-14)
    assert ada.lrs == pytest.approx([0.1 * want0, 0.5 * want1], rel=1e-14)
    assert ada.base_lrs == [0.1, 0.5] and ada.scale == 8.0


def test_a_group_added_later_gets_its_base_lr_and_gain():
    model = two_layer()
    mon = fake_monitor(model, uniform(model, 2.0, 0.5))
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    ada = AdaScale(opt, mon, 4, batch_size=16)
    ada.step()
    opt.add_param_group({"params": model[2].parameters(), "lr": 0.3})
    ada.step()
    r = hand_gain(4.0, 1.0, 16, 4)
    assert ada.base_lrs == [0.1, 0.3] and ada.gain == pytest.approx([r, r])
    assert opt.param_groups[1]["lr"] == pytest.approx(0.3 * r)
    assert ada.model_gain == pytest.approx(hand_gain(8.0, 2.0, 16, 4))


def test_names_through_a_wrapper_are_the_inner_models():
    class Wrapper(nn.Module):  # Lightning's layout: unwrap() looks through _forward_module
        def __init__(self, m):
            super().__init__()
            self._forward_module = m

    model = two_layer()
    mon = fake_monitor(Wrapper(model), uniform(model, 2.0, 0.5))
    ada = AdaScale(torch.optim.SGD(model.parameters(), lr=0.1), mon, 4, batch_size=16)
    ada.step()
    assert ada.gain == [pytest.approx(hand_gain(8.0, 2.0, 16, 4))]


def test_undefined_estimates_keep_the_last_valid_gain():
    model = two_layer()
    mon = fake_monitor(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    ada = AdaScale(opt, mon, base_batch_size=10, batch_size=40)
    ada.step()                                                    # no record yet: r = 1
    assert ada.gain == [1.0] and ada.progress == 1.0 and opt.param_groups[0]["lr"] == 1.0
    mon.last = fake_record(uniform(model, 3.0, 0.2))
    ada.step()
    valid = hand_gain(12.0, 0.8, 40, 10)
    assert ada.gain == [pytest.approx(valid)]
    mon.last = fake_record(uniform(model, math.nan, math.nan))    # undefined: keep it
    ada.step()
    assert ada.gain == [pytest.approx(valid)]
    ada.step(batch_size=15)                                       # clipped to the new [1, 1.5]
    assert valid > 1.5 and ada.gain == [1.5]
    mon.last = fake_record(uniform(model, 3.0, -0.2))             # |G|² ≤ 0: noise only -> S
    ada.step()
    assert ada.gain == [4.0]
    assert ada.progress == pytest.approx(1.0 + 2 * valid + 1.5 + 4.0)


def test_no_record_and_no_batch_size_is_gain_one():
    model = two_layer()
    ada = AdaScale(torch.optim.SGD(model.parameters(), lr=0.3), fake_monitor(model), base_batch_size=4)
    ada.step()
    assert ada.gain == [1.0] and ada.progress == 1.0 and math.isnan(ada.scale)


def test_batch_size_sources():
    model = two_layer()
    mon = fake_monitor(model, uniform(model, 3.0, 0.2), batch_size=24)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    ada = AdaScale(opt, mon, base_batch_size=8)                   # from the record: 24
    ada.step()
    assert ada.scale == 3.0 and ada.gain == [pytest.approx(hand_gain(12.0, 0.8, 24, 8))]
    sizes = iter([16, 64])
    ada.batch_size = lambda: next(sizes)                          # an adaptive sampler
    ada.step()
    assert ada.scale == 2.0
    ada.step()
    assert ada.scale == 8.0 and ada.gain == [pytest.approx(hand_gain(12.0, 0.8, 64, 8))]
    ada.step(batch_size=4)                                        # per step, below B0
    assert ada.scale == 0.5 and 0.5 <= ada.gain[0] <= 1.0


# ------------------------------------------------------------------- τ and schedules
def test_step_schedule_triggers_at_the_right_tau():
    model = two_layer()
    mon = fake_monitor(model, uniform(model, 1e9, 1e-9))          # noise only: r = S = 2.5
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    ada = AdaScale(opt, mon, base_batch_size=8, batch_size=20, lr_schedule=lambda tau: 0.1 if tau >= 10 else 1.0)
    lrs, taus = [], []
    for _ in range(6):
        taus.append(ada.progress)
        ada.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert taus == pytest.approx([0.0, 2.5, 5.0, 7.5, 10.0, 12.5])
    assert lrs == pytest.approx([0.5] * 4 + [0.05] * 2)            # 0.2 · r, then · 0.1 from τ = 10
    assert ada.steps == 6 and ada.progress == pytest.approx(15.0)


def test_state_dict_round_trip():
    model = two_layer()
    mon = fake_monitor(model, uniform(model, 3.0, 0.2))
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.5}], lr=0.1)
    ada = AdaScale(opt, mon, 8, batch_size=32, lr_schedule=lambda tau: 1 / (1 + tau))
    for _ in range(3):
        ada.step()
    state = copy.deepcopy(ada.state_dict())
    model2 = two_layer()
    opt2 = torch.optim.SGD([{"params": model2[0].parameters()}, {"params": model2[2].parameters(), "lr": 9.0}], lr=9.0)
    mon2 = fake_monitor(model2, uniform(model2, math.nan, math.nan))  # undefined: last valid gains
    ada2 = AdaScale(opt2, mon2, 8, batch_size=32, lr_schedule=lambda tau: 1 / (1 + tau))
    ada2.load_state_dict(state)
    assert ada2.state_dict() == state
    assert ada2.progress == ada.progress and ada2.base_lrs == [0.1, 0.5]
    ada.step()
    ada2.step()
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([g["lr"] for g in opt.param_groups], rel=1e-15)
    assert ada2.progress == pytest.approx(ada.progress, rel=1e-15)
    with pytest.raises(GradNoiseError, match="mode"):
        AdaScale(torch.optim.Adam(model2.parameters()), mon2, 8, mode="adam-sqrt").load_state_dict(state)
    with pytest.raises(GradNoiseError, match="base batch"):
        AdaScale(opt2, mon2, 16).load_state_dict(state)
    with pytest.raises(GradNoiseError, match="param groups"):
        AdaScale(torch.optim.SGD(model2.parameters(), lr=1.0), mon2, 8).load_state_dict(state)
    with pytest.raises(GradNoiseError, match="version"):
        ada2.load_state_dict({**state, "version": 7})


# ------------------------------------------------------------- errors and read-only
def test_bad_options_are_one_line_errors():
    model = two_layer()
    mon = fake_monitor(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cases = [
        (ValueError, dict(base_batch_size=0)),
        (ValueError, dict(base_batch_size=-4)),
        (ValueError, dict(base_batch_size=8, batch_size=0)),
        (ValueError, dict(base_batch_size=8, batch_size="big")),
        (ValueError, dict(base_batch_size=8, mode="adam")),
        (ValueError, dict(base_batch_size=8, mode="adam-sqrt")),      # SGD has no betas/eps
        (TypeError, dict(base_batch_size=8, lr_schedule=0.5)),
    ]
    for exc, kw in cases:
        with pytest.raises(exc) as info:
            AdaScale(opt, mon, **kw)
        assert "\n" not in str(info.value) and str(info.value)
    with pytest.raises(TypeError, match="NoiseMonitor"):
        AdaScale(opt, object(), 8)
    with pytest.raises(TypeError, match="Optimizer"):
        AdaScale(object(), mon, 8)
    stray = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="group 1 has no parameter"):
        AdaScale(torch.optim.SGD([{"params": model.parameters()}, {"params": [stray]}], lr=0.1), mon, 8)
    ada = AdaScale(opt, mon, 8)
    with pytest.raises(ValueError, match="batch_size must be > 0"):
        ada.step(batch_size=-1)


# ------------------------------------------------------ real monitor, one worker
def regression(n, seed, d, noise, spread=1.0, offset=0.0):
    """x = offset + spread · N(0, 1), y = x·1 + noise · N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    x = offset + spread * torch.randn(n, d, generator=g, dtype=F64)
    return x, x.sum(1, keepdim=True) + noise * torch.randn(n, 1, generator=g, dtype=F64)


def run_per_sample(d, w0, data, steps=30, B=64, B0=8, lr=1e-4):
    model = nn.Linear(d, 1, bias=False).to(F64)
    with torch.no_grad():
        model.weight.fill_(w0)
    mon = gradnoise.NoiseMonitor(model, source="per_sample")
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    ada = AdaScale(opt, mon, base_batch_size=B0, batch_size=B)
    for i in range(steps):
        x, y = data(B, i)
        F.mse_loss(model(x), y).backward()
        rec = mon.step()
        before = (copy.deepcopy(mon.state_dict()), mon.last)
        ada.step()
        assert mon.state_dict() == before[0] and mon.last is before[1]   # read-only
        s = rec.smoothed
        assert ada.gain[0] == pytest.approx(hand_gain(s.trace_cov, max(s.grad_sq_norm, 0.0), B, B0), rel=1e-12)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr * ada.gain[0], rel=1e-12)
        opt.zero_grad()
    mon.close()
    return ada


def test_per_sample_noise_dominated_gain_goes_to_S():
    """At the optimum with label noise: G = 0, tr Σ = 4σ²d, so r -> S = 8."""
    ada = run_per_sample(50, 1.0, lambda n, i: regression(n, i, 50, noise=3.0))
    assert ada.gain[0] > 0.9 * 8


def test_per_sample_tiny_noise_gain_goes_to_1():
    """Nearly identical samples far from the optimum: tr Σ ≈ 0, r -> 1."""
    ada = run_per_sample(4, 0.0, lambda n, i: regression(n, i, 4, noise=1e-4, spread=1e-4, offset=1.0))
    assert 1.0 <= ada.gain[0] < 1.001


def test_per_sample_noisy_data_gain_above_one():
    ada = run_per_sample(4, 0.0, lambda n, i: regression(n, i, 4, noise=8.0))
    assert 1.2 < ada.gain[0] < 7.5
    assert ada.progress > ada.steps


def test_microbatch_source_two_backward_calls():
    model = two_layer(3)
    mon = gradnoise.NoiseMonitor(model, source="microbatch")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ada = AdaScale(opt, mon, base_batch_size=4, batch_size=16)
    g = torch.Generator().manual_seed(5)
    for _ in range(5):
        x, y = torch.randn(16, 3, generator=g, dtype=F64), torch.randint(0, 2, (16,), generator=g)
        for xs, ys in zip(x.split(8), y.split(8)):
            (F.cross_entropy(model(xs), ys) * 0.5).backward()
        rec = mon.step()
        ada.step()
        s = rec.smoothed
        assert ada.gain[0] == pytest.approx(hand_gain(max(s.trace_cov, 0), max(s.grad_sq_norm, 0), 16, 4), rel=1e-12)
        opt.zero_grad()
    assert 1.0 <= ada.gain[0] <= 4.0
    mon.close()


# ---------------------------------------------------------------------------- Adam
def direct_adam_gain(opt, names, rec, B, B0):
    """tr(PΣP) ≈ Σ_p mean(P²) tr Σ_p, |PG|² ≈ Σ_p mean(P²) |G_p|², P = 1/(√v̂ + ε)."""
    group = opt.param_groups[0]
    beta2, eps = group["betas"][1], group["eps"]
    t = g = 0.0
    for name, p in names:
        st = opt.state[p]
        key = "max_exp_avg_sq" if group["amsgrad"] else "exp_avg_sq"
        vhat = st[key] / (1 - beta2 ** st["step"].item())
        w = (1 / (vhat.sqrt() + eps)).pow(2).mean().item()
        t += w * rec.smoothed.by_param[name].trace_cov
        g += w * rec.smoothed.by_param[name].grad_sq_norm
    return hand_gain(max(t, 0), max(g, 0), B, B0)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_sqrt_gain_matches_direct_computation(amsgrad):
    model = two_layer(4)
    mon = gradnoise.NoiseMonitor(model, source="per_sample")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, amsgrad=amsgrad)
    ada = AdaScale(opt, mon, base_batch_size=4, batch_size=32, mode="adam-sqrt", precond_every=1)
    g = torch.Generator().manual_seed(6)
    total = 0.0
    for i in range(4):
        x, y = torch.randn(32, 3, generator=g, dtype=F64), torch.randint(0, 2, (32,), generator=g)
        F.cross_entropy(model(x), y).backward()
        rec = mon.step()
        s = rec.smoothed
        want = (hand_gain(max(s.trace_cov, 0), max(s.grad_sq_norm, 0), 32, 4) if i == 0  # no state yet: raw
                else direct_adam_gain(opt, list(model.named_parameters()), rec, 32, 4))
        ada.step()
        assert ada.gain[0] == pytest.approx(want, rel=1e-10)
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * math.sqrt(want), rel=1e-10)  # √r
        total += want
        opt.zero_grad()
    assert 1.0 <= ada.gain[0] <= 8.0
    assert ada.progress == pytest.approx(total, rel=1e-10)                   # τ grows by r, not √r
    mon.close()


def test_adam_sqrt_large_tensor_reads_a_subset_close_to_the_full_mean():
    """A 5120-element weight: its mean(P²) comes from 1024 fixed coordinates; reading
    the state leaves it as it was."""
    torch.manual_seed(7)
    model = nn.Linear(80, 64).to(F64)
    mon = gradnoise.NoiseMonitor(model, source="per_sample")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ada = AdaScale(opt, mon, base_batch_size=2, batch_size=16, mode="adam-sqrt", precond_every=1)
    g = torch.Generator().manual_seed(8)
    for i in range(3):
        x, y = torch.randn(16, 80, generator=g, dtype=F64), torch.randint(0, 64, (16,), generator=g)
        F.cross_entropy(model(x), y).backward()
        rec = mon.step()
        want = direct_adam_gain(opt, list(model.named_parameters()), rec, 16, 2) if i else None
        before = copy.deepcopy(opt.state_dict())
        ada.gains(16)
        assert str(opt.state_dict()) == str(before)
        assert all(torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
                   for a, b in zip(opt.state_dict()["state"].values(), before["state"].values()))
        ada.step()
        if want is not None:
            assert ada.gain[0] == pytest.approx(want, rel=0.02)
        opt.zero_grad()
    mon.close()


# ---------------------------------------------------------------- DDP source, 2 processes
def _adascale_ranks_run(rank: int) -> dict:
    """The worker's training; its DDP model and monitor are freed when it returns, before
    the process group is destroyed (a DDP reducer outliving its group aborts the process)."""
    import types

    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Linear(4, 1))
    monitor = gradnoise.NoiseMonitor(model, source="ddp")
    params = list(model.parameters())

    def sgd_step():
        with torch.no_grad():
            for p in params:
                p -= opt.param_groups[0]["lr"] * p.grad

    opt = types.SimpleNamespace(param_groups=[{"params": params, "lr": 0.05}], step=sgd_step, state={})
    ada = AdaScale(opt, monitor, base_batch_size=8, batch_size=32)  # 16 samples per rank
    g = torch.Generator().manual_seed(rank)
    gains, lrs = [], []
    for _ in range(6):
        x = torch.randn(16, 4, generator=g)
        y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0]) + torch.randn(16, generator=g)
        torch.nn.functional.mse_loss(model(x).squeeze(1), y).backward()
        rec = monitor.step()
        ada.step()
        for p in params:
            p.grad = None
        gains.append(ada.gain[0])
        lrs.append(opt.param_groups[0]["lr"])
    s = rec.smoothed
    out = {"gains": gains, "lrs": lrs, "trace": s.trace_cov, "grad": s.grad_sq_norm}
    monitor.close()
    return out


def _ddp_adascale_worker(rank: int, init_file: str, out_dir: str) -> None:
    """Each rank trains a DDP-wrapped linear model with AdaScale reading a
    ``source="ddp"`` monitor (ranks as the groups): both ranks must set the same gain."""
    import datetime
    import gc
    import json
    import os
    import traceback

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    out = {}
    try:
        out = _adascale_ranks_run(rank)
    except Exception:
        out = {"error": traceback.format_exc()}
    finally:
        gc.collect()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(out, fh)
        dist.barrier()  # neither rank tears gloo down while the other is still in it (SIGABRT)
        dist.destroy_process_group()


def test_ddp_source_both_ranks_set_the_same_gain(tmp_path):
    import json

    import torch.multiprocessing as mp

    ctx = mp.start_processes(_ddp_adascale_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                             join=False, start_method="spawn")
    try:
        ctx.join(timeout=120)
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, res in enumerate(ranks):
        assert "error" not in res, f"rank {r}:\n{res.get('error')}"
    assert ranks[0]["gains"] == ranks[1]["gains"] and ranks[0]["lrs"] == ranks[1]["lrs"]
    t, g = max(ranks[0]["trace"], 0.0), max(ranks[0]["grad"], 0.0)
    expected = min(max((t / 8 + g) / (t / 32 + g), 1.0), 4.0)
    assert ranks[0]["gains"][-1] == pytest.approx(expected, rel=1e-9)
    assert 1.0 <= min(ranks[0]["gains"]) and max(ranks[0]["gains"]) <= 4.0


def test_adam_sqrt_rereads_the_second_moments_every_precond_every_records():
    model = two_layer(4)
    mon = gradnoise.NoiseMonitor(model, source="per_sample")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ada = AdaScale(opt, mon, base_batch_size=4, batch_size=32, mode="adam-sqrt", precond_every=3)
    g = torch.Generator().manual_seed(9)
    seen = []
    for _ in range(8):
        x, y = torch.randn(32, 3, generator=g, dtype=F64), torch.randint(0, 2, (32,), generator=g)
        F.cross_entropy(model(x), y).backward()
        mon.step()
        ada.step()
        seen.append(id(ada._weights))
        opt.zero_grad()
    mon.close()
    # step 0 has no Adam state (plain gain), then a read at step 1, kept for 3 records, …
    assert seen[1] == seen[2] == seen[3] and seen[4] != seen[3] and seen[4] == seen[5] == seen[6] != seen[7]
    with pytest.raises(ValueError, match="precond_every"):
        AdaScale(opt, mon, base_batch_size=4, mode="adam-sqrt", precond_every=0)


def test_gain_ratio_is_the_adascale_rule_with_b_noise_from_the_moments():
    from gradnoise.stats import rules

    for t, g, b in [(64.0, 1.0, 128), (3.0, 0.5, 8), (1e-3, 2.0, 512), (40.0, 1.0, 16)]:
        assert gain_ratio(t, g, b, 32) == pytest.approx(rules.adascale(32, b, t / g), rel=1e-12)
