"""Smoothing noise statistics over steps: debiased EMAs and a Fieller interval.

``b_simple = tr(Σ)/|G|²`` is a ratio of noisy estimates, so the numerator ``T`` and
the denominator ``S`` are smoothed separately (DESIGN.md §1) and the smoothed value is
``T̄/S̄``. After ``n`` updates with decay ``β`` the debiased EMA puts weight
``w_t = (1 − β) β^{n−t} / (1 − β^n)`` on step ``t`` (``Σ w_t = 1``), so for steps that
vary independently around a common mean::

    Var(T̄) = σ_T² Σ w_t²,   Σ w_t² = (1 − β)² (1 − β^{2n}) / ((1 − β²)(1 − β^n)²)

with ``σ_T²``, ``σ_S²`` and ``σ_TS`` the weighted (co)variances of the steps, also kept
as EMAs. The 95 % interval for ``ρ = E[T]/E[S]`` is Fieller's: the ``ρ`` with
``(T̄ − ρ S̄)² ≤ z² (v_T − 2ρ c + ρ² v_S)``, intersected with ``ρ ≥ 0`` (a noise scale
cannot be negative; DESIGN.md §1, Display). When ``S̄`` is not clearly above zero
(``S̄² ≤ z² v_S``) Fieller's set is unbounded: either the whole line — the interval is
then ``(0, inf)``, "not determined" — or two rays ``ρ ≤ r₁``, ``ρ ≥ r₂``; with ``r₁ < 0``
only the upper ray is left and the interval is ``(r₂, inf)``, a lower bound.

State is explicit and immutable (``init`` / ``update``), as in Optax.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Tuple

Z95 = 1.959963984540054


class EmaState(NamedTuple):
    """Biased EMA accumulators of ``T − kt``, ``S − ks`` and their products after
    ``count`` steps. The shift ``(kt, ks)`` is the first step's values, so the
    (co)variances do not cancel catastrophically when the steps barely vary."""

    count: int = 0
    t: float = 0.0
    s: float = 0.0
    tt: float = 0.0
    ss: float = 0.0
    ts: float = 0.0
    kt: float = 0.0
    ks: float = 0.0


def init() -> EmaState:
    """An empty state."""
    return EmaState()


def update(state: EmaState, t: float, s: float, beta: float) -> EmaState:
    """Fold one step's estimates ``t`` (trace) and ``s`` (|G|²) in, with decay ``beta``."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    a = 1.0 - beta
    kt, ks = (t, s) if state.count == 0 else (state.kt, state.ks)
    dt, ds = t - kt, s - ks
    return EmaState(
        state.count + 1,
        beta * state.t + a * dt,
        beta * state.s + a * ds,
        beta * state.tt + a * dt * dt,
        beta * state.ss + a * ds * ds,
        beta * state.ts + a * dt * ds,
        kt,
        ks,
    )


def _debias(state: EmaState, beta: float) -> float:
    return 1.0 - beta ** state.count


def means(state: EmaState, beta: float) -> Tuple[float, float]:
    """Debiased ``(T̄, S̄)``; NaN before the first update."""
    if state.count == 0:
        return math.nan, math.nan
    d = _debias(state, beta)
    return state.kt + state.t / d, state.ks + state.s / d


def sum_sq_weights(count: int, beta: float) -> float:
    """``Σ w_t²`` of the debiased EMA after ``count`` steps (1 for one step)."""
    if count == 0:
        return math.nan
    if beta == 0.0:
        return 1.0
    return (1 - beta) ** 2 * (1 - beta ** (2 * count)) / ((1 - beta**2) * (1 - beta**count) ** 2)


def covariance(state: EmaState, beta: float) -> Tuple[float, float, float]:
    """``(v_T, v_S, c)``: variances and covariance of ``T̄`` and ``S̄`` (NaN below 2 steps,
    and with ``beta = 0``, where the average is the last step alone and the steps' spread
    cannot be told from it)."""
    if state.count < 2 or beta == 0.0:
        return math.nan, math.nan, math.nan
    d = _debias(state, beta)
    mt, ms = state.t / d, state.s / d  # shifted means: the shift leaves (co)variances alone
    w2 = sum_sq_weights(state.count, beta)
    # unbiased weighted (co)variance of one step, then of the weighted mean
    var_t = max(state.tt / d - mt * mt, 0.0) / (1.0 - w2)
    var_s = max(state.ss / d - ms * ms, 0.0) / (1.0 - w2)
    cov = (state.ts / d - mt * ms) / (1.0 - w2)
    return var_t * w2, var_s * w2, cov * w2


def ratio_interval(state: EmaState, beta: float, z: float = Z95) -> Tuple[float, float]:
    """Fieller's interval for ``E[T]/E[S] ≥ 0``, clipped to ``[0, inf)``; ``(nan, nan)``
    below two steps (module docstring)."""
    mt, ms = means(state, beta)
    v_t, v_s, c = covariance(state, beta)
    if not all(map(math.isfinite, (mt, ms, v_t, v_s, c))):
        return math.nan, math.nan
    return fieller(mt, ms, v_t, v_s, c, z)


def fieller(mt: float, ms: float, v_t: float, v_s: float, c: float, z: float) -> Tuple[float, float]:
    """The hull of Fieller's set for the ratio of means ``(T̄, S̄)`` with (co)variances
    ``v_T, v_S, c`` of those means, within ``ρ ≥ 0`` (module docstring)."""
    z2 = z * z
    a = ms * ms - z2 * v_s
    b = mt * ms - z2 * c
    cc = mt * mt - z2 * v_t
    disc = b * b - a * cc
    if a > 0:
        if disc < 0:  # an empty set: the quadratic never dips below zero (rounding)
            return math.nan, math.nan
        root = math.sqrt(disc)
        low, high = (b - root) / a, (b + root) / a
        return max(low, 0.0), max(high, 0.0)
    if a == 0 or disc <= 0:
        return 0.0, math.inf
    root = math.sqrt(disc)
    r1, r2 = (b + root) / a, (b - root) / a  # a < 0: r1 < r2, the set is ρ ≤ r1 or ρ ≥ r2
    return (0.0, math.inf) if r1 >= 0 else (max(r2, 0.0), math.inf)


def mean_interval(state: EmaState, beta: float, z: float = Z95) -> Tuple[Tuple[float, float], Tuple[float, float]]:
    """95 % intervals ``T̄ ± z·sd(T̄)`` and ``S̄ ± z·sd(S̄)``, each clipped to ``[0, inf)``
    (``tr(Σ)`` and ``|G|²`` cannot be negative); NaN ends below two steps."""
    mt, ms = means(state, beta)
    v_t, v_s, _ = covariance(state, beta)
    out = []
    for m, v in ((mt, v_t), (ms, v_s)):
        if not (math.isfinite(m) and math.isfinite(v)):
            out.append((math.nan, math.nan))
            continue
        half = z * math.sqrt(v)
        out.append((max(m - half, 0.0), max(m + half, 0.0)))
    return out[0], out[1]
