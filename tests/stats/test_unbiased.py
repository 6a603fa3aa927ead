"""Unbiasedness of the estimators of DESIGN.md §1 over many seeded batches.

(a) Pure statistics: Gaussian per-sample gradients with known ``G`` and ``Σ`` through
    ``from_per_sample`` and ``from_groups``; a finite population drawn without
    replacement (random batches, and every possible batch enumerated exactly).
(b) Through the engine: a small model on a fixed data set, exact ``G`` and ``tr(Σ)``
    from the oracle, many i.i.d. batches through ``gradnoise.capture``.

Each simulated check also asserts that a plausible wrong estimator (the naive ``||ḡ||²``
for ``|G|²``, a ``1/B`` instead of ``1/(B−1)``, no finite-population correction) falls
outside the same bounds, so the check has the power to fail.
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradnoise.stats import finite_population_factor, from_groups, from_per_sample

import reference as R

Z = 3.0  # accepted distance from the truth, in standard errors


def assert_unbiased(samples: Sequence[float], truth: float, what: str) -> float:
    """Asserts ``|mean − truth| < Z·SE``; returns the standard error."""
    a = np.asarray(samples, dtype=np.float64)
    se = a.std(ddof=1) / math.sqrt(len(a))
    assert abs(a.mean() - truth) < Z * se, f"{what}: mean {a.mean():.6g} vs truth {truth:.6g} (SE {se:.3g})"
    return se


def assert_biased(samples: Sequence[float], truth: float, se: float, what: str) -> None:
    """The power check: a wrong estimator's mean is more than ``Z·SE`` from the truth."""
    mean = float(np.mean(samples))
    assert abs(mean - truth) > Z * se, f"the test cannot tell {what} from the truth ({mean:.6g} vs {truth:.6g})"


def gaussian_problem(D: int = 6, seed: int = 0):
    """``g = G + L z`` with ``z ~ N(0, I)``: returns ``(G, L, tr(Σ) = ||L||_F², |G|²)``."""
    rng = np.random.default_rng(seed)
    G = rng.normal(size=D) * 0.5
    L = rng.normal(size=(D, D)) / math.sqrt(D)
    return G, L, float((L**2).sum()), float(G @ G)


# ---------------------------------------------------------------------- (a) pure stats
def test_from_per_sample_is_unbiased_for_gaussian_gradients():
    G, L, tr, g2 = gaussian_problem()
    M, B = 4000, 8
    rng = np.random.default_rng(1)
    g = G + rng.normal(size=(M, B, G.size)) @ L.T  # [M, B, D]
    stats = [from_per_sample((gb**2).sum(1), float((gb.mean(0) ** 2).sum())) for gb in g]
    se_tr = assert_unbiased([s.trace_cov for s in stats], tr, "trace_cov")
    se_g2 = assert_unbiased([s.grad_sq_norm for s in stats], g2, "grad_sq_norm")
    assert all(s.batch_size == B and s.n_groups == B for s in stats)
    assert_biased([s.mean_sq_norm for s in stats], g2, se_g2, "||ḡ||²")
    assert_biased([s.trace_cov * (B - 1) / B for s in stats], tr, se_tr, "a 1/B variance")


def test_from_groups_is_unbiased_with_unequal_groups():
    G, L, tr, g2 = gaussian_problem(seed=2)
    sizes = [1, 2, 3, 5, 5]
    B, M = sum(sizes), 4000
    rng = np.random.default_rng(3)
    g = G + rng.normal(size=(M, B, G.size)) @ L.T
    bounds = np.cumsum([0] + sizes)
    stats = []
    for gb in g:
        stats.append(from_groups(_group_norms(gb, bounds), sizes, float((gb.mean(0) ** 2).sum())))
    se_tr = assert_unbiased([s.trace_cov for s in stats], tr, "trace_cov")
    se_g2 = assert_unbiased([s.grad_sq_norm for s in stats], g2, "grad_sq_norm")
    assert all(s.batch_size == B and s.n_groups == len(sizes) for s in stats)
    assert_biased([s.mean_sq_norm for s in stats], g2, se_g2, "||ḡ||²")
    # Weighting the groups equally instead of by b_j/B is a plausible mistake.
    equal = [from_groups(_group_norms(gb, bounds), [1] * len(sizes),
                         float((gb.mean(0) ** 2).sum())) for gb in g[:2000]]
    assert_biased([s.trace_cov for s in equal], tr, se_tr, "equal group weights")


def _group_norms(gb: np.ndarray, bounds: np.ndarray):
    """``||g⁽ʲ⁾||²`` of the group means of ``gb [B, D]`` split at ``bounds``."""
    return [float(gb[s:e].mean(0) @ gb[s:e].mean(0)) for s, e in zip(bounds[:-1], bounds[1:])]


def _finite_set(N: int, D: int = 3, seed: int = 4):
    """A fixed set of ``N`` gradients; exact ``tr(Σ) = mean ||g_i − G||²`` and ``|G|²``."""
    g = np.random.default_rng(seed).normal(size=(N, D)) + 0.4
    G = g.mean(0)
    return g, float(((g - G) ** 2).sum(1).mean()), float(G @ G)


def test_finite_population_is_unbiased_without_replacement():
    N, B, M = 12, 5, 4000
    g, tr, g2 = _finite_set(N)
    rng = np.random.default_rng(5)
    corrected, iid = [], []
    for _ in range(M):
        gb = g[rng.choice(N, size=B, replace=False)]
        norms, C = (gb**2).sum(1), float((gb.mean(0) ** 2).sum())
        corrected.append(from_per_sample(norms, C, population=N))
        iid.append(from_per_sample(norms, C))
    assert all(s.population == N for s in corrected)
    se_tr = assert_unbiased([s.trace_cov for s in corrected], tr, "trace_cov")
    se_g2 = assert_unbiased([s.grad_sq_norm for s in corrected], g2, "grad_sq_norm")
    assert_biased([s.grad_sq_norm for s in iid], g2, se_g2, "no finite-population correction")
    assert_biased([s.trace_cov for s in iid], tr, se_tr, "no finite-population correction")


def test_finite_population_exact_over_every_batch():
    """Averaged over all C(N, B) batches the corrected estimates equal the population
    values exactly, and the noise of the batch mean is ``tr(Σ)/B · (N − B)/(N − 1)``."""
    N, B = 10, 4
    g, tr, g2 = _finite_set(N, seed=6)
    G = g.mean(0)
    tcs, g2s, iid_tcs, errs = [], [], [], []
    for idx in itertools.combinations(range(N), B):
        gb = g[list(idx)]
        norms, C = (gb**2).sum(1), float((gb.mean(0) ** 2).sum())
        s = from_per_sample(norms, C, population=N)
        tcs.append(s.trace_cov)
        g2s.append(s.grad_sq_norm)
        iid_tcs.append(from_per_sample(norms, C).trace_cov)
        errs.append(float(((gb.mean(0) - G) ** 2).sum()))
    assert np.mean(tcs) == pytest.approx(tr, rel=1e-10)
    assert np.mean(g2s) == pytest.approx(g2, rel=1e-10)
    assert np.mean(iid_tcs) == pytest.approx(tr * N / (N - 1), rel=1e-10)  # S², not tr(Σ)
    assert np.mean(errs) == pytest.approx(tr / B * finite_population_factor(B, N), rel=1e-10)
    assert finite_population_factor(B, None) == 1.0


def test_finite_population_groups_exact_over_every_ordered_draw():
    """Batches of ``B`` drawn without replacement, split in draw order into groups
    ``[1, 3]``: over every ordered draw the corrected group estimator is exact."""
    N, sizes = 7, [1, 3]
    g, tr, g2 = _finite_set(N, seed=7)
    B = sum(sizes)
    tcs, g2s = [], []
    for idx in itertools.permutations(range(N), B):
        gb = g[list(idx)]
        norms = [float(gb[:1].mean(0) @ gb[:1].mean(0)), float(gb[1:].mean(0) @ gb[1:].mean(0))]
        s = from_groups(norms, sizes, float((gb.mean(0) ** 2).sum()), population=N)
        tcs.append(s.trace_cov)
        g2s.append(s.grad_sq_norm)
    assert np.mean(tcs) == pytest.approx(tr, rel=1e-10)
    assert np.mean(g2s) == pytest.approx(g2, rel=1e-10)


# ----------------------------------------------------------------- (b) through the engine
N_DATA, BATCH, N_BATCHES = 256, 16, 400


def digits_problem():
    """256 digits (features scaled to [0, 1]) and a fixed, seeded float64 MLP."""
    from sklearn.datasets import load_digits

    data = load_digits()
    X = torch.tensor(data.data[:N_DATA] / 16.0, dtype=torch.float64)
    y = torch.tensor(data.target[:N_DATA], dtype=torch.long)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()
    return model, X, y


def test_oracle_population_values_on_digits():
    """The truth used below, recomputed a second way: ``G`` from one full-batch autograd
    call, ``tr(Σ) = mean ||g_i||² − |G|²``."""
    model, X, y = digits_problem()
    tr, g2 = R.population_stats(R.per_sample_grads(model, F.cross_entropy, X, y))
    F.cross_entropy(model(X), y).backward()
    full = sum(float(p.grad.pow(2).sum()) for p in model.parameters())
    assert g2 == pytest.approx(full, rel=1e-10)
    mean_sq = float(sum(v.sum() for v in R.per_sample_sq_norms(model, F.cross_entropy, X, y).values())) / N_DATA
    assert tr == pytest.approx(mean_sq - full, rel=1e-9)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_capture_is_unbiased_on_digits(reduction):
    import gradnoise

    model, X, y = digits_problem()
    tr, g2 = R.population_stats(R.per_sample_grads(model, F.cross_entropy, X, y))
    gen = torch.Generator().manual_seed(1)
    tcs, g2s, naive = [], [], []
    for _ in range(N_BATCHES):
        idx = torch.randint(0, N_DATA, (BATCH,), generator=gen)  # i.i.d., with replacement
        model.zero_grad(set_to_none=True)
        with gradnoise.capture(model, reduction=reduction) as cap:
            loss = F.cross_entropy(model(X[idx]), y[idx], reduction=reduction)
            loss.backward()
        s = cap.stats()
        assert s.batch_size == BATCH
        tcs.append(s.trace_cov)
        g2s.append(s.grad_sq_norm)
        naive.append(s.mean_sq_norm)
    assert_unbiased(tcs, tr, "trace_cov")
    se_g2 = assert_unbiased(g2s, g2, "grad_sq_norm")
    assert_biased(naive, g2, se_g2, "||ḡ||²")
