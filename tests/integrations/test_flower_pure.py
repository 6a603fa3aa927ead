"""The Flower integration's framework-free half, run without ``flwr``: the client's
measurement (against tests/reference.py in float64), the metrics format, the server's
decomposition of metric dicts (equal to ``stats.clients.decompose`` and the population
oracle), the legacy ``fit_metrics_aggregation_fn``, and the flags for missing or corrupt
metrics."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reference as ref
from gradnoise.integrations import flower as gf
from gradnoise.stats.clients import client_moments, decompose

SIZES = (5, 7, 11)
KEYS = (("within", "within"), ("between", "between"), ("trace_cov_total", "total"),
        ("grad_sq_norm", "grad_sq_norm"), ("dissimilarity_sq", "dissimilarity_sq"))


def mse(out, y):
    return F.mse_loss(out, y)


def make_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()


def data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 4, generator=g, dtype=torch.float64) + k,
             torch.randn(n, 2, generator=g, dtype=torch.float64) + 2 * k - 1) for k, n in enumerate(SIZES)]


def rows_of(net, x, y):
    grads = ref.per_sample_grads(net, mse, x, y)
    return torch.cat([g.flatten(1) for g in grads.values()], 1)


def client_side(census=True):
    """What three clients send: metrics dicts and ``{param: ḡ_k}``."""
    net, metrics, grads = make_net(), [], []
    for x, y in data():
        m = gf.measure_client(net, mse, x, y, population=len(x) if census else None)
        metrics.append({**gf.moments_to_metrics(m), "num-examples": len(x)})
        _, _, named = gf._measure(net, mse, x, y, "mean")
        grads.append({k: v.numpy() for k, v in named.items()})
    return net, metrics, grads


def test_the_pure_half_runs_with_flower_blocked(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "flwr", None)  # `import flwr` now raises ImportError
    _, metrics, grads = client_side()
    assert gf.decompose_metrics(metrics, SIZES, grads).ok
    with pytest.raises(ImportError, match=r"pip install gradnoise\[flower\]"):
        gf.aggregate_train_metrics([], "num-examples")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_measure_client_matches_brute_force_and_keeps_grads(reduction):
    net = make_net()
    x, y = data()[2]
    sentinel = [torch.full_like(p, 3.0) for p in net.parameters()]
    for p, s in zip(net.parameters(), sentinel):
        p.grad = s
    loss = mse if reduction == "mean" else (lambda out, t: F.mse_loss(out, t, reduction="none").mean(1).sum())
    m = gf.measure_client(net, loss, x, y, reduction=reduction, population=11)
    rows = rows_of(net, x, y)
    assert m.n == 11 and m.population == 11
    assert m.sq_norm_sum == pytest.approx(float(rows.pow(2).sum()), rel=1e-10)
    assert m.mean_sq_norm == pytest.approx(float(rows.mean(0).pow(2).sum()), rel=1e-10)
    assert torch.allclose(m.mean_grad, rows.mean(0), rtol=1e-10, atol=1e-14)
    assert all(p.grad is s for p, s in zip(net.parameters(), sentinel))


def test_metrics_round_trip():
    m = client_moments(10.0, torch.tensor([1.0, 0.5]), 4, population=9, keep_mean_grad=False)
    d = gf.moments_to_metrics(m)
    assert d == {"gradnoise.n": 4, "gradnoise.sum_sq": 10.0, "gradnoise.mean_sq": 1.25, "gradnoise.population": 9}
    assert gf.moments_from_metrics(d) == m


@pytest.mark.parametrize("census", [True, False])
def test_decompose_metrics_equals_decompose_and_the_oracle(census):
    net, metrics, grads = client_side(census)
    noise = gf.decompose_metrics(metrics, [m["num-examples"] for m in metrics], grads)
    rows = [rows_of(net, x, y) for x, y in data()]
    direct = decompose([client_moments(r.pow(2).sum(), r.mean(0), len(r), len(r) if census else None) for r in rows])
    truth = ref.client_population_stats(rows)
    assert noise.ok and noise.dissimilarity_sq > 1.5
    for attr, key in KEYS:
        assert getattr(noise, attr) == pytest.approx(getattr(direct, attr), rel=1e-10), attr
        if census:
            assert getattr(noise, attr) == pytest.approx(truth[key], rel=1e-10), attr
    # U given instead of the vectors: the same numbers
    U = float(sum(w * r.mean(0) for w, r in zip(noise.weights, rows)).pow(2).sum())
    by_u = gf.decompose_metrics(metrics, [m["num-examples"] for m in metrics], aggregate_sq_norm=U)
    assert by_u.between == pytest.approx(noise.between, rel=1e-10)
    out = gf.noise_metrics(noise)
    assert out["gradnoise.ok"] == 1 and out["gradnoise.clients"] == 3
    assert out["gradnoise.between"] == noise.between


def test_scalars_only_give_within_and_flag_no_aggregate():
    net, metrics, _ = client_side()
    truth = ref.client_population_stats([rows_of(net, x, y) for x, y in data()])
    with pytest.warns(RuntimeWarning, match="no_aggregate"):
        out = gf.aggregate_fit_metrics([(m["num-examples"], m) for m in metrics])
    assert out["gradnoise.within"] == pytest.approx(truth["within"], rel=1e-10)
    assert math.isnan(out["gradnoise.between"]) and out["gradnoise.ok"] == 0


def _corrupt(metrics, k, **changes):
    bad = [dict(m) for m in metrics]
    bad[k].update(changes)
    return bad


@pytest.mark.parametrize("changes,match", [
    ({"gradnoise.n": 0}, "positive integer"),
    ({"gradnoise.n": 2.5}, "positive integer"),
    ({"gradnoise.n": True}, "not a number"),
    ({"gradnoise.sum_sq": "big"}, "not a number"),
    ({"gradnoise.sum_sq": 1e-9}, "< n"),
    ({"gradnoise.mean_sq": -1.0}, "negative"),
    ({"gradnoise.population": 2}, "population"),
])
def test_corrupt_metrics_flag_the_round(changes, match):
    _, metrics, grads = client_side()
    bad = _corrupt(metrics, 1, **changes)
    noise = gf.decompose_metrics(bad, SIZES, None, aggregate_sq_norm=1.0, names=["a", "b", "c"])
    assert noise.flag == gf.FLAG_CORRUPT and "b:" in noise.reason and match in noise.reason
    assert all(math.isnan(getattr(noise, a)) for a, _ in KEYS)


def test_vectors_that_disagree_with_the_scalars_or_each_other_are_corrupt():
    _, metrics, grads = client_side()
    scaled = [dict(g) for g in grads]
    scaled[0] = {k: 2 * v for k, v in grads[0].items()}
    assert gf.decompose_metrics(metrics, SIZES, scaled).flag == gf.FLAG_CORRUPT
    fewer = [dict(g) for g in grads]
    fewer[2].pop(next(iter(fewer[2])))
    noise = gf.decompose_metrics(metrics, SIZES, fewer)
    assert noise.flag == gf.FLAG_CORRUPT and "differ" in noise.reason
    partly = [grads[0], None, grads[2]]
    noise = gf.decompose_metrics(metrics, SIZES, partly)
    assert noise.flag == gf.FLAG_NO_AGGREGATE and "client 1" in noise.reason


@pytest.mark.parametrize("weights", [(5, 7), (5, math.nan, 11), (5, -7, 11), (0, 0, 0), ("5", 7, 11)])
def test_bad_weights_are_corrupt(weights):
    _, metrics, grads = client_side()
    assert gf.decompose_metrics(metrics, weights, grads).flag == gf.FLAG_CORRUPT


def test_missing_metrics_flag_the_round():
    _, metrics, grads = client_side()
    noise = gf.decompose_metrics([metrics[0], {"num-examples": 7}, None], SIZES, names=["a", "b", "c"])
    assert noise.flag == gf.FLAG_MISSING and "b, c" in noise.reason and math.isnan(noise.within)
    assert gf.decompose_metrics([], []).flag == gf.FLAG_MISSING


def test_non_finite_moments_are_flagged_by_decompose():
    _, metrics, grads = client_side()
    noise = gf.decompose_metrics(_corrupt(metrics, 0, **{"gradnoise.sum_sq": math.inf}), SIZES, aggregate_sq_norm=1.0)
    assert noise.flag == "non_finite"


class FakeArray:
    def __init__(self, t):
        self.t = t

    def numpy(self):
        return self.t.numpy()


def test_fedsgd_sq_norm_is_the_update_over_the_rate():
    one, zero = torch.ones(3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    prev = {"a": FakeArray(one), "b": FakeArray(zero)}
    new = {"a": FakeArray(one - 0.1 * torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)), "b": FakeArray(zero)}
    assert gf.fedsgd_sq_norm(0.1)(prev, new) == pytest.approx(9.0, rel=1e-12)
    assert gf.fedsgd_sq_norm(0.1, keys=["b"])(prev, new) == 0.0
    with pytest.raises(ValueError):
        gf.fedsgd_sq_norm(0.0)
