"""WindowNoise against the float64 oracle (tests/reference.py): the window's per-sample
noise at the current parameters, for mean and sum losses, chunked or not."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reference as R
from gradnoise.monitor.window import WindowNoise, WindowStats

F64 = torch.float64
D_IN, HIDDEN, N_OUT = 5, 7, 3


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, N_OUT)).to(F64)


def data(n, seed):
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randn(n, D_IN, generator=g, dtype=F64), torch.randint(0, N_OUT, (n,), generator=g)


def sum_ce(out, y):
    return F.cross_entropy(out, y, reduction="sum")


class TwoInputs(nn.Module):
    """``model(x, z)``: two input tensors, both with the samples on dim 0."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(D_IN, N_OUT), nn.Linear(2, N_OUT, bias=False)

    def forward(self, x, z):
        return torch.tanh(self.a(x)) + self.b(z)


def assert_matches(w: WindowStats, ref: R.RefNoise, rel=1e-9):
    for k in ("trace_cov", "grad_sq_norm", "b_simple", "mean_sq_norm"):
        assert getattr(w, k) == pytest.approx(getattr(ref.total, k), rel=rel, abs=1e-12, nan_ok=True), k
    assert set(w.stats.by_param) == set(ref.by_param)
    for name, r in ref.by_param.items():
        mine = w.stats.by_param[name]
        for k in ("trace_cov", "grad_sq_norm"):
            assert getattr(mine, k) == pytest.approx(getattr(r, k), rel=rel, abs=1e-12), (name, k)
    assert sum(p.trace_cov for p in w.stats.by_param.values()) == pytest.approx(w.trace_cov, rel=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk", [None, 1, 3, 16])
def test_matches_the_oracle(reduction, chunk):
    model = mlp()
    loss = F.cross_entropy if reduction == "mean" else sum_ce
    meter = WindowNoise(model, loss, window=10, reduction=reduction, chunk=chunk, lr=0.1, batch_size=2)
    x, y = data(10, 0)
    for i in range(0, 10, 2):
        meter.push(x[i:i + 2], y[i:i + 2])
    w = meter.measure()
    assert w.n == 10 and w.pushed == 10 and w.ok
    ref = R.noise_stats(R.per_sample_grads(model, F.cross_entropy, x, y))
    assert_matches(w, ref)
    assert w.update_noise == pytest.approx(0.1 ** 2 * ref.total.trace_cov / 2, rel=1e-9)
    assert w.update_noise_at(0.3, 4) == pytest.approx(0.09 * ref.total.trace_cov / 4, rel=1e-9)
    assert w.noise_at(5) == pytest.approx(ref.total.trace_cov / 5, rel=1e-9)


def test_tuple_inputs():
    torch.manual_seed(1)
    model = TwoInputs().to(F64)
    g = torch.Generator().manual_seed(3)
    x, z = torch.randn(9, D_IN, generator=g, dtype=F64), torch.randn(9, 2, generator=g, dtype=F64)
    y = torch.randint(0, N_OUT, (9,), generator=g)
    meter = WindowNoise(model, F.cross_entropy, window=6, chunk=4)
    for i in range(0, 9, 3):
        meter.push((x[i:i + 3], z[i:i + 3]), y[i:i + 3])
    (wx, wz), wy = meter.samples()
    assert torch.equal(wx, x[3:]) and torch.equal(wz, z[3:]) and torch.equal(wy, y[3:])
    ref = R.noise_stats(R.per_sample_grads(model, F.cross_entropy, (x[3:], z[3:]), y[3:]))
    assert_matches(meter.measure(), ref)
    with pytest.raises(ValueError, match="same kind of inputs"):
        meter.push(x[:1], y[:1])


def test_window_evicts_the_oldest_samples_and_measures_at_the_current_weights():
    model = mlp()
    meter = WindowNoise(model, F.cross_entropy, window=5, every=3)
    x, y = data(12, 1)
    results = [meter.step(x[i:i + 1], y[i:i + 1]) for i in range(7)]
    assert [r is not None for r in results] == [False, False, True, False, False, True, False]
    assert len(meter) == 5 and meter.pushed == 7
    assert torch.equal(meter.samples()[0], x[2:7]) and torch.equal(meter.samples()[1], y[2:7])
    meter.push(x[7:12], y[7:12])  # a push as large as the window replaces it
    assert torch.equal(meter.samples()[0], x[7:12])
    meter.push(x[:8], y[:8])      # larger than the window: only its last samples stay
    assert torch.equal(meter.samples()[0], x[3:8]) and meter.pushed == 20
    with torch.no_grad():         # new weights: the same window, measured at them
        for p in model.parameters():
            p.add_(0.3)
    ref = R.noise_stats(R.per_sample_grads(model, F.cross_entropy, x[3:8], y[3:8]))
    assert_matches(meter.measure(), ref)
    assert meter.last.pushed == 20
    meter.clear()
    assert len(meter) == 0 and meter.pushed == 20


def test_grads_rng_and_mode_are_left_as_they_were():
    model = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Dropout(0.3), nn.Linear(HIDDEN, N_OUT)).to(F64)
    x, y = data(8, 2)
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad for p in model.parameters()]
    values = [g.clone() for g in grads]
    model[0].bias.grad = None     # one parameter without a gradient stays without
    meter = WindowNoise(model, F.cross_entropy, window=8)
    meter.push(x, y)
    state = torch.get_rng_state()
    w = meter.measure()
    assert w.ok or w.flag == "grad_sq_norm_nonpositive"
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training
    for p, g, v in zip(model.parameters(), grads, values):
        if p is model[0].bias:
            assert p.grad is None
        else:
            assert p.grad is g and torch.equal(p.grad, v)


def test_eval_mode_is_kept_and_no_grad_context_is_fine():
    model = mlp().eval()
    x, y = data(6, 3)
    meter = WindowNoise(model, F.cross_entropy, window=6)
    meter.push(x, y)
    with torch.no_grad():
        w = meter.measure()
    assert not model.training
    assert_matches(w, R.noise_stats(R.per_sample_grads(model, F.cross_entropy, x, y)))


def test_flags():
    model = mlp()
    x, y = data(4, 4)
    meter = WindowNoise(model, F.cross_entropy, window=1, lr=0.1)
    w = meter.measure()                       # empty
    assert w.n == 0 and w.flag == "single_group" and not w.ok and "fewer than two" in w.reason
    meter.push(x, y)
    w = meter.measure()                       # a window of one
    assert w.n == 1 and w.flag == "single_group" and math.isnan(w.trace_cov) and math.isnan(w.update_noise)
    bad = x.clone()
    bad[1, 0] = math.nan
    meter = WindowNoise(model, F.cross_entropy, window=4)
    meter.push(bad, y)
    w = meter.measure()
    assert w.flag == "non_finite" and math.isnan(w.trace_cov) and math.isnan(w.b_simple) and "NaN" in w.reason
    assert math.isnan(w.update_noise)        # no lr given
    # two samples at a symmetric point whose gradients are opposite
    sym = nn.Linear(D_IN, 2, bias=False).to(F64)
    nn.init.zeros_(sym.weight)
    meter = WindowNoise(sym, F.cross_entropy, window=2)
    xs = torch.ones(2, D_IN, dtype=F64)
    meter.push(xs, torch.tensor([0, 1]))     # the gradients cancel: ḡ = 0, |G|² estimate < 0
    w = meter.measure()
    assert w.flag == "grad_sq_norm_nonpositive" and w.grad_sq_norm < 0 and math.isnan(w.b_simple)
    assert w.trace_cov > 0


@pytest.mark.parametrize("kwargs", [dict(window=0), dict(window=2.5), dict(every=0), dict(batch_size=0),
                                    dict(reduction="max"), dict(chunk=0), dict(lr=0.0), dict(lr=-1.0),
                                    dict(lr=math.inf), dict(window=True)])
def test_bad_options_raise(kwargs):
    with pytest.raises(ValueError):
        WindowNoise(mlp(), F.cross_entropy, **kwargs)


def test_bad_pushes_and_measure_options_raise():
    meter = WindowNoise(mlp(), F.cross_entropy, window=4)
    x, y = data(4, 5)
    with pytest.raises(ValueError, match="disagree"):
        meter.push(x, y[:3])
    with pytest.raises(ValueError, match="dim 0"):
        meter.push(x, torch.tensor(1))
    with pytest.raises(ValueError, match="dim 0"):
        meter.push((), y)
    meter.push(x, y)
    with pytest.raises(ValueError, match="batch_size"):
        meter.measure(batch_size=0)
    with pytest.raises(ValueError, match="lr"):
        meter.measure(lr=-0.1)
    with pytest.raises(TypeError):
        WindowNoise("model", F.cross_entropy)


def test_unbiased_over_windows_of_one_distribution():
    """Over many windows of i.i.d. draws from a finite population, the mean of the
    estimates is the population's ``tr(Σ)`` and ``|G|²`` (oracle, divisor N: draws with
    replacement). 2000 windows of 8; tolerance 4 standard errors of the mean."""
    model = mlp(seed=7)
    with torch.no_grad():
        model[2].bias.copy_(torch.tensor([2.0, -1.0, -1.0], dtype=F64))
    xp, yp = data(40, 6)
    yp = yp.clamp(min=1)                     # class 0 never appears: a clear signal
    true_tr, true_g2 = R.population_stats(R.per_sample_grads(model, F.cross_entropy, xp, yp))
    gen = torch.Generator().manual_seed(11)
    meter = WindowNoise(model, F.cross_entropy, window=8)
    trs, g2s = [], []
    for _ in range(2000):
        idx = torch.randint(0, 40, (8,), generator=gen)
        meter.push(xp[idx], yp[idx])
        w = meter.measure()
        trs.append(w.trace_cov)
        g2s.append(w.grad_sq_norm)
    for vals, truth in ((torch.tensor(trs), true_tr), (torch.tensor(g2s), true_g2)):
        se = float(vals.std()) / math.sqrt(len(vals))
        assert abs(float(vals.mean()) - truth) < 4 * se, (float(vals.mean()), truth, se)
        assert se < 0.1 * abs(truth)          # the test has the power to see a 40 % bias
