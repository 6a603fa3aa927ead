"""The estimator of DESIGN.md §1 against direct float64 formulas, and its flags."""
import math

import numpy as np
import pytest

from gradnoise import stats


def _direct(g, sizes):
    """trace_cov, grad_sq_norm from per-group mean gradients g [k, D] by the formulas."""
    sizes = np.asarray(sizes, float)
    B, k = sizes.sum(), len(sizes)
    gbar = (sizes[:, None] * g).sum(0) / B
    A = (sizes * (g**2).sum(1)).sum() / B
    C = (gbar**2).sum()
    tr = B * (A - C) / (k - 1)
    return tr, C - tr / B, C


def test_per_sample_matches_sample_variance():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(7, 5)) + 1.0
    s = stats.from_per_sample((g**2).sum(1), (g.mean(0) ** 2).sum())
    # per-sample case: tr = Σ||g_i - ḡ||²/(B-1)
    assert s.trace_cov == pytest.approx(((g - g.mean(0)) ** 2).sum() / 6, rel=1e-12)
    assert s.grad_sq_norm == pytest.approx((g.mean(0) ** 2).sum() - s.trace_cov / 7, rel=1e-12)
    assert s.b_simple == pytest.approx(s.trace_cov / s.grad_sq_norm)
    assert s.ok and s.n_groups == 7 and s.batch_size == 7


def test_groups_of_unequal_size():
    rng = np.random.default_rng(1)
    sizes = [3, 1, 4, 2]
    g = rng.normal(size=(4, 6)) + 1.0
    tr, gsq, C = _direct(g, sizes)
    s = stats.from_groups((g**2).sum(1), sizes, C)
    assert (s.trace_cov, s.grad_sq_norm) == pytest.approx((tr, gsq), rel=1e-12)
    assert s.batch_size == 10 and s.n_groups == 4


def test_finite_population_correction():
    s_iid = stats.from_moments(2.0, 1.0, 10, 10)
    s_fpc = stats.from_moments(2.0, 1.0, 10, 10, population=50)
    s2 = 10 * (2.0 - 1.0) / 9
    assert s_iid.trace_cov == pytest.approx(s2)
    assert s_fpc.trace_cov == pytest.approx(s2 * 49 / 50)
    assert s_fpc.grad_sq_norm == pytest.approx(1.0 - s2 * (1 / 10 - 1 / 50))
    assert stats.finite_population_factor(10, 50) == pytest.approx(40 / 49)
    assert stats.finite_population_factor(10, None) == 1.0
    with pytest.raises(ValueError):
        stats.from_moments(2.0, 1.0, 10, 10, population=5)


@pytest.mark.parametrize("A, C, k, flag", [
    (2.0, 1.0, 1, "single_group"),
    (float("nan"), 1.0, 5, "non_finite"),
    (2.0, float("inf"), 5, "non_finite"),
    (10.0, 0.1, 5, "grad_sq_norm_nonpositive"),
])
def test_undefined_cases_are_flagged(A, C, k, flag):
    s = stats.from_moments(A, C, 5, k)
    assert s.flag == flag and not s.ok and s.reason
    assert math.isnan(s.b_simple)


def test_total_is_the_sum_of_parts_and_keeps_them():
    a = stats.from_moments(2.0, 1.0, 8, 8)
    b = stats.from_moments(3.0, 0.5, 8, 8)
    t = stats.total({"a": a, "b": b})
    assert t.trace_cov == pytest.approx(a.trace_cov + b.trace_cov)
    assert t.grad_sq_norm == pytest.approx(a.grad_sq_norm + b.grad_sq_norm)
    assert t.by_param == {"a": a, "b": b}
    with pytest.raises(ValueError, match="disagree"):
        stats.total({"a": a, "c": stats.from_moments(2.0, 1.0, 9, 9)})
    with pytest.raises(ValueError, match="no parameter"):
        stats.total({})


def test_bad_groups_are_refused():
    with pytest.raises(ValueError):
        stats.from_groups([1.0, 2.0], [1], 1.0)
    with pytest.raises(ValueError):
        stats.from_groups([1.0, 2.0], [1, 0], 1.0)
