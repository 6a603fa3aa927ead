"""AdaptiveBatchSampler: the size rules, bounds, hysteresis, adjustment points, micro-batch
split, the learning rate, Adam's state, epochs, resume, DDP (2 gloo processes) and
option errors."""
from __future__ import annotations

import copy
import datetime
import json
import math
import os
import random
import time
import traceback
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradnoise
from gradnoise.control import batch_rules as br
from gradnoise.control.batch_size import AdaptiveBatchSampler
from gradnoise.monitor.record import StepRecord
from gradnoise.stats import NoiseStats


# ------------------------------------------------------------------------- helpers
def record(step: int, b_simple: float, interval=None) -> StepRecord:
    """A real StepRecord whose smoothed B_simple is ``b_simple``."""
    s = NoiseStats(32, 32, b_simple, 1.0, b_simple, 1.0, 1.0)
    iv = interval if interval is not None else (0.5 * b_simple, 2.0 * b_simple)
    return StepRecord(step, "per_sample", s, s, iv)


class FakeMonitor:
    """``step()`` publishes ``last`` with B_simple ``fn(step)``, as a NoiseMonitor would."""

    def __init__(self, fn, start: int = 0):
        self.fn, self.i, self.last = fn, start, None

    def step(self):
        self.last = record(self.i, float(self.fn(self.i)))
        self.i += 1
        return self.last


def index_loader(sampler, n: int, **kw) -> DataLoader:
    return DataLoader(TensorDataset(torch.arange(n)), batch_sampler=sampler, **kw)


def run_steps(sampler, loader, monitor=None, n_steps=None):
    """Plain loop over ``steps()``: per step (index, epoch, size in force, micro-batch
    sizes, indices)."""
    out = []
    for step in sampler.steps(loader):
        idx = [int(i) for (x,), _ in step for i in x]
        out.append((step.index, step.epoch, step.batch_size, step.sizes, idx))
        if monitor is not None:
            monitor.step()
        if n_steps is not None and len(out) >= n_steps:
            break
    return out


# --------------------------------------------------------------------------- rules
def test_proportional_rule_rounds_and_clips():
    assert br.proportional(50.0, 1.0, 8, 16, 256) == 48
    assert br.proportional(53.0, 1.0, 8, 16, 256) == 56
    assert br.proportional(50.0, 2.0, 1, 1, 1000) == 100
    assert br.proportional(1e9, 1.0, 8, 16, 256) == 256
    assert br.proportional(0.0, 1.0, 8, 16, 256) == 16
    assert br.grid_bounds(10, 100, 8) == (16, 96)
    with pytest.raises(ValueError):
        br.grid_bounds(10, 15, 8)


def test_goodput_maximiser_matches_brute_force():
    rnd = random.Random(0)
    for _ in range(300):
        q = rnd.choice([1, 2, 8])
        lo = q * rnd.randint(1, 8)
        hi = lo + q * rnd.randint(0, 400)
        alpha, beta = rnd.uniform(0.001, 1.0), rnd.uniform(1e-5, 1e-2)
        b_noise, b0 = rnd.uniform(0.0, 5000.0), lo
        fn = lambda b: alpha + beta * b  # noqa: E731
        grid = range(lo, hi + 1, q)
        brute = max(grid, key=lambda b: (br.goodput(b, b_noise, b0, fn), -b))
        assert br.best_goodput(b_noise, b0, q, lo, hi, fn, linear=(alpha, beta)) == brute
        assert br.best_goodput(b_noise, b0, q, lo, hi, fn) == brute
    # the closed form is the maximum of the continuous goodput
    alpha, beta, b_noise = 0.2, 1e-3, 800.0
    star = br.linear_optimum(alpha, beta, b_noise)
    g = lambda b: br.goodput(b, b_noise, 32, lambda x: alpha + beta * x)  # noqa: E731
    assert g(star) > g(star * 1.01) and g(star) > g(star * 0.99)
    assert br.efficiency(32, 100.0, 32) == 1.0


def test_split_sizes_and_step_time_fit():
    assert br.split(10, None) == [10] and br.split(10, 10) == [10]
    assert br.split(10, 4) == [4, 3, 3] and sum(br.split(1001, 64)) == 1001
    fit = br.LinearStepTime()
    fit.add(32, 0.1 + 32e-3)
    assert fit.fit() is None  # one size: undetermined
    fit.add(32, 0.1 + 32e-3)
    assert fit.fit() is None
    fit.add(64, 0.1 + 64e-3)
    a, b = fit.fit()
    assert math.isclose(a, 0.1) and math.isclose(b, 1e-3)
    slow = br.LinearStepTime()
    slow.add(32, 1.0)
    slow.add(64, 0.5)
    assert slow.fit() is None  # β ≤ 0


# ------------------------------------------------------------- the sampler's rules
def sized_after(monitor_b, interval=None, n=4096, **kw):
    """The size after one adjustment point (adjust_every=1) seeing B_simple ``monitor_b``."""
    mon = FakeMonitor(lambda i: monitor_b)
    s = AdaptiveBatchSampler(n, monitor=mon, adjust_every=1, shuffle=False, **kw)
    mon.last = record(0, monitor_b, interval)
    it = iter(s)
    next(it)  # step 0: never an adjustment point
    next(it)
    return s.batch_size


def test_c_b_simple_rule_and_bounds():
    assert sized_after(100.0, base_batch_size=32) == 100
    assert sized_after(100.0, base_batch_size=32, c=0.5) == 50
    assert sized_after(99.0, base_batch_size=32, multiple_of=8) == 96
    assert sized_after(1e6, base_batch_size=32, max_batch=512) == 512
    assert sized_after(1.0, base_batch_size=32, min_batch=16) == 16


def test_hysteresis_proportional():
    assert sized_after(33.0, base_batch_size=32) == 32  # 3 % < 5 %
    assert sized_after(34.0, base_batch_size=32) == 34  # 6 % > 5 %
    assert sized_after(34.0, base_batch_size=32, min_gain=0.1) == 32


def test_undefined_or_unbounded_noise_keeps_the_size():
    assert sized_after(math.nan, base_batch_size=32) == 32
    assert sized_after(math.inf, base_batch_size=32) == 32
    assert sized_after(100.0, interval=(40.0, math.inf), base_batch_size=32) == 32
    s = AdaptiveBatchSampler(1000, monitor=FakeMonitor(lambda i: 1.0), base_batch_size=32, adjust_every=1)
    it = iter(s)
    next(it), next(it)  # monitor.last is None
    assert s.batch_size == 32


def test_goodput_rule_and_its_hysteresis():
    alpha, beta, b_noise, b0 = 0.5, 1e-3, 2000.0, 32
    fn = lambda b: alpha + beta * b  # noqa: E731
    best = max(range(32, 4097, 32), key=lambda b: br.goodput(b, b_noise, b0, fn))
    gain = br.goodput(best, b_noise, b0, fn) / br.goodput(b0, b_noise, b0, fn) - 1
    kw = dict(base_batch_size=b0, multiple_of=32, rule="goodput", step_time=(alpha, beta))
    assert best > b0 and gain > 0.05
    assert sized_after(b_noise, **kw) == best
    assert sized_after(b_noise, min_gain=gain + 0.01, **kw) == b0
    assert sized_after(b_noise, min_gain=gain - 0.01, **kw) == best
    assert sized_after(b_noise, **{**kw, "step_time": fn}) == best  # a callable: grid search


def test_goodput_rule_with_measured_step_times():
    alpha, beta, b_noise = 0.5, 1e-3, 2000.0
    mon = FakeMonitor(lambda i: b_noise)
    s = AdaptiveBatchSampler(100000, monitor=mon, base_batch_size=32, multiple_of=32, rule="goodput",
                             adjust_every=1, shuffle=False)
    it = iter(s)
    next(it)
    s.record_step_time(alpha + beta * 32)  # one size: the fit is undetermined -> c*b_simple
    mon.step()
    next(it)
    assert s.batch_size == 2016  # 2000 on the grid of 32
    s.record_step_time(alpha + beta * 2016)
    next(it)
    fn = lambda b: alpha + beta * b  # noqa: E731
    assert s.batch_size == max(range(32, 100001, 32), key=lambda b: br.goodput(b, b_noise, 32, fn))
    with pytest.raises(ValueError):
        s.record_step_time(-1.0)


def test_adjustment_only_at_chosen_points():
    mon = FakeMonitor(lambda i: 8.0 * (i + 2))  # grows every step
    s = AdaptiveBatchSampler(100000, monitor=mon, base_batch_size=8, adjust_every=3)
    log = run_steps(s, index_loader(s, 100000), mon, n_steps=12)
    sizes = [b for _, _, b, _, _ in log]
    for i in range(1, 12):
        assert (sizes[i] != sizes[i - 1]) == (i % 3 == 0), sizes
    assert sizes[3] == 8 * (2 + 2)  # the reading of step 2, the last one before step 3

    mon = FakeMonitor(lambda i: i + 4.0)
    s = AdaptiveBatchSampler(64, monitor=mon, base_batch_size=4, adjust_every="epoch")
    log = []
    for epoch in range(3):
        s.set_epoch(epoch)
        log += run_steps(s, index_loader(s, 64), mon)
    firsts = {e: next(i for i, (_, ep, *_r) in enumerate(log) if ep == e) for e in range(3)}
    for i in range(1, len(log)):
        if log[i][2] != log[i - 1][2]:
            assert i in firsts.values(), (i, firsts)
    assert (firsts[1], firsts[2]) == (16, 20)  # 16 steps of 4, then 64 = 3 × 19 + 7
    assert (log[16][2], log[20][2]) == (19, 23)  # the readings of steps 15 and 19


# ------------------------------------------------------------------- micro-batches
def test_micro_batches_split_the_step_with_weights_summing_to_one():
    s = AdaptiveBatchSampler(1000, base_batch_size=90, max_device_batch=32, seed=3)
    assert s.micro_batch_sizes == [30, 30, 30] and s.accumulation_steps == 3
    loader = index_loader(s, 1000)
    seen = []
    for step in s.steps(loader):
        assert len(step) == len(step.sizes) and math.isclose(sum(step.weights), 1.0)
        batches = [(x.tolist(), w) for (x,), w in step]
        assert [len(b) for b, _ in batches] == list(step.sizes)
        assert all(len(b) <= 32 for b, _ in batches)
        assert [w for _, w in batches] == [len(b) / step.n_samples for b, _ in batches]
        union = [i for b, _ in batches for i in b]
        assert len(set(union)) == len(union) == step.n_samples == step.local_batch_size
        seen += union
    assert sorted(seen) == list(range(1000))  # drop_last=False: the last step has 100 % 90 = 10
    assert len(s) == 11 * 3 + 1 and len(loader) == len(s)


def test_drop_last_and_len():
    s = AdaptiveBatchSampler(100, base_batch_size=32, drop_last=True)
    log = run_steps(s, index_loader(s, 100))
    assert [b for *_x, b, _s, _i in log] == [32, 32, 32] and len(s) == 3 == s.steps_per_epoch
    s = AdaptiveBatchSampler(100, base_batch_size=32)
    assert [len(i) for *_x, i in run_steps(s, index_loader(s, 100))] == [32, 32, 32, 4] and len(s) == 4


def test_prefetching_workers_keep_steps_together():
    mon = FakeMonitor(lambda i: 16.0 * (i // 2 + 1))
    s = AdaptiveBatchSampler(400, monitor=mon, base_batch_size=16, adjust_every=2, max_device_batch=16,
                             max_batch=64)
    loader = index_loader(s, 400, num_workers=2, prefetch_factor=4)
    log = run_steps(s, loader, mon)
    assert max(b for *_x, b, _s, _i in log) == 64
    for _, _, b, sizes, idx in log:
        assert len(idx) == sum(sizes) <= b
    assert sorted(i for *_x, idx in log for i in idx) == list(range(400))
    # leaving early rewinds to the first step not handed out: nothing lost or repeated
    s = AdaptiveBatchSampler(400, base_batch_size=16, max_device_batch=8)
    loader = index_loader(s, 400, num_workers=2, prefetch_factor=4)
    first = run_steps(s, loader, n_steps=5)
    rest = run_steps(s, loader)
    assert rest[0][0] == 5
    assert sorted(i for *_x, idx in first + rest for i in idx) == list(range(400))


# -------------------------------------------------------- training with a monitor
def test_training_loop_with_a_real_monitor_grows_the_batch():
    """Linear regression from far away: as the loss falls B_simple grows, and so does
    ``4·B_simple``; micro-batches of ≤ 32 with weights b_j/b give the monitor and the
    optimizer the step's mean loss (checked against one full-batch pass on a copy)."""
    torch.manual_seed(0)
    N, D = 16384, 4
    X = torch.randn(N, D)
    y = X @ (3 * torch.randn(D)) + 2.0 * torch.randn(N)
    model = nn.Linear(D, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = gradnoise.NoiseMonitor(model, source="per_sample", beta=0.9)
    s = AdaptiveBatchSampler(N, monitor=mon, base_batch_size=32, min_batch=32, max_batch=512, c=4.0,
                             adjust_every=5, max_device_batch=32, optimizer=opt, lr_rule="sqrt")
    loader = DataLoader(TensorDataset(X, y[:, None]), batch_sampler=s)
    loss_fn = nn.functional.mse_loss
    sizes, checked = [], 0
    try:
        for step in s.steps(loader):
            assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * math.sqrt(step.batch_size / 32))
            before = copy.deepcopy(model) if len(step) > 1 and checked < 3 else None
            xs, ys = [], []
            for (x, yy), w in step:
                (loss_fn(model(x), yy) * w).backward()
                xs.append(x), ys.append(yy)
            rec = mon.step()
            assert rec.raw.batch_size == step.n_samples == step.batch_size == rec.raw.n_groups
            if before is not None:  # the same step in one pass, on a copy
                checked += 1
                with gradnoise.NoiseMonitor(before, source="per_sample") as ref:
                    loss_fn(before(torch.cat(xs)), torch.cat(ys)).backward()
                    r = ref.step().raw
                assert r.trace_cov == pytest.approx(rec.raw.trace_cov, rel=1e-4)
                assert r.grad_sq_norm == pytest.approx(rec.raw.grad_sq_norm, rel=1e-4)
                for p, q in zip(model.parameters(), before.parameters()):
                    torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
            sizes.append(step.batch_size)
            opt.step()
            opt.zero_grad()
            if step.index >= 126:
                break
    finally:
        mon.close()
    assert checked == 3
    assert sizes[0] == 32 and sizes[-1] >= 256
    assert all(b >= a for a, b in zip(sizes, sizes[1:]))
    assert all(sizes[i] == sizes[i - 1] for i in range(1, len(sizes)) if i % 5)


# ------------------------------------------------------------- learning rate, Adam
@pytest.mark.parametrize("rule, expect", [("linear", 4.0), ("sqrt", 2.0), ("adascale", (1 + 4) / (1 + 1)),
                                          (None, 1.0)])
def test_lr_rule_applied_to_every_param_group(rule, expect):
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1},
                           {"params": model[1].parameters(), "lr": 0.02}], lr=0.1)
    mon = FakeMonitor(lambda i: 128.0)
    s = AdaptiveBatchSampler(4096, monitor=mon, base_batch_size=32, adjust_every=1, optimizer=opt, lr_rule=rule)
    mon.step()
    it = iter(s)
    next(it), next(it)  # plain iteration (num_workers=0): the lr changes with the size
    assert s.batch_size == 128 and s.lr_multiplier == pytest.approx(expect)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1 * expect, 0.02 * expect])


def test_adam_moments_untouched_by_a_size_change():
    torch.manual_seed(1)
    model = nn.Linear(4, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    mon = FakeMonitor(lambda i: 8.0 if i < 3 else 64.0)
    s = AdaptiveBatchSampler(1000, monitor=mon, base_batch_size=8, adjust_every=4, optimizer=opt,
                             lr_rule="linear", max_device_batch=16)
    X, y = torch.randn(1000, 4), torch.randn(1000, 1)
    loader = DataLoader(TensorDataset(X, y), batch_sampler=s)
    snap = None
    for step in s.steps(loader):
        if step.index == 4:  # the first step at the new size has begun: compare
            assert step.batch_size == 64 and opt.param_groups[0]["lr"] == pytest.approx(8e-3)
            for p in model.parameters():
                st = opt.state[p]
                for key in ("exp_avg", "exp_avg_sq", "step"):
                    assert st[key] is snap[p][key][0] and torch.equal(st[key], snap[p][key][1]), key
            break
        for (x, yy), w in step:
            (nn.functional.mse_loss(model(x), yy) * w).backward()
        mon.step()
        opt.step()
        opt.zero_grad()
        snap = {p: {k: (v, v.clone()) for k, v in opt.state[p].items()} for p in model.parameters()}


# ---------------------------------------------------------------- epochs, resume
def test_epochs_follow_seed_and_epoch_and_shards_are_disjoint():
    def order(seed, epoch, rank=0, replicas=1, n=103, b=10):
        s = AdaptiveBatchSampler(n, base_batch_size=b, seed=seed, num_replicas=replicas, rank=rank)
        s.set_epoch(epoch)
        return [i for *_x, idx in run_steps(s, index_loader(s, n)) for i in idx]

    assert order(0, 1) == order(0, 1) and order(0, 1) != order(0, 2) and order(0, 1) != order(1, 1)
    a, b = order(0, 1, rank=0, replicas=2), order(0, 1, rank=1, replicas=2)
    assert len(a) == len(b) == 52  # 103 samples padded to 104 as DistributedSampler does
    assert sorted(set(a) | set(b)) == list(range(103)) and len(set(a) & set(b)) == 1
    s = AdaptiveBatchSampler(50, base_batch_size=10)
    run_steps(s, index_loader(s, 50))
    assert s.epoch == 1  # a full pass moves on
    s.set_epoch(1)  # the current epoch: no restart
    assert s.state_dict()["cursor"][:2] == [1, 0]


def _resume_run(state=None, steps=None, start_step=0):
    """Three epochs of 100 samples with a growing fake noise scale; the log of steps,
    and the states (sampler, optimizer) after ``steps`` steps."""
    model = nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = FakeMonitor(lambda i: 4.0 * (i + 2), start=start_step)
    s = AdaptiveBatchSampler(100, monitor=mon, base_batch_size=4, max_batch=24, adjust_every=3,
                             max_device_batch=8, optimizer=opt, lr_rule="sqrt", seed=5)
    if state is not None:
        s.load_state_dict(json.loads(json.dumps(state[0])))
        opt.load_state_dict(state[1])
    loader = index_loader(s, 100)
    log = []
    for epoch in range(s.epoch, 3):
        s.set_epoch(epoch)
        for step in s.steps(loader):
            idx = [int(i) for (x,), _ in step for i in x]
            log.append((step.index, step.epoch, step.n_samples, idx, opt.param_groups[0]["lr"]))
            mon.step()
            if steps is not None and len(log) == steps:
                return log, (s.state_dict(), copy.deepcopy(opt.state_dict()))
    return log, None


def test_state_dict_resume_continues_identically():
    full, _ = _resume_run()
    assert len({b for _, _, b, _, _ in full}) > 2 and full[-1][1] == 2
    for k in (6, 9, 14):  # mid-epoch, and the next step an adjustment point (6, 9)
        head, state = _resume_run(steps=k)
        tail, _ = _resume_run(state=state, start_step=k)
        assert head + tail == full, k


# -------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kw", [
    dict(dataset_size=0), dict(base_batch_size=0), dict(base_batch_size=30, multiple_of=8),
    dict(base_batch_size=64, max_batch=32), dict(min_batch=64, max_batch=32), dict(rule="linear"),
    dict(c=0.0), dict(c=math.nan), dict(min_gain=-0.1), dict(adjust_every=0), dict(adjust_every="step"),
    dict(lr_rule="cubic"), dict(max_device_batch=0), dict(multiple_of=0), dict(step_time=(1.0,)),
    dict(step_time=(0.1, -1.0)), dict(num_replicas=2, rank=2), dict(base_batch_size=33, num_replicas=2, rank=0),
])
def test_bad_options_are_one_line_value_errors(kw):
    args = {"dataset_size": 1000, "base_batch_size": 32, **kw}
    with pytest.raises(ValueError) as e:
        AdaptiveBatchSampler(args.pop("dataset_size"), **args)
    assert "\n" not in str(e.value)


def test_bad_state_and_loader():
    s = AdaptiveBatchSampler(1000, base_batch_size=32)
    with pytest.raises(ValueError, match="dataset_size"):
        AdaptiveBatchSampler(999, base_batch_size=32).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="batch_sampler"):
        next(s.steps(DataLoader(TensorDataset(torch.arange(10)), batch_size=2)))


# ---------------------------------------------------------------- DDP, 2 processes
N_DDP, BASE_DDP, JOIN_TIMEOUT_S = 100, 8, 120.0


def ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    """Rank 0's monitor says B_simple = 32, rank 1's 8: both must follow rank 0. The loop
    all-reduces each step's gradient of a tiny model by hand, as DDP would, so the
    sampler's broadcasts interleave with other collectives on the same group. (DDP and
    torch.optim are left out: constructing either imports torch._dynamo, seconds in a
    fresh process; the sampler only needs ``param_groups``.)"""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    result = {}
    try:
        torch.manual_seed(0)
        model = nn.Linear(1, 1)
        opt = types.SimpleNamespace(param_groups=[{"params": list(model.parameters()), "lr": 0.1}])
        mon = FakeMonitor(lambda i: 32.0 if rank == 0 else 8.0)
        s = AdaptiveBatchSampler(N_DDP, monitor=mon, base_batch_size=BASE_DDP, adjust_every=2,
                                 max_device_batch=8, optimizer=opt, lr_rule="linear", seed=7)
        steps = []
        for step in s.steps(index_loader(s, N_DDP)):
            idx = []
            for (x,), w in step:
                idx += x.tolist()
                (model(x[:, None].float()).pow(2).mean() * w).backward()
            mon.step()
            with torch.no_grad():
                for p in model.parameters():
                    dist.all_reduce(p.grad)
                    p -= opt.param_groups[0]["lr"] * p.grad / 2
                    p.grad = None
            steps.append({"size": step.n_samples, "sizes": list(step.sizes), "idx": idx,
                          "lr": opt.param_groups[0]["lr"]})
        w = torch.cat([p.detach().flatten() for p in model.parameters()])
        result = {"steps": steps, "world": s.num_replicas, "weights": w.tolist()}
    except Exception:
        result = {"error": traceback.format_exc()}
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(result, fh)
        dist.barrier()  # neither rank tears gloo down while the other is still in it (SIGABRT)
        dist.destroy_process_group()


def test_ddp_two_ranks_agree_and_shard_the_epoch(tmp_path):
    ctx = mp.start_processes(ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while not ctx.join(timeout=0.2):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the DDP workers did not finish in {JOIN_TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    ranks = []
    for r in range(2):
        with open(tmp_path / f"rank{r}.json") as fh:
            res = json.load(fh)
        assert "error" not in res, f"rank {r}:\n{res.get('error')}"
        ranks.append(res)
    a, b = ranks[0]["steps"], ranks[1]["steps"]
    assert ranks[0]["world"] == 2 and len(a) == len(b)
    sizes = [st["size"] for st in a]
    assert sizes == [st["size"] for st in b] == [8, 8, 32, 32, 20]  # rank 0's 32 from step 2; 100 − 80 last
    assert [st["sizes"] for st in a] == [[4], [4], [8, 8], [8, 8], [5, 5]]
    assert [st["lr"] for st in a] == [st["lr"] for st in b] == pytest.approx([0.1, 0.1, 0.4, 0.4, 0.4])
    for sa, sb in zip(a, b):
        assert not set(sa["idx"]) & set(sb["idx"]) and len(sa["idx"]) == len(sb["idx"]) == sa["size"] // 2
    assert ranks[0]["weights"] == ranks[1]["weights"]  # the same updates on both ranks
    union = [i for st in a + b for i in st["idx"]]
    assert sorted(union) == list(range(N_DDP))
