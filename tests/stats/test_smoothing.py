"""gradnoise.stats.smoothing: debiased EMAs, their (co)variances and Fieller's interval
for ``b_simple = E[T]/E[S]``, checked against brute-force weights, numpy's weighted
covariance and a seeded coverage simulation."""
from __future__ import annotations

import math

import numpy as np
import pytest

from gradnoise.stats import from_per_sample, smoothing

BETAS = [0.0, 0.3, 0.5, 0.9, 0.95, 0.999]


def fold(ts, ss, beta):
    state = smoothing.init()
    for t, s in zip(ts, ss):
        state = smoothing.update(state, float(t), float(s), beta)
    return state


def weights(n, beta):
    """Debiased EMA weights ``w_t = (1 − β) β^{n−t} / (1 − β^n)``, t = 1..n (oldest first)."""
    if beta == 0.0:
        w = np.zeros(n)
        w[-1] = 1.0
        return w
    t = np.arange(1, n + 1)
    return (1 - beta) * beta ** (n - t) / (1 - beta**n)


def fieller(mt, ms, vt, vs, c, z=smoothing.Z95):
    """Fieller's set written out, as the hull of its part with ρ ≥ 0: scan a fine grid of
    ρ ≥ 0 for ``(T̄ − ρS̄)² ≤ z²(v_T − 2ρc + ρ²v_S)`` (bounded case: the exact roots)."""
    a = ms * ms - z * z * vs
    b = mt * ms - z * z * c
    cc = mt * mt - z * z * vt
    disc = b * b - a * cc
    if a > 0 and disc >= 0:
        r = math.sqrt(disc)
        return max((b - r) / a, 0.0), max((b + r) / a, 0.0)
    rho = np.concatenate([[0.0], np.logspace(-6, 8, 200001)])
    inside = (mt - rho * ms) ** 2 <= z * z * (vt - 2 * rho * c + rho * rho * vs)
    assert inside[-1], "an unbounded Fieller set holds every large ρ"
    return float(rho[np.argmax(inside)]), math.inf


# ------------------------------------------------------------------------ the EMA
@pytest.mark.parametrize("beta", BETAS)
def test_constant_input_is_returned_after_one_step(beta):
    state = smoothing.update(smoothing.init(), 3.25, -0.5, beta)
    t, s = smoothing.means(state, beta)
    assert t == pytest.approx(3.25, rel=1e-14) and s == pytest.approx(-0.5, rel=1e-14)
    for _ in range(20):
        state = smoothing.update(state, 3.25, -0.5, beta)
    t, s = smoothing.means(state, beta)
    assert t == pytest.approx(3.25, rel=1e-12) and s == pytest.approx(-0.5, rel=1e-12)


@pytest.mark.parametrize("beta", BETAS)
def test_means_are_weighted_sums(beta):
    rng = np.random.default_rng(1)
    ts, ss = rng.normal(5, 2, 17), rng.normal(1, 0.3, 17)
    for n in (1, 2, 7, 17):
        mt, ms = smoothing.means(fold(ts[:n], ss[:n], beta), beta)
        w = weights(n, beta)
        assert w.sum() == pytest.approx(1.0, rel=1e-12)
        assert mt == pytest.approx(float(w @ ts[:n]), rel=1e-12)
        assert ms == pytest.approx(float(w @ ss[:n]), rel=1e-12)


def test_empty_state_and_bad_beta():
    assert all(math.isnan(v) for v in smoothing.means(smoothing.init(), 0.9))
    assert math.isnan(smoothing.sum_sq_weights(0, 0.9))
    for beta in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError):
            smoothing.update(smoothing.init(), 1.0, 1.0, beta)


def test_state_is_immutable():
    s0 = smoothing.init()
    s1 = smoothing.update(s0, 1.0, 2.0, 0.9)
    assert s0 == smoothing.EmaState() and s1.count == 1 and s1 is not s0


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("n", [1, 2, 3, 10, 60, 500])
def test_sum_sq_weights_brute_force(beta, n):
    want = float(np.sum(weights(n, beta) ** 2))
    assert smoothing.sum_sq_weights(n, beta) == pytest.approx(want, rel=1e-10)


# ----------------------------------------------------------------- (co)variances
@pytest.mark.parametrize("beta", [0.5, 0.9, 0.97])
@pytest.mark.parametrize("n", [2, 5, 40])
def test_covariance_against_numpy_weighted_formulas(beta, n):
    rng = np.random.default_rng(n)
    ts = rng.normal(10, 3, n)
    ss = 0.4 * ts + rng.normal(2, 1, n)  # correlated with T
    vt, vs, c = smoothing.covariance(fold(ts, ss, beta), beta)
    w = weights(n, beta)
    w2 = float(np.sum(w**2))
    # unbiased weighted covariance of one step (reliability weights), then of the mean
    cov = np.cov(np.vstack([ts, ss]), aweights=w, ddof=1) * w2
    assert vt == pytest.approx(cov[0, 0], rel=1e-8)
    assert vs == pytest.approx(cov[1, 1], rel=1e-8)
    assert c == pytest.approx(cov[0, 1], rel=1e-8)
    # the same, written out
    mt = w @ ts
    assert vt == pytest.approx(float(w @ (ts - mt) ** 2) / (1 - w2) * w2, rel=1e-8)


def test_covariance_plain_mean_limit():
    """β → 0 after 1 step, and β close to 1 for a few steps: equal weights, so v_T is the
    sample variance over n."""
    ts = np.array([1.0, 4.0, 2.0, 7.0])
    ss = np.array([0.5, 0.1, 0.3, 0.2])
    beta = 1 - 1e-9
    vt, vs, c = smoothing.covariance(fold(ts, ss, beta), beta)
    n = len(ts)
    assert vt == pytest.approx(np.var(ts, ddof=1) / n, rel=1e-5)
    assert vs == pytest.approx(np.var(ss, ddof=1) / n, rel=1e-5)
    assert c == pytest.approx(np.cov(ts, ss)[0, 1] / n, rel=1e-5)


def test_covariance_needs_two_steps():
    state = fold([1.0], [2.0], 0.9)
    assert all(math.isnan(v) for v in smoothing.covariance(state, 0.9))
    assert all(math.isnan(v) for v in smoothing.ratio_interval(state, 0.9))
    assert all(math.isnan(v) for v in smoothing.ratio_interval(smoothing.init(), 0.9))


def test_constant_steps_have_zero_variance_and_a_point_interval():
    """Regression: with one-pass E[x²] − E[x]² the (co)variances of steps that barely vary
    cancelled catastrophically, broke c² ≤ v_T·v_S and gave (−inf, inf) for noise-free
    steps."""
    state = fold([6.0] * 10, [2.0] * 10, 0.9)
    vt, vs, c = smoothing.covariance(state, 0.9)
    assert abs(vt) < 1e-12 and abs(vs) < 1e-12 and abs(c) < 1e-12
    lo, hi = smoothing.ratio_interval(state, 0.9)
    assert lo == pytest.approx(3.0, rel=1e-6) and hi == pytest.approx(3.0, rel=1e-6)


@pytest.mark.parametrize("rel", [1e-9, 1e-6, 1e-3])
def test_barely_varying_steps_against_numpy(rel):
    """Steps around large means with a relative spread ``rel``: the (co)variances keep
    their relative accuracy and obey Cauchy–Schwarz, and the interval is bounded, holds
    the ratio and is as wide as the spread."""
    rng = np.random.default_rng(5)
    beta, n = 0.9, 40
    ts = 6.0e3 * (1 + rel * rng.standard_normal(n))
    ss = 2.0e3 * (1 + rel * rng.standard_normal(n))
    vt, vs, c = smoothing.covariance(fold(ts, ss, beta), beta)
    w = weights(n, beta)
    cov = np.cov(np.vstack([ts - ts[0], ss - ss[0]]), aweights=w, ddof=1) * float(np.sum(w**2))
    assert vt == pytest.approx(cov[0, 0], rel=1e-6)
    assert vs == pytest.approx(cov[1, 1], rel=1e-6)
    assert c == pytest.approx(cov[0, 1], rel=1e-6, abs=1e-6 * math.sqrt(vt * vs))
    assert c * c <= vt * vs * (1 + 1e-9)
    state = fold(ts, ss, beta)
    mt, ms = smoothing.means(state, beta)
    lo, hi = smoothing.ratio_interval(state, beta)
    assert math.isfinite(lo) and lo <= mt / ms <= hi
    if rel >= 1e-6:
        # (below ~1e-8 relative the width is lost to rounding in the discriminant
        # b² − a·c of terms ~(T̄S̄)²: the interval degenerates to the point, still bounded)
        assert 0.1 * rel * 3.0 < hi - lo < 100 * rel * 3.0


def test_state_of_six_numbers_still_loads():
    """A state saved before the EMA moments were shifted (six numbers, no shift) reads as
    shift 0 and gives the same means and (co)variances as the formulas with no shift."""
    rng = np.random.default_rng(6)
    beta = 0.8
    ts, ss = rng.normal(10, 2, 12), rng.normal(3, 0.5, 12)
    a = 1 - beta
    acc = [0, 0.0, 0.0, 0.0, 0.0, 0.0]
    for t, s in zip(ts, ss):  # the unshifted accumulators, by hand
        acc = [acc[0] + 1, beta * acc[1] + a * t, beta * acc[2] + a * s,
               beta * acc[3] + a * t * t, beta * acc[4] + a * s * s, beta * acc[5] + a * t * s]
    old = smoothing.EmaState(*acc)
    new = fold(ts, ss, beta)
    assert smoothing.means(old, beta) == pytest.approx(smoothing.means(new, beta), rel=1e-12)
    assert smoothing.covariance(old, beta) == pytest.approx(smoothing.covariance(new, beta), rel=1e-6)
    more = smoothing.update(old, 11.0, 3.5, beta)
    assert smoothing.means(more, beta) == pytest.approx(
        smoothing.means(smoothing.update(new, 11.0, 3.5, beta), beta), rel=1e-12)


# ------------------------------------------------------------------------ Fieller
def test_fieller_endpoints_solve_the_quadratic_and_bracket_the_ratio():
    rng = np.random.default_rng(3)
    beta = 0.9
    ts, ss = rng.normal(20, 4, 30), rng.normal(2, 0.3, 30)
    state = fold(ts, ss, beta)
    lo, hi = smoothing.ratio_interval(state, beta)
    mt, ms = smoothing.means(state, beta)
    vt, vs, c = smoothing.covariance(state, beta)
    assert (lo, hi) == pytest.approx(fieller(mt, ms, vt, vs, c), rel=1e-12)
    assert lo < mt / ms < hi
    z2 = smoothing.Z95**2
    for rho in (lo, hi):
        assert (mt - rho * ms) ** 2 == pytest.approx(z2 * (vt - 2 * rho * c + rho * rho * vs), rel=1e-8)
    # small noise: close to the delta-method interval
    se = math.sqrt(vt / ms**2 - 2 * mt * c / ms**3 + mt**2 * vs / ms**4)
    assert lo == pytest.approx(mt / ms - smoothing.Z95 * se, rel=0.05)
    assert hi == pytest.approx(mt / ms + smoothing.Z95 * se, rel=0.05)


def test_fieller_unbounded_when_denominator_not_significant():
    rng = np.random.default_rng(4)
    beta = 0.9
    ts = rng.normal(20, 1, 30)
    ss = rng.normal(0.05, 1.0, 30)  # |G|² estimates straddle zero
    state = fold(ts, ss, beta)
    ms = smoothing.means(state, beta)[1]
    vs = smoothing.covariance(state, beta)[1]
    assert ms * ms <= smoothing.Z95**2 * vs
    lo, hi = smoothing.ratio_interval(state, beta)
    assert hi == math.inf and lo >= 0.0  # never a negative bound for a noise scale
    mt, vt, c = smoothing.means(state, beta)[0], smoothing.covariance(state, beta)[0], smoothing.covariance(state, beta)[2]
    assert lo == pytest.approx(fieller(mt, ms, vt, vs, c)[0], rel=1e-3, abs=1e-5)
    # a larger z widens a bounded interval until it, too, is unbounded
    ts, ss = rng.normal(20, 2, 30), rng.normal(2, 0.6, 30)
    state = fold(ts, ss, beta)
    lo95, hi95 = smoothing.ratio_interval(state, beta)
    lo99, hi99 = smoothing.ratio_interval(state, beta, z=2.576)
    assert math.isfinite(lo95) and lo99 < lo95 < hi95 < hi99
    assert smoothing.ratio_interval(state, beta, z=50.0)[1] == math.inf


def test_fieller_upper_ray_is_a_lower_bound_and_the_whole_line_is_undetermined():
    """S̄ not clearly above zero: Fieller's set is two rays ρ ≤ r₁ < 0 and ρ ≥ r₂ — the
    interval is the lower bound ``(r₂, inf)`` — or the whole line, ``(0, inf)``. A clear
    signal whose interval dips below zero is clipped at 0."""
    z2 = smoothing.Z95 ** 2
    for mt, ms, vt, vs, c in [(20.0, 0.1, 1.0, 1.0, 0.0),     # rays: lower bound r₂ > 0
                              (0.1, 0.1, 1.0, 1.0, 0.0)]:     # T̄ not significant either: whole line
        a, b, cc = ms * ms - z2 * vs, mt * ms - z2 * c, mt * mt - z2 * vt
        expected = fieller(mt, ms, vt, vs, c)
        got = smoothing.fieller(mt, ms, vt, vs, c, smoothing.Z95)
        assert got[1] == math.inf and got[0] == pytest.approx(expected[0], rel=1e-3, abs=1e-5)
        assert (b * b - a * cc > 0) == (got[0] > 0)
    lo, hi = smoothing.fieller(0.5, 2.0, 1.0, 0.01, 0.0, smoothing.Z95)  # T̄ ± 1.96 crosses 0
    assert lo == 0.0 and 0 < hi < math.inf


# ---------------------------------------------------------------- coverage by simulation
def _simulate(runs, steps, b, beta, seed):
    """Per-step ``(T, S)`` of ``runs`` independent training runs with Gaussian per-sample
    gradients ``g_i ~ N(G, Σ)`` (Σ diagonal), each step a fresh batch of ``b``."""
    rng = np.random.default_rng(seed)
    D = 12
    sd = np.linspace(0.5, 2.0, D)  # Σ = diag(sd²)
    G = np.zeros(D)
    G[:3] = [1.0, -0.7, 0.5]
    G *= math.sqrt(float(np.sum(sd**2)) / 24.0) / np.linalg.norm(G)  # B_true = 24
    g = G + sd * rng.standard_normal((runs, steps, b, D))
    sq = np.einsum("rsbd,rsbd->rsb", g, g)  # ||g_i||²
    gbar = g.mean(2)
    mean_sq = np.einsum("rsd,rsd->rs", gbar, gbar)  # ||ḡ||²
    true_b = float(np.sum(sd**2)) / float(G @ G)
    return sq, mean_sq, true_b


def test_fieller_interval_coverage_simulation():
    runs, steps, b, beta = 800, 60, 16, 0.9
    sq, mean_sq, true_b = _simulate(runs, steps, b, beta, seed=2024)
    assert true_b == pytest.approx(24.0)
    covered = naive_covered = 0
    finite = 0
    n_eff = 1.0 / smoothing.sum_sq_weights(steps, beta)
    for r in range(runs):
        state = smoothing.init()
        for s in range(steps):
            st = from_per_sample(sq[r, s], mean_sq[r, s])
            state = smoothing.update(state, st.trace_cov, st.grad_sq_norm, beta)
        lo, hi = smoothing.ratio_interval(state, beta)
        covered += lo <= true_b <= hi
        finite += math.isfinite(lo)
        # the power check: an interval that takes the EMA for a plain mean of all
        # `steps` steps (too narrow by sqrt(steps / n_eff)) must undercover
        mt, ms = smoothing.means(state, beta)
        vt, vs, c = smoothing.covariance(state, beta)
        k = n_eff / steps
        nlo, nhi = fieller(mt, ms, vt * k, vs * k, c * k)
        naive_covered += nlo <= true_b <= nhi
    rate = covered / runs
    assert finite > 0.9 * runs  # the signal is clear in most runs: a real test of the bounds
    assert 0.90 <= rate <= 0.99, f"coverage {rate:.3f}"
    assert naive_covered / runs < 0.85, f"naive coverage {naive_covered / runs:.3f}"


def test_per_step_stats_match_the_simulation_formula():
    """from_per_sample on the simulated batches is the closed form used above."""
    sq, mean_sq, _ = _simulate(2, 3, 16, 0.9, seed=7)
    for r in range(2):
        for s in range(3):
            st = from_per_sample(sq[r, s], mean_sq[r, s])
            B = sq.shape[2]
            tc = (sq[r, s].sum() - B * mean_sq[r, s]) / (B - 1)
            assert st.trace_cov == pytest.approx(tc, rel=1e-10)
            assert st.grad_sq_norm == pytest.approx(mean_sq[r, s] - tc / B, rel=1e-9, abs=1e-12)


def test_beta_zero_has_no_spread_to_give_an_interval():
    """``beta = 0`` keeps the last step alone: its means are that step's, and no interval
    can be given (the spread of the steps is not in the average)."""
    st = smoothing.init()
    for t, s in ((3.0, 1.0), (5.0, 2.0), (4.0, 1.5)):
        st = smoothing.update(st, t, s, 0.0)
    assert smoothing.means(st, 0.0) == (4.0, 1.5)
    assert all(math.isnan(v) for v in smoothing.ratio_interval(st, 0.0))
    assert all(math.isnan(v) for iv in smoothing.mean_interval(st, 0.0) for v in iv)
