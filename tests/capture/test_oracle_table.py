"""Every problem of tests/problems.py under ``gradnoise.capture``, checked against the
float64 oracle of tests/reference.py: per-sample squared norms, the set of parameters,
the parameters' ``.grad`` against plain autograd, and the noise statistics, for both
reductions, batch sizes 1, 2 and 5, in float64 and float32."""
from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from typing import Dict, Optional

import pytest
import torch

import gradnoise
from gradnoise.stats import NoiseStats
import reference as R
from problems import BY_NAME, PROBLEMS, REDUCTIONS

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")

BATCH_SIZES = (1, 2, 5)
DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass(frozen=True)
class Tol:
    """``|est − ref| ≤ rtol·|ref| + scale_tol·scale``, ``scale`` a magnitude of the quantity
    (the largest per-sample norm of the parameter, or ``A`` for the statistics)."""

    rtol: float
    scale_tol: float
    grad_rtol: float


TOLS = {torch.float64: Tol(rtol=1e-6, scale_tol=1e-9, grad_rtol=1e-7),
        torch.float32: Tol(rtol=1e-3, scale_tol=1e-4, grad_rtol=1e-4)}


def assert_near(est: float, ref: float, scale: float, tol: Tol, what: str) -> None:
    bound = tol.rtol * abs(ref) + tol.scale_tol * scale
    assert math.isfinite(est) and abs(est - ref) <= bound, (
        f"{what}: got {est!r}, oracle {ref!r} (|diff| {abs(est - ref):.3g} > {bound:.3g})")


# ------------------------------------------------------------------------------ runs
@functools.lru_cache(maxsize=None)
def oracle(name: str, B: int, dtype: torch.dtype):
    """``(norms, RefNoise)`` of problem ``name`` on its seeded batch of ``B`` in ``dtype``."""
    problem = BY_NAME[name]
    model, x, y = problem.build(B, dtype)
    grads = R.per_sample_grads(model, problem.make_loss("mean"), x, y)
    return R.sq_norms(grads), R.noise_stats(grads)


@dataclass
class Run:
    norms: Dict[str, torch.Tensor]
    cap: object  # the closed capture, for stats() and stats().by_param
    grads: Dict[str, Optional[torch.Tensor]]  # every named parameter's .grad after capture
    plain: Dict[str, Optional[torch.Tensor]]  # the same with plain autograd


_RUNS: Dict[tuple, Run] = {}


def _grads(model) -> Dict[str, Optional[torch.Tensor]]:
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}


def run(name: str, reduction: str, B: int, dtype: torch.dtype) -> Run:
    """One plain step and one captured step on two copies of the same model and batch."""
    key = (name, reduction, B, dtype)
    if key not in _RUNS:
        problem = BY_NAME[name]
        model, x, y = problem.build(B, dtype)
        loss_fn = problem.make_loss(reduction)
        plain = copy.deepcopy(model)
        loss_fn(R.call(plain, x), y).backward()
        with gradnoise.capture(model, reduction=reduction) as cap:
            loss = loss_fn(R.call(model, x), y)
            loss.backward()
        norms = {n: v.detach().clone() for n, v in cap.per_sample_sq_norms.items()}
        _RUNS[key] = Run(norms, cap, _grads(model), _grads(plain))
    return _RUNS[key]


CASES = [
    pytest.param(p.name, red, B, dtype, id=f"{p.name}-{red}-B{B}-{dname}")
    for p in PROBLEMS for red in REDUCTIONS for B in BATCH_SIZES for dname, dtype in DTYPES.items()
]
table = pytest.mark.parametrize("name, reduction, B, dtype", CASES)


# ----------------------------------------------------------------------------- tests
@table
def test_per_sample_sq_norms(name, reduction, B, dtype):
    ref, _ = oracle(name, B, dtype)
    got = run(name, reduction, B, dtype).norms
    assert set(got) == set(ref), f"parameters: got {sorted(got)}, oracle {sorted(ref)}"
    tol = TOLS[dtype]
    for n, r in ref.items():
        g = got[n]
        assert isinstance(g, torch.Tensor) and g.is_floating_point(), f"{n}: not a float tensor"
        assert g.shape == (B,), f"{n}: shape {tuple(g.shape)}, expected ({B},)"
        torch.testing.assert_close(g.detach().double(), r, rtol=tol.rtol,
                                   atol=tol.scale_tol * float(r.max()) + 1e-30, msg=lambda m: f"{n}: {m}")


@table
def test_param_grads_equal_plain_autograd(name, reduction, B, dtype):
    r = run(name, reduction, B, dtype)
    assert set(r.grads) == set(r.plain)
    tol = TOLS[dtype]
    for n, expect in r.plain.items():
        got = r.grads[n]
        if expect is None:
            assert got is None, f"{n}: plain autograd leaves .grad None, capture set it"
            continue
        assert got is not None, f"{n}: .grad is None after capture"
        assert got.dtype == expect.dtype and got.shape == expect.shape
        torch.testing.assert_close(got, expect, rtol=tol.grad_rtol,
                                   atol=tol.grad_rtol * float(expect.abs().max()) + 1e-30,
                                   msg=lambda m: f"{n}: {m}")


def assert_stats_match(est, ref: R.RefStats, tol: Tol, what: str) -> None:
    """Checks one NoiseStats against the oracle's statistics."""
    assert isinstance(est, NoiseStats), f"{what}: {type(est)} is not NoiseStats"
    assert est.batch_size == ref.batch_size, f"{what}: batch_size {est.batch_size} != {ref.batch_size}"
    assert est.n_groups == ref.n_groups, f"{what}: n_groups {est.n_groups} != {ref.n_groups}"
    scale = ref.group_sq_norm  # A >= C >= 0: the magnitude every term is made of
    assert_near(est.mean_sq_norm, ref.mean_sq_norm, scale, tol, f"{what} mean_sq_norm")
    assert_near(est.group_sq_norm, ref.group_sq_norm, scale, tol, f"{what} group_sq_norm")
    if ref.flag == R.FLAG_SINGLE_GROUP:
        assert est.flag == "single_group", f"{what}: flag {est.flag!r} with one sample"
        assert math.isnan(est.trace_cov) and math.isnan(est.grad_sq_norm) and math.isnan(est.b_simple)
        return
    assert_near(est.trace_cov, ref.trace_cov, scale, tol, f"{what} trace_cov")
    assert_near(est.grad_sq_norm, ref.grad_sq_norm, scale, tol, f"{what} grad_sq_norm")
    margin = 10 * tol.scale_tol * scale  # beyond it, the sign of |G|² is not a rounding matter
    if ref.grad_sq_norm > margin:
        assert est.flag is None, f"{what}: flag {est.flag!r}, oracle |G|² = {ref.grad_sq_norm}"
        assert est.b_simple == pytest.approx(est.trace_cov / est.grad_sq_norm, rel=1e-9)
        # First-order error of a ratio: the relative errors of its two terms add up.
        rel = sum(tol.rtol + tol.scale_tol * scale / abs(v) for v in (ref.trace_cov, ref.grad_sq_norm))
        if rel < 0.1:
            assert est.b_simple == pytest.approx(ref.b_simple, rel=2 * rel), f"{what} b_simple"
    elif ref.grad_sq_norm < -margin:
        assert est.flag == "grad_sq_norm_nonpositive", f"{what}: flag {est.flag!r}"
        assert math.isnan(est.b_simple)


@table
def test_stats_total(name, reduction, B, dtype):
    _, ref = oracle(name, B, dtype)
    assert_stats_match(run(name, reduction, B, dtype).cap.stats(), ref.total, TOLS[dtype], "total")


@table
def test_stats_by_param(name, reduction, B, dtype):
    _, ref = oracle(name, B, dtype)
    got = run(name, reduction, B, dtype).cap.stats().by_param
    assert set(got) == set(ref.by_param), f"parameters: got {sorted(got)}, oracle {sorted(ref.by_param)}"
    for n, r in ref.by_param.items():
        assert_stats_match(got[n], r, TOLS[dtype], n)
