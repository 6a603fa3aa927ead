"""NoiseMonitor in a single process, against the float64 oracle (tests/reference.py).

Every test trains a tiny model in float64 unless it is about precision (bf16 autocast,
GradScaler). The oracle is evaluated on the parameters the step's backward passes saw,
i.e. before the optimizer moves them.
"""
import copy
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradnoise
import reference as R
from gradnoise import SampleMixingError
from gradnoise.errors import GradNoiseError
from gradnoise.stats import smoothing

try:
    from torch.overrides import _get_current_function_mode_stack as _mode_stack
except ImportError:  # pragma: no cover
    _mode_stack = None

F64 = torch.float64
D_IN, HIDDEN, N_OUT = 5, 7, 3
FIELDS = ("trace_cov", "grad_sq_norm", "b_simple", "mean_sq_norm", "group_sq_norm")


# --------------------------------------------------------------------------- helpers
def mlp(seed=0, dtype=F64, batchnorm=False, signal=False):
    """Linear-Tanh-Linear (a BatchNorm1d after the first Linear, which then has no bias:
    BatchNorm would make its gradient exactly zero). ``signal``: the output bias favours
    class 0, which :func:`batch` with ``signal`` never uses, so that ``|G|²`` clearly
    exceeds the noise and ``b_simple`` and its interval are finite."""
    torch.manual_seed(seed)
    layers = [nn.Linear(D_IN, HIDDEN, bias=not batchnorm)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(HIDDEN))
    layers += [nn.Tanh(), nn.Linear(HIDDEN, N_OUT)]
    model = nn.Sequential(*layers).to(dtype).train()
    if signal:
        with torch.no_grad():
            model[-1].bias.copy_(torch.tensor([3.0, -1.0, -1.0]))
    return model


def batch(n, seed, dtype=F64, signal=False):
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(n, D_IN, generator=g).to(dtype)
    y = torch.randint(1 if signal else 0, N_OUT, (n,), generator=g)
    return x, y


def close(a, b, rel, abs=0.0):
    """``a ≈ b``, NaN equal to NaN, infinities equal to themselves."""
    return a == pytest.approx(b, rel=rel, abs=abs, nan_ok=True)


def ce_sum(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def unhooked(model):
    """A deep copy of ``model`` without the monitor's module hooks. (A plain deepcopy
    carries them along, and the copy's forward would open a capture of its own: see
    test_deepcopy_of_monitored_model_leaks_no_capture.)"""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        for d in (m._forward_pre_hooks, m._forward_hooks, m._backward_hooks, m._backward_pre_hooks):
            d.clear()
    return twin


def oracle_grads(model, x, y):
    return R.per_sample_grads(unhooked(model), F.cross_entropy, x, y)


def group_grads(model, parts):
    """Fake 'per-sample' gradients where every sample of micro-batch j carries the
    gradient of that micro-batch's mean loss (computed whole, so BatchNorm mixes within
    the micro-batch as in training). ``R.group_noise_stats`` of these with the same
    sizes is the oracle of the micro-batch estimator."""
    m64 = R.to_float64(unhooked(model))
    named = [(n, p) for n, p in m64.named_parameters() if p.requires_grad]
    rows = {n: [] for n, _ in named}
    for x, y in parts:
        loss = F.cross_entropy(m64(x.to(F64)), y)
        for (n, _), g in zip(named, torch.autograd.grad(loss, [p for _, p in named])):
            rows[n].append(g.expand(x.shape[0], *g.shape))
    return {n: torch.cat(v) for n, v in rows.items()}


def assert_stats(got, want, rtol=1e-9, atol=1e-12, by_param=True):
    """``got`` (gradnoise NoiseStats) equals ``want`` (oracle RefNoise)."""
    pairs = [("total", got, want.total)]
    if by_param:
        assert set(got.by_param) == set(want.by_param)
        pairs += [(n, got.by_param[n], want.by_param[n]) for n in want.by_param]
    for name, g, w in pairs:
        assert g.batch_size == w.batch_size and g.n_groups == w.n_groups, name
        assert g.flag == w.flag, name
        for f in FIELDS:
            a, b = getattr(g, f), getattr(w, f)
            assert close(a, b, rtol, atol), (name, f, a, b)


def accumulate(model, parts, reduction="mean", loss_fn=None):
    """One step's backward passes over micro-batches ``parts``; "mean": each loss is the
    micro-batch mean times its share of the step, "sum": plain sums."""
    B = sum(x.shape[0] for x, _ in parts)
    for x, y in parts:
        out = model(x)
        if loss_fn is not None:
            loss = loss_fn(out, y)
        elif reduction == "mean":
            loss = F.cross_entropy(out, y) * (x.shape[0] / B)
        else:
            loss = ce_sum(out, y)
        loss.backward()


def split(x, y, sizes):
    return list(zip(torch.split(x, sizes), torch.split(y, sizes)))


def modes_active():
    return len(_mode_stack()) if _mode_stack is not None else 0


def tensor_hooks(model):
    return sum(len(p._backward_hooks or {}) for p in model.parameters())


# ------------------------------------------------------------------------ per_sample
def test_per_sample_one_step_equals_oracle():
    model = mlp()
    x, y = batch(8, 0)
    mon = gradnoise.NoiseMonitor(model, source="per_sample")
    want = R.noise_stats(oracle_grads(model, x, y))
    F.cross_entropy(model(x), y).backward()
    rec = mon.step()
    assert rec is not None and rec.step == 0 and rec.source == "per_sample"
    assert_stats(rec.raw, want)
    assert not rec.skipped and rec.loss_scale is None
    mon.close()


def test_exception_between_forward_and_step_leaves_nothing_active():
    """A forward that raises (or is followed by an exception before step()) must not
    leave the router on: unrelated code, even another model's sum-reduced backward, runs
    as plain PyTorch, and the monitor's next step is still exact."""
    model = mlp()
    x, y = batch(8, 0)
    mon = gradnoise.NoiseMonitor(model, source="per_sample")
    with pytest.raises(KeyError):
        model(x)
        raise KeyError("user error after the forward")
    assert modes_active() == 0
    other = nn.Linear(x.shape[1], 3).to(x.dtype)
    F.cross_entropy(other(x), y, reduction="sum").backward()  # no ReductionError
    (other.weight.sum() * x).sum().backward()                  # no UnsupportedUseError
    model.zero_grad()
    want = R.noise_stats(oracle_grads(model, x, y))
    F.cross_entropy(model(x), y).backward()
    assert_stats(mon.step().raw, want)
    mon.close()


def test_a_second_capture_beside_the_monitors_is_refused():
    """The monitor's capture has no router on the stack between forward and step();
    another capture of the same model is still refused, and works once step() closed it."""
    model = mlp()
    x, y = batch(8, 0)
    mon = gradnoise.NoiseMonitor(model, source="per_sample")
    loss = F.cross_entropy(model(x), y)
    with pytest.raises(gradnoise.CaptureStateError, match="already open"):
        with gradnoise.capture(model):
            pass
    loss.backward()
    assert mon.step() is not None
    mon.close()
    with gradnoise.capture(model) as cap:
        F.cross_entropy(model(x), y).backward()
    assert cap.batch_size == 8


def test_exception_inside_the_forward_leaves_nothing_active():
    class Fails(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            raise RuntimeError("inside the model")

    model = Fails()
    mon = gradnoise.NoiseMonitor(model, source="per_sample")
    with pytest.raises(RuntimeError, match="inside the model"):
        model(torch.randn(2, 4))
    assert modes_active() == 0
    mon.close()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_per_sample_accumulation_unequal_microbatches(reduction):
    model = mlp(1)
    x, y = batch(8, 1)
    want = R.noise_stats(oracle_grads(model, x, y))
    mon = gradnoise.NoiseMonitor(model, source="per_sample", reduction=reduction)
    accumulate(model, split(x, y, [3, 5]), reduction=reduction)
    rec = mon.step()
    assert rec.raw.batch_size == 8 and rec.raw.n_groups == 8
    assert_stats(rec.raw, want)
    # p.grad is the plain accumulated gradient: the mean (or sum) over the 8 samples
    ref = R.mean_grad(unhooked(model), F.cross_entropy, x, y)
    factor = 1.0 if reduction == "mean" else 8.0
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n] * factor, rtol=1e-10, atol=1e-12)
    mon.close()


def test_per_sample_sum_reduction():
    model = mlp(2)
    x, y = batch(6, 2)
    want = R.noise_stats(oracle_grads(model, x, y))
    mon = gradnoise.NoiseMonitor(model, source="per_sample", reduction="sum")
    ce_sum(model(x), y).backward()
    assert_stats(mon.step().raw, want)
    mon.close()


def test_per_sample_ignores_gradient_left_from_before():
    """A gradient already in p.grad when the step starts (no zero_grad) is not this
    step's: the statistics are those of the step's own samples."""
    model = mlp(3)
    x0, y0 = batch(5, 30)
    F.cross_entropy(model(x0), y0).backward()  # before the monitor exists
    x, y = batch(6, 3)
    want = R.noise_stats(oracle_grads(model, x, y))
    mon = gradnoise.NoiseMonitor(model, source="per_sample")
    F.cross_entropy(model(x), y).backward()
    assert_stats(mon.step().raw, want)
    mon.close()


# ------------------------------------------------------------------------ microbatch
@pytest.mark.parametrize("sizes", [[3, 5], [2, 4, 3], [4, 4]])
def test_microbatch_equals_oracle_groups(sizes):
    model = mlp(4)
    x, y = batch(sum(sizes), 4)
    want = R.group_noise_stats(oracle_grads(model, x, y), sizes)
    mon = gradnoise.NoiseMonitor(model, source="microbatch")
    accumulate(model, split(x, y, sizes))
    rec = mon.step()
    assert rec.source == "microbatch"
    assert_stats(rec.raw, want)
    mon.close()


def test_microbatch_sum_reduction():
    sizes = [3, 5]
    model = mlp(5)
    x, y = batch(8, 5)
    want = R.group_noise_stats(oracle_grads(model, x, y), sizes)
    mon = gradnoise.NoiseMonitor(model, source="microbatch", reduction="sum")
    accumulate(model, split(x, y, sizes), reduction="sum")
    assert_stats(mon.step().raw, want)
    mon.close()


def test_microbatch_explicit_samples():
    """Sample counts given to step() instead of read from the inputs."""
    sizes = [3, 5]
    model = mlp(6)
    x, y = batch(8, 6)
    want = R.group_noise_stats(oracle_grads(model, x, y), sizes)
    mon = gradnoise.NoiseMonitor(model, source="microbatch")
    accumulate(model, split(x, y, sizes))
    assert_stats(mon.step(samples=sizes).raw, want)
    mon.close()


def test_microbatch_with_batchnorm_in_training_mode():
    sizes = [3, 5]
    model = mlp(7, batchnorm=True)
    x, y = batch(8, 7)
    parts = split(x, y, sizes)
    want = R.group_noise_stats(group_grads(model, parts), sizes)
    mon = gradnoise.NoiseMonitor(model, source="microbatch")
    accumulate(model, parts)
    rec = mon.step()
    assert_stats(rec.raw, want)
    assert set(rec.raw.by_param) == {n for n, _ in model.named_parameters()}
    mon.close()


def test_per_sample_with_batchnorm_raises_sample_mixing():
    model = mlp(7, batchnorm=True)
    x, y = batch(8, 7)
    mon = gradnoise.NoiseMonitor(model, source="per_sample")
    with pytest.raises(SampleMixingError, match="BatchNorm"):
        F.cross_entropy(model(x), y).backward()
        mon.step()
    mon.close()
    assert modes_active() == 0


def test_microbatch_with_one_backward_per_step_is_refused_first_then_flagged():
    """BatchNorm users told to use the micro-batch source: one backward() per step gives one
    group, so the first such step is an error with the recipe, not 100 steps of NaN; a
    later one (a short last accumulation) is flagged single_group and skipped, with one
    warning."""
    model = mlp(8, batchnorm=True)
    x, y = batch(6, 8)
    mon = gradnoise.NoiseMonitor(model, source="microbatch")
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(gradnoise.errors.GradNoiseError, match=r"single_group.*k ≥ 2 micro-batches"):
        mon.step()
    mon.close()
    mon = gradnoise.NoiseMonitor(model, source="microbatch")
    for part in (slice(0, 3), slice(3, 6)):
        (F.cross_entropy(model(x[part]), y[part]) / 2).backward()
    assert mon.step().raw.n_groups == 2
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match="single_group"):
        rec = mon.step()
    assert rec.raw.flag == gradnoise.stats.FLAG_SINGLE_GROUP and rec.skipped
    mon.close()


def test_batchnorm_error_gives_a_recipe_that_works():
    model = mlp(7, batchnorm=True)
    x, y = batch(8, 7)
    with pytest.raises(SampleMixingError, match=r"source='microbatch'.*k ≥ 2 micro-batches.*b_j/B"):
        with gradnoise.capture(model):
            F.cross_entropy(model(x), y).backward()


def test_microbatch_counts_only_the_steps_passes():
    """Gradient left in p.grad from an unmonitored backward is not a micro-batch."""
    sizes = [3, 5]
    model = mlp(9)
    F.cross_entropy(model(batch(4, 90)[0]), batch(4, 90)[1]).backward()
    x, y = batch(8, 9)
    want = R.group_noise_stats(oracle_grads(model, x, y), sizes)
    mon = gradnoise.NoiseMonitor(model, source="microbatch")
    accumulate(model, split(x, y, sizes))
    assert_stats(mon.step().raw, want)
    mon.close()


# ------------------------------------------- parameters not reached by every pass
class Branchy(nn.Module):
    """``a(x)``, plus ``b(x)`` when ``use_b``: ``b`` is reached by some passes only."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(40)
        self.a = nn.Linear(D_IN, N_OUT).double()
        self.b = nn.Linear(D_IN, N_OUT).double()
        self.use_b = True

    def forward(self, x):
        return self.a(x) + self.b(x) if self.use_b else self.a(x)


def _branchy_oracle(model, parts, flags):
    """Per-sample gradients of the step whose micro-batch j runs with ``use_b = flags[j]``;
    a parameter a micro-batch does not reach has zero gradient for its samples."""
    rows = {n: [] for n, _ in model.named_parameters()}
    for (x, y), flag in zip(parts, flags):
        twin = unhooked(model)
        twin.use_b = flag
        grads = R.per_sample_grads(twin, F.cross_entropy, x, y)
        for n, p in model.named_parameters():
            rows[n].append(grads[n] if n in grads else torch.zeros(x.shape[0], *p.shape, dtype=F64))
    return {n: torch.cat(v) for n, v in rows.items()}


@pytest.mark.parametrize("source", ["per_sample", "microbatch"])
def test_parameter_reached_by_one_microbatch_only(source):
    sizes, flags = [3, 5], [False, True]
    model = Branchy()
    x, y = batch(8, 40)
    parts = split(x, y, sizes)
    grads = _branchy_oracle(model, parts, flags)
    want = R.noise_stats(grads) if source == "per_sample" else R.group_noise_stats(grads, sizes)
    mon = gradnoise.NoiseMonitor(model, source=source)
    for (xb, yb), flag in zip(parts, flags):
        model.use_b = flag
        (F.cross_entropy(model(xb), yb) * (xb.shape[0] / 8)).backward()
    assert_stats(mon.step().raw, want)
    mon.close()


@pytest.mark.parametrize("source", ["per_sample", "microbatch"])
def test_parameter_unused_this_step_with_zeroed_grads(source):
    """zero_grad(set_to_none=False) keeps zero tensors in p.grad; a parameter the step
    does not reach then has zero gradient, not an error (per_sample once raised
    UnsupportedUseError: it took 'p.grad is not None' for 'reached in this capture')."""
    model = Branchy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = gradnoise.NoiseMonitor(model, source=source)
    for i, flag in enumerate([True, False]):
        sizes = [3, 5]
        x, y = batch(8, 41 + i)
        parts = split(x, y, sizes)
        grads = _branchy_oracle(model, parts, [flag, flag])
        want = R.noise_stats(grads) if source == "per_sample" else R.group_noise_stats(grads, sizes)
        opt.zero_grad(set_to_none=False)
        model.use_b = flag
        accumulate(model, parts)
        rec = mon.step()
        # a parameter no pass reached may be reported with zeros or left out
        got_names = set(rec.raw.by_param)
        assert {"a.weight", "a.bias"} <= got_names
        for n in got_names - set(want.by_param):
            assert rec.raw.by_param[n].trace_cov == 0.0
        for f in ("trace_cov", "grad_sq_norm", "mean_sq_norm", "group_sq_norm"):
            assert close(getattr(rec.raw, f), getattr(want.total, f), 1e-9, 1e-12), (i, f)
        opt.step()
    mon.close()


# --------------------------------------------------------------------------- every=k
def _train(model, mon, steps, sizes_of, probe=None, signal=False):
    """Run ``steps`` SGD steps, each over micro-batches ``sizes_of(i)``; returns
    ``(record, oracle per-sample grads, sizes)`` per step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = []
    for i in range(steps):
        sizes = sizes_of(i)
        x, y = batch(sum(sizes), 100 + i, signal=signal)
        grads = oracle_grads(model, x, y)
        opt.zero_grad(set_to_none=True)
        accumulate(model, split(x, y, sizes))
        rec = mon.step()
        out.append((rec, grads, sizes))
        if probe is not None:
            probe(i)
        opt.step()
    return out


def test_every_k_per_sample_leaves_nothing_behind_between_steps():
    every = 3
    model = mlp(10)
    mon = gradnoise.NoiseMonitor(model, source="per_sample", every=every)
    seen = []
    h = model.register_forward_hook(lambda *a: seen.append(modes_active()))
    after = []
    results = _train(model, mon, 7, lambda i: [6], probe=lambda i: after.append(modes_active()))
    h.remove()
    # a router during the forward of measured steps only, never between steps
    assert seen == [1 if i % every == 0 else 0 for i in range(7)]
    assert after == [0] * 7
    for i, (rec, grads, _) in enumerate(results):
        if i % every:
            assert rec is None
        else:
            assert rec.step == i
            assert_stats(rec.raw, R.noise_stats(grads))
    assert mon.step_index == 7
    mon.close()


def test_every_k_microbatch_hooks_only_for_measured_steps():
    every = 2
    model = mlp(11)
    mon = gradnoise.NoiseMonitor(model, source="microbatch", every=every)
    hooks_after = []
    results = _train(model, mon, 6, lambda i: [2, 3], probe=lambda i: hooks_after.append(tensor_hooks(model)))
    # after step i's step(): hooks exist only when step i+1 is measured
    P = len(list(model.parameters()))
    assert hooks_after == [P if (i + 1) % every == 0 else 0 for i in range(6)]
    for i, (rec, grads, sizes) in enumerate(results):
        if i % every:
            assert rec is None
        else:
            assert_stats(rec.raw, R.group_noise_stats(grads, sizes))
    mon.close()
    assert tensor_hooks(model) == 0


def test_close_removes_everything():
    model = mlp(12)
    for source in ("per_sample", "microbatch"):
        mon = gradnoise.NoiseMonitor(model, source=source)
        mon.close()
        assert tensor_hooks(model) == 0
        assert not model._forward_pre_hooks and not model._forward_hooks
        x, y = batch(4, 12)
        F.cross_entropy(model(x), y).backward()
        assert modes_active() == 0


# ------------------------------------------------------------- changing batch size
@pytest.mark.parametrize("source", ["per_sample", "microbatch"])
def test_batch_size_changing_between_steps(source):
    schedule = [[3, 5], [2, 2], [4, 1, 6], [5, 4]]
    model = mlp(13)
    mon = gradnoise.NoiseMonitor(model, source=source)
    for rec, grads, sizes in _train(model, mon, len(schedule), lambda i: schedule[i]):
        want = R.noise_stats(grads) if source == "per_sample" else R.group_noise_stats(grads, sizes)
        assert rec.raw.batch_size == sum(sizes)
        assert_stats(rec.raw, want)
    mon.close()


# ------------------------------------------------------------------------ GradScaler
def _scaler(scale):
    if not hasattr(torch, "amp") or not hasattr(torch.amp, "GradScaler"):
        pytest.skip("torch.amp.GradScaler not available")
    try:
        return torch.amp.GradScaler("cpu", init_scale=scale)
    except Exception as e:  # pragma: no cover
        pytest.skip(f"no CPU GradScaler: {e}")


@pytest.mark.parametrize("source", ["per_sample", "microbatch"])
def test_grad_scaler_raw_stats_equal_unscaled_run(source):
    sizes = [3, 5]
    plain_model = mlp(14, dtype=torch.float32)
    scaled_model = copy.deepcopy(plain_model)
    scaler = _scaler(1024.0)
    plain = gradnoise.NoiseMonitor(plain_model, source=source)
    scaled = gradnoise.NoiseMonitor(scaled_model, source=source, scaler=scaler)
    x, y = batch(8, 14, dtype=torch.float32)
    accumulate(plain_model, split(x, y, sizes))
    want = plain.step()
    B = 8
    for xb, yb in split(x, y, sizes):
        scaler.scale(F.cross_entropy(scaled_model(xb), yb) * (xb.shape[0] / B)).backward()
    got = scaled.step()
    assert got.loss_scale == 1024.0 and not got.skipped
    assert got.raw.flag == want.raw.flag
    for f in ("trace_cov", "grad_sq_norm", "b_simple"):
        assert close(getattr(got.raw, f), getattr(want.raw, f), 1e-4), f
        for n in want.raw.by_param:
            assert close(getattr(got.raw.by_param[n], f), getattr(want.raw.by_param[n], f), 1e-4, 1e-9), (n, f)
    plain.close()
    scaled.close()


@pytest.mark.parametrize("source", ["per_sample", "microbatch"])
def test_grad_scaler_overflow_step_is_skipped(source):
    sizes = [3, 5]
    model = mlp(15, dtype=torch.float32)
    scaler = _scaler(1024.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = gradnoise.NoiseMonitor(model, source=source, scaler=scaler, beta=0.8)

    def step(i, overflow=False):
        x, y = batch(8, 150 + i, dtype=torch.float32)
        opt.zero_grad(set_to_none=True)
        for xb, yb in split(x, y, sizes):
            loss = F.cross_entropy(model(xb), yb) * (xb.shape[0] / 8)
            if overflow:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the capture's non-finite warning
            rec = mon.step()
        scaler.step(opt)
        scaler.update()
        return rec

    recs = [step(i) for i in range(3)]
    before = recs[-1]
    assert not any(r.skipped for r in recs)
    bad = step(3, overflow=True)
    assert bad.skipped is True
    assert bad.loss_scale == 1024.0
    assert bad.raw.flag == gradnoise.stats.FLAG_NON_FINITE
    assert bad.smoothed.trace_cov == before.smoothed.trace_cov
    assert bad.smoothed.grad_sq_norm == before.smoothed.grad_sq_norm
    assert bad.b_simple_interval == before.b_simple_interval
    for n in before.smoothed.by_param:
        assert bad.smoothed.by_param[n].trace_cov == before.smoothed.by_param[n].trace_cov
    assert scaler.get_scale() < 1024.0  # the scaler saw the overflow too
    after = step(4)
    assert not after.skipped and after.loss_scale == scaler.get_scale()
    # the skipped step was not folded in: the EMA is that of the four good steps
    state = smoothing.init()
    for r in [*recs, after]:
        state = smoothing.update(state, r.raw.trace_cov, r.raw.grad_sq_norm, 0.8)
    assert after.smoothed.trace_cov == pytest.approx(smoothing.means(state, 0.8)[0], rel=1e-12)
    assert after.smoothed.grad_sq_norm == pytest.approx(smoothing.means(state, 0.8)[1], rel=1e-12)
    mon.close()


# --------------------------------------------------------------------- bf16 autocast
@pytest.mark.parametrize("source", ["per_sample", "microbatch"])
def test_bf16_autocast_close_to_float32(source):
    sizes = [8, 8]
    torch.manual_seed(16)
    base = nn.Sequential(nn.Linear(D_IN, 32), nn.Tanh(), nn.Linear(32, N_OUT)).train()
    with torch.no_grad():
        base[2].bias.copy_(torch.tensor([2.0, -1.0, -1.0]))  # a clear signal: |G|² ≫ noise/B
    g = torch.Generator().manual_seed(16)
    x = torch.randn(16, D_IN, generator=g)
    y = torch.randint(1, N_OUT, (16,), generator=g)
    recs = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        model = copy.deepcopy(base)
        mon = gradnoise.NoiseMonitor(model, source=source)
        for xb, yb in split(x, y, sizes):
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                out = model(xb)
            (F.cross_entropy(out.float(), yb) * (xb.shape[0] / 16)).backward()
        recs[name] = mon.step()
        mon.close()
    a, b = recs["bf16"].raw, recs["fp32"].raw
    assert a.ok and b.ok
    for f in ("trace_cov", "grad_sq_norm", "b_simple"):
        assert getattr(a, f) == pytest.approx(getattr(b, f), rel=5e-2), f


# --------------------------------------------------------------------- checkpoints
def _run_steps(model, opt, mon, steps, start=0):
    recs = []
    for i in range(start, start + steps):
        x, y = batch(8, 200 + i, signal=True)
        opt.zero_grad(set_to_none=True)
        accumulate(model, split(x, y, [3, 5]))
        recs.append(mon.step())
        opt.step()
    return recs


@pytest.mark.parametrize("source", ["per_sample", "microbatch"])
def test_state_dict_resumes_exactly(source, tmp_path):
    every, total, cut = 2, 9, 5
    m_a = mlp(17, signal=True)
    m_b = copy.deepcopy(m_a)
    opt_a = torch.optim.SGD(m_a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(m_b.parameters(), lr=0.1)
    mon_a = gradnoise.NoiseMonitor(m_a, source=source, every=every, beta=0.7)
    full = _run_steps(m_a, opt_a, mon_a, total)

    first = gradnoise.NoiseMonitor(m_b, source=source, every=every, beta=0.7)
    part1 = _run_steps(m_b, opt_b, first, cut)
    torch.save(first.state_dict(), tmp_path / "mon.pt")
    first.close()
    second = gradnoise.NoiseMonitor(m_b, source=source, every=1, beta=0.95)  # overwritten by the state
    second.load_state_dict(torch.load(tmp_path / "mon.pt", weights_only=True))
    assert second.step_index == cut
    part2 = _run_steps(m_b, opt_b, second, total - cut, start=cut)
    resumed = part1 + part2
    assert [r is None for r in resumed] == [i % every != 0 for i in range(total)]
    for a, b in zip(full, resumed):
        if a is None:
            assert b is None
            continue
        assert a.step == b.step
        for f in ("trace_cov", "grad_sq_norm", "b_simple"):
            assert close(getattr(b.smoothed, f), getattr(a.smoothed, f), 1e-12), f
        assert all(close(u, v, 1e-9) for u, v in zip(b.b_simple_interval, a.b_simple_interval))
        for n in a.smoothed.by_param:
            assert close(b.smoothed.by_param[n].trace_cov, a.smoothed.by_param[n].trace_cov, 1e-12), n
    assert math.isfinite(full[-1].smoothed.b_simple)
    mon_a.close()
    second.close()


def test_state_dict_survives_json():
    model = mlp(18)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = gradnoise.NoiseMonitor(model, source="per_sample")
    _run_steps(model, opt, mon, 3)
    state = json.loads(json.dumps(mon.state_dict()))
    other = gradnoise.NoiseMonitor(mlp(18), source="per_sample")
    other.load_state_dict(state)
    assert json.dumps(other.state_dict()) == json.dumps(mon.state_dict())
    mon.close()
    other.close()


def test_load_state_from_other_source_raises():
    model = mlp(19)
    mon = gradnoise.NoiseMonitor(model, source="per_sample")
    state = mon.state_dict()
    mon.close()
    other = gradnoise.NoiseMonitor(model, source="microbatch")
    with pytest.raises(GradNoiseError, match="per_sample"):
        other.load_state_dict(state)
    with pytest.raises(GradNoiseError):
        other.load_state_dict({**other.state_dict(), "version": 99})
    other.close()


# ----------------------------------------------------------------------- smoothing
def test_smoothed_is_debiased_ema_of_raw_and_layers_sum_to_total(tmp_path):
    beta, steps = 0.8, 6
    model = mlp(20, signal=True)
    path = tmp_path / "run.jsonl"
    mon = gradnoise.NoiseMonitor(model, source="per_sample", beta=beta, sinks=[gradnoise.JsonlSink(path)])
    recs = [r for r, _, _ in _train(model, mon, steps, lambda i: [5, 4], signal=True)]
    mon.close()
    T = [r.raw.trace_cov for r in recs]
    S = [r.raw.grad_sq_norm for r in recs]
    for n, rec in enumerate(recs, start=1):
        w = [(1 - beta) * beta ** (n - t) / (1 - beta**n) for t in range(1, n + 1)]
        t_bar = math.fsum(wi * v for wi, v in zip(w, T[:n]))
        s_bar = math.fsum(wi * v for wi, v in zip(w, S[:n]))
        assert rec.smoothed.trace_cov == pytest.approx(t_bar, rel=1e-12)
        assert rec.smoothed.grad_sq_norm == pytest.approx(s_bar, rel=1e-12)
        assert rec.smoothed.b_simple == pytest.approx(t_bar / s_bar, rel=1e-12)
        lo, hi = rec.b_simple_interval
        if n == 1:
            assert math.isnan(lo) and math.isnan(hi)
        else:
            assert lo <= rec.smoothed.b_simple <= hi
        # per-layer raw values add up to the totals
        for f in ("trace_cov", "grad_sq_norm", "mean_sq_norm", "group_sq_norm"):
            parts = math.fsum(getattr(s, f) for s in rec.raw.by_param.values())
            assert parts == pytest.approx(getattr(rec.raw, f), rel=1e-12, abs=1e-15)
        parts = math.fsum(s.trace_cov for s in rec.smoothed.by_param.values())
        assert parts == pytest.approx(rec.smoothed.trace_cov, rel=1e-12)

    head, lines = gradnoise.read_run(path)
    assert head["source"] == "per_sample" and head["beta"] == beta
    assert head["params"] == [n for n, _ in model.named_parameters()]
    assert [d["step"] for d in lines] == list(range(steps))
    for d, rec in zip(lines, recs):
        assert d["raw"]["trace_cov"] == pytest.approx(rec.raw.trace_cov, rel=1e-15)
        assert d["smoothed"]["b_simple"] == pytest.approx(rec.smoothed.b_simple, rel=1e-15)
        assert d["batch_size"] == 9 and d["n_groups"] == 9
        for n, s in rec.raw.by_param.items():
            assert d["by_param"][n]["raw"]["grad_sq_norm"] == pytest.approx(s.grad_sq_norm, rel=1e-15)


def test_smoothed_matches_stats_smoothing_module():
    """The monitor's EMA is gradnoise.stats.smoothing fed the raw values (total only)."""
    beta = 0.9
    model = mlp(21, signal=True)
    mon = gradnoise.NoiseMonitor(model, source="microbatch", beta=beta)
    recs = [r for r, _, _ in _train(model, mon, 5, lambda i: [2, 3, 3], signal=True)]
    state = smoothing.init()
    for r in recs:
        state = smoothing.update(state, r.raw.trace_cov, r.raw.grad_sq_norm, beta)
    assert recs[-1].b_simple_interval == pytest.approx(smoothing.ratio_interval(state, beta), rel=1e-12)
    mon.close()


def test_invalid_arguments():
    model = mlp(22)
    with pytest.raises(ValueError):
        gradnoise.NoiseMonitor(model, source="bogus")
    with pytest.raises(ValueError):
        gradnoise.NoiseMonitor(model, reduction="none")
    with pytest.raises(ValueError):
        gradnoise.NoiseMonitor(model, every=0)
    with pytest.raises(GradNoiseError):
        gradnoise.NoiseMonitor(model, source="ddp")
    assert tensor_hooks(model) == 0


# ------------------------------------------------ regressions (bugs found and fixed)
def _close_leaked_captures():
    """Test cleanup: close any capture left open on the torch-function mode stack."""
    while modes_active():
        mode = _mode_stack()[-1]
        cap = getattr(mode, "capture", None)
        if cap is None:
            break
        cap.__exit__(None, None, None)


def test_deepcopy_of_monitored_model_leaks_no_capture():
    """copy.deepcopy(model) copies the monitor's forward pre-hook; the copy's forward (an
    EMA or evaluation copy, say) must not open a capture (a global torch-function mode)
    that nothing closes and that later, unrelated backward() calls would go through."""
    model = mlp(30)
    mon = gradnoise.NoiseMonitor(model, source="per_sample")
    twin = copy.deepcopy(model)
    x, y = batch(4, 30)
    try:
        twin(x)
        assert modes_active() == 0
        other = mlp(31)
        ce_sum(other(x), y).backward()  # no monitor anywhere near this model
        # the monitor still measures its own model
        want = R.noise_stats(oracle_grads(model, x, y))
        F.cross_entropy(model(x), y).backward()
        assert_stats(mon.step().raw, want)
    finally:
        _close_leaked_captures()
        mon.close()
    assert modes_active() == 0


@pytest.mark.parametrize("source", ["per_sample", "microbatch"])
def test_failed_construction_leaves_no_hooks(source):
    """A sink that cannot be made makes the constructor raise with nothing left on the model."""
    model = mlp(32)
    with pytest.raises((TypeError, ValueError)):
        gradnoise.NoiseMonitor(model, source=source, sinks=["run.txt"])
    try:
        assert not model._forward_pre_hooks
        assert tensor_hooks(model) == 0
    finally:
        model._forward_pre_hooks.clear()


@pytest.mark.parametrize("source", ["per_sample", "microbatch"])
def test_sink_of_another_source_refused_before_hooks(source, tmp_path):
    """A run file of another source is refused (JsonlSink.open raises) and the file and
    the model are left as they were."""
    path = tmp_path / "run.jsonl"
    other = "microbatch" if source == "per_sample" else "per_sample"
    gradnoise.NoiseMonitor(mlp(33), source=other, sinks=[gradnoise.JsonlSink(path)]).close()
    before = path.read_bytes()
    model = mlp(33)
    with pytest.raises(ValueError, match="source"):
        gradnoise.NoiseMonitor(model, source=source, sinks=[gradnoise.JsonlSink(path)])
    assert path.read_bytes() == before
    assert not model._forward_pre_hooks and tensor_hooks(model) == 0
