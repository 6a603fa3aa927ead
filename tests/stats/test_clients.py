"""The within/between-client decomposition of ``gradnoise.stats.clients`` (DESIGN.md §1).

(1) Exactness against ``reference.client_population_stats``: a census (every client
    reports all its rows) is exact; and the expectation over *every* possible draw —
    subsets without replacement, ordered tuples with replacement — equals the truth.
(2) Unbiasedness over seeded Gaussian clients of unequal sizes, with power checks:
    the naive plug-in (no ``tr Σ_k/n_k`` corrections) lands outside the same bounds.
(3) Identities: ``B² = 1 + between/||∇f||²``, equal weights, IID clients, scaling.
(4) Bad input: a clear ValueError or a flagged NaN with its reason.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from gradnoise.stats.clients import (
    FLAG_CLIENT_TOO_SMALL,
    FLAG_NON_FINITE,
    FLAG_NONPOSITIVE,
    FLAG_SINGLE_CLIENT,
    client_moments,
    decompose,
)

import reference as R

Z = 3.0
KEYS = (("within", "within"), ("between", "between"), ("trace_cov_total", "total"),
        ("grad_sq_norm", "grad_sq_norm"), ("dissimilarity_sq", "dissimilarity_sq"))


def record(rows: torch.Tensor, population=None, **kw):
    """The client side: ``[n, D]`` per-sample gradients -> a record."""
    return client_moments(rows.pow(2).sum(), rows.mean(0), rows.shape[0], population, **kw)


def clients(sizes, D=5, seed=0, spread=1.0):
    """Finite clients with different means: a list of ``[N_k, D]`` float64 tensors."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(D, generator=g, dtype=torch.float64) * spread + 0.5
            + torch.randn(N, D, generator=g, dtype=torch.float64) * (1 + k) for k, N in enumerate(sizes)]


def assert_close(got, truth, what, rel=1e-10):
    assert math.isclose(got, truth, rel_tol=rel, abs_tol=1e-12), f"{what}: {got!r} vs {truth!r}"


# ------------------------------------------------------------------- (1) exactness
@pytest.mark.parametrize("weights", [None, [0.5, 0.2, 0.3]])
def test_census_is_exact(weights):
    data = clients([4, 7, 12])
    got = decompose([record(x, population=x.shape[0]) for x in data], weights)
    truth = R.client_population_stats(data, weights)
    assert got.ok
    for attr, key in KEYS:
        assert_close(getattr(got, attr), truth[key], attr)
    if weights is None:  # default N_k/N: the pooled data set's own population statistics
        tr, g2 = R.population_stats({"w": torch.cat(data)})
        assert_close(got.trace_cov_total, tr, "pooled tr Σ")
        assert_close(got.grad_sq_norm, g2, "pooled |G|²")


def _mean_over(draws, data, weights, population):
    """Mean of each estimate over every combination of per-client draws (index tuples)."""
    sums = dict.fromkeys([a for a, _ in KEYS[:4]] + ["naive_between", "naive_g2"], 0.0)
    count = 0
    for combo in itertools.product(*draws):
        recs = [record(x[list(ix)], x.shape[0] if population else None) for x, ix in zip(data, combo)]
        res = decompose(recs, weights)
        for a, _ in KEYS[:4]:
            sums[a] += getattr(res, a)
        sums["naive_between"] += math.fsum(w * r.mean_sq_norm for w, r in zip(weights, recs)) - res.aggregate_sq_norm
        sums["naive_g2"] += res.aggregate_sq_norm
        count += 1
    return {k: v / count for k, v in sums.items()}


def _check_expectation(mean, truth):
    for attr, key in KEYS[:4]:
        assert_close(mean[attr], truth[key], f"E[{attr}]", rel=1e-9)
    assert abs(mean["naive_between"] - truth["between"]) > 0.05 * truth["between"]
    assert abs(mean["naive_g2"] - truth["grad_sq_norm"]) > 0.05 * truth["grad_sq_norm"]


def test_expectation_over_every_draw_without_replacement():
    data, n = clients([4, 5, 3], D=3, seed=1), [2, 3, 2]
    w = [x.shape[0] / 12 for x in data]
    draws = [list(itertools.combinations(range(x.shape[0]), m)) for x, m in zip(data, n)]
    mean = _mean_over(draws, data, w, population=True)
    _check_expectation(mean, R.client_population_stats(data, w))


def test_expectation_over_every_draw_with_replacement():
    data, n = clients([3, 3, 2], D=3, seed=2), [2, 3, 2]
    w = [0.2, 0.5, 0.3]
    draws = [list(itertools.product(range(x.shape[0]), repeat=m)) for x, m in zip(data, n)]
    mean = _mean_over(draws, data, w, population=False)
    _check_expectation(mean, R.client_population_stats(data, w))


# ---------------------------------------------------------------- (2) unbiasedness
def gaussian_clients(n, D=4, seed=0, same=False):
    """Client k: ``g = μ_k + L_k z``. Returns ``(mus, Ls)``."""
    rng = np.random.default_rng(seed)
    mus = [rng.normal(size=D) * (0 if same else 0.7) + 0.3 for _ in n]
    Ls = [rng.normal(size=(D, D)) / math.sqrt(D) * (1 if same else 1 + 0.5 * k) for k, _ in enumerate(n)]
    if same:
        mus, Ls = [mus[0]] * len(n), [Ls[0]] * len(n)
    return mus, Ls


def truth_of(mus, Ls, w):
    F = sum(wk * m for wk, m in zip(w, mus))
    within = sum(wk * float((L**2).sum()) for wk, L in zip(w, Ls))
    between = sum(wk * float((m - F) @ (m - F)) for wk, m in zip(w, mus))
    return {"within": within, "between": between, "grad_sq_norm": float(F @ F), "trace_cov_total": within + between}


def simulate(n, mus, Ls, M, seed, weights=None):
    rng = np.random.default_rng(seed)
    draws = [mu + rng.normal(size=(M, m, mu.size)) @ L.T for m, mu, L in zip(n, mus, Ls)]
    out = []
    for rep in range(M):
        recs = [record(torch.from_numpy(d[rep])) for d in draws]
        out.append((decompose(recs, weights), recs))
    return out


def mean_se(values):
    a = np.asarray(values, dtype=np.float64)
    return a.mean(), a.std(ddof=1) / math.sqrt(a.size)


@pytest.mark.parametrize("weights", [None, [0.25] * 4])
def test_unbiased_for_gaussian_clients_of_unequal_sizes(weights):
    n = [2, 3, 6, 15]
    mus, Ls = gaussian_clients(n)
    w = [m / sum(n) for m in n] if weights is None else weights
    truth = truth_of(mus, Ls, w)
    runs = simulate(n, mus, Ls, M=3000, seed=7, weights=weights)
    se = {}
    for attr, t in truth.items():
        m, se[attr] = mean_se([getattr(r, attr) for r, _ in runs])
        assert abs(m - t) < Z * se[attr], f"{attr}: mean {m:.5g} vs truth {t:.5g} (SE {se[attr]:.3g})"
    naive_g2 = [r.aggregate_sq_norm for r, _ in runs]
    naive_between = [math.fsum(wk * c.mean_sq_norm for wk, c in zip(w, recs)) - r.aggregate_sq_norm
                     for r, recs in runs]
    for vals, attr in ((naive_g2, "grad_sq_norm"), (naive_between, "between")):
        assert abs(np.mean(vals) - truth[attr]) > Z * se[attr], f"the test cannot tell naive {attr} from the truth"


def test_iid_clients_have_no_between_part():
    n = [3, 5, 8]
    mus, Ls = gaussian_clients(n, seed=3, same=True)
    runs = simulate(n, mus, Ls, M=2000, seed=4)
    m, se = mean_se([r.between for r, _ in runs])
    assert abs(m) < Z * se
    m_naive, _ = mean_se([math.fsum(wk * c.mean_sq_norm for wk, c in zip(r.weights, recs)) - r.aggregate_sq_norm
                          for r, recs in runs])
    assert m_naive > Z * se  # the uncorrected plug-in sees heterogeneity that is not there


# ------------------------------------------------------------------ (3) identities
def test_dissimilarity_identity_and_aggregate_path():
    data = clients([5, 9, 4, 6], seed=5, spread=0.3)
    recs = [record(x) for x in data]
    res = decompose(recs)
    assert res.ok and res.dissimilarity_sq > 1
    assert_close(res.dissimilarity_sq, 1 + res.between / res.grad_sq_norm, "B² identity", rel=1e-12)
    assert_close(res.trace_cov_total, res.within + res.between, "total")
    light = [record(x, keep_mean_grad=False) for x in data]
    assert all(r.mean_grad is None for r in light)
    again = decompose(light, aggregate_sq_norm=res.aggregate_sq_norm)
    assert again == res


def test_equal_sizes_default_to_equal_weights_and_census_of_identical_clients():
    data = clients([6, 6, 6], seed=6)
    recs = [record(x) for x in data]
    assert decompose(recs) == decompose(recs, weights=[1 / 3] * 3)
    same = [data[0]] * 3
    res = decompose([record(x, population=6) for x in same])
    assert abs(res.between) < 1e-12 and abs(res.dissimilarity_sq - 1) < 1e-12


def test_scaling_and_permutation():
    data = clients([3, 8, 5], seed=8)
    base = decompose([record(x) for x in data])
    scaled = decompose([record(3.0 * x) for x in data])
    for attr in ("within", "between", "grad_sq_norm"):
        assert_close(getattr(scaled, attr), 9 * getattr(base, attr), attr)
    assert_close(scaled.dissimilarity_sq, base.dissimilarity_sq, "B²")
    perm = decompose([record(x) for x in data[::-1]])
    for attr, _ in KEYS:
        assert_close(getattr(perm, attr), getattr(base, attr), attr, rel=1e-12)


# ------------------------------------------------------------------- (4) bad input
def test_flags():
    data = clients([4, 5], seed=9)
    one = decompose([record(data[0])])
    assert one.flag == FLAG_SINGLE_CLIENT and math.isnan(one.between) and one.reason
    assert math.isfinite(one.within) and math.isfinite(one.grad_sq_norm)
    tiny = decompose([record(data[0]), record(data[1][:1])])
    assert tiny.flag == FLAG_CLIENT_TOO_SMALL and "[1]" in tiny.reason and math.isnan(tiny.within)
    census_of_one = decompose([record(data[0], population=4), record(data[1][:1], population=1)])
    assert census_of_one.ok and census_of_one.client_trace_cov[1] == 0.0
    bad = data[1].clone()
    bad[0, 0] = math.nan
    nan = decompose([record(data[0]), record(bad)])
    assert nan.flag == FLAG_NON_FINITE and math.isnan(nan.between) and math.isnan(nan.dissimilarity_sq)
    noisy = decompose([record(x - x.mean(0)) for x in data])  # ∇F_k = 0 exactly in the sample
    assert noisy.flag == FLAG_NONPOSITIVE and math.isnan(noisy.dissimilarity_sq)
    assert math.isfinite(noisy.between) and noisy.reason


@pytest.mark.parametrize("call, match", [
    (lambda d: decompose([]), "at least one"),
    (lambda d: decompose([record(d[0]), record(d[1][:, :3])]), "shape"),
    (lambda d: decompose([record(d[0]), record(d[1])], weights=[0.5, 0.6]), "summing to 1"),
    (lambda d: decompose([record(d[0]), record(d[1])], weights=[1.0]), "summing to 1"),
    (lambda d: decompose([record(d[0], population=4), record(d[1])]), "population"),
    (lambda d: decompose([record(d[0], keep_mean_grad=False), record(d[1])]), "aggregate_sq_norm"),
    (lambda d: record(d[0], population=3), "population"),
    (lambda d: client_moments(d[0].pow(2).sum(1).mean(), d[0].mean(0), 4), "sum"),
    (lambda d: client_moments(1.0, torch.zeros(3), 0), "positive integer"),
    (lambda d: client_moments(1.0, torch.zeros(3, dtype=torch.long), 2), "floating"),
])
def test_bad_input_raises_one_line(call, match):
    with pytest.raises(ValueError, match=match) as err:
        call(clients([4, 5], seed=10))
    assert "\n" not in str(err.value)
