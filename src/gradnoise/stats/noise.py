"""The one gradient-noise estimator of DESIGN.md §1, for groups of any size.

A batch of ``B`` samples is split into ``k`` groups (single samples, micro-batches or
data-parallel ranks) of sizes ``b_j`` with ``Σ_j b_j = B``. With group-mean gradients
``g⁽ʲ⁾`` and the full-batch mean ``ḡ = Σ_j (b_j/B) g⁽ʲ⁾``::

    A = Σ_j (b_j/B) ||g⁽ʲ⁾||²        C = ||ḡ||²
    E[A] = |G|² + k·tr(Σ)/B           E[C] = |G|² + tr(Σ)/B

so that ``trace_cov = B (A − C)/(k − 1)`` and ``grad_sq_norm = C − trace_cov/B`` are
unbiased, and ``b_simple = trace_cov / grad_sq_norm`` (McCandlish et al. 2018).

Finite population. When the batch is drawn without replacement from ``N`` samples,
``s² = B (A − C)/(k − 1)`` is unbiased for ``S² = N/(N − 1)·tr(Σ)`` and
``E[C] = |G|² + S² (1/B − 1/N)``; the estimator then returns
``trace_cov = s² (N − 1)/N`` and ``grad_sq_norm = C − s² (1/B − 1/N)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Mapping, Optional, Sequence

FLAG_SINGLE_GROUP = "single_group"
FLAG_NON_FINITE = "non_finite"
FLAG_NONPOSITIVE = "grad_sq_norm_nonpositive"

_MESSAGES = {
    FLAG_SINGLE_GROUP: "the covariance needs at least two samples (or groups); got one",
    FLAG_NON_FINITE: "the gradients contain NaN or inf; no statistic is defined",
    FLAG_NONPOSITIVE: "the estimate of |G|² is ≤ 0 (noise dominates), so b_simple is undefined",
}


@dataclass(frozen=True)
class NoiseStats:
    """Gradient-noise statistics of one batch (or one parameter of it).

    Attributes:
        batch_size: ``B``, the number of samples.
        n_groups: ``k``, the number of groups the estimate used (``B`` for per-sample).
        trace_cov: unbiased ``tr(Σ)``, per-sample gradient covariance trace.
        grad_sq_norm: unbiased ``|G|²``.
        b_simple: ``trace_cov / grad_sq_norm``; NaN when ``flag`` is set.
        mean_sq_norm: ``C = ||ḡ||²``, the squared norm of the batch-mean gradient.
        group_sq_norm: ``A = Σ_j (b_j/B)||g⁽ʲ⁾||²``.
        flag: ``None`` when every number is defined, else one of ``single_group``,
            ``non_finite``, ``grad_sq_norm_nonpositive``. A flagged value is NaN,
            never a silent number.
        population: ``N`` when the finite-population correction was applied.
        combo_factor: ``Σ_j w_j²/b_j`` when ``C`` combined the groups with weights
            other than ``b_j/B`` (see :func:`from_moments`), else None.
        by_param: for a whole model, parameter name -> statistics of that parameter
            alone (empty for a single block). The totals are their sums.
    """

    batch_size: int
    n_groups: int
    trace_cov: float
    grad_sq_norm: float
    b_simple: float
    mean_sq_norm: float
    group_sq_norm: float
    flag: Optional[str] = None
    population: Optional[int] = None
    combo_factor: Optional[float] = None
    by_param: Mapping[str, "NoiseStats"] = field(default_factory=dict, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        """True when every statistic is defined."""
        return self.flag is None

    @property
    def reason(self) -> Optional[str]:
        """A sentence saying why the result is flagged, or None."""
        return None if self.flag is None else _MESSAGES[self.flag]

    @property
    def snr(self) -> float:
        """Gradient signal-to-noise ratio ``|G|² / tr(Σ)``."""
        return _ratio(self.grad_sq_norm, self.trace_cov)

    def noise_at(self, b: float) -> float:
        """Expected squared error ``tr(Σ)/b`` of an i.i.d. batch of size ``b``."""
        return self.trace_cov / b


def _ratio(num: float, den: float) -> float:
    return num / den if den != 0 and math.isfinite(num) and math.isfinite(den) else math.nan


def from_moments(
    group_sq_norm: float,
    mean_sq_norm: float,
    batch_size: int,
    n_groups: int,
    population: Optional[int] = None,
    combo_factor: Optional[float] = None,
) -> NoiseStats:
    """Noise statistics from the two moments ``A`` and ``C`` (module docstring).

    Args:
        group_sq_norm: ``A = Σ_j (b_j/B)||g⁽ʲ⁾||²``.
        mean_sq_norm: ``C = ||Σ_j w_j g⁽ʲ⁾||²``, by default with ``w_j = b_j/B`` (the
            batch mean ``ḡ``).
        batch_size: ``B = Σ_j b_j``.
        n_groups: ``k``.
        population: ``N`` when the batch was drawn without replacement from ``N``
            samples; ``None`` for i.i.d. sampling.
        combo_factor: ``f = Σ_j w_j²/b_j`` when ``C`` combines the groups with other
            weights ``w_j`` (``Σ w_j = 1``), e.g. DistributedDataParallel's plain average
            over ranks of unequal size. Then ``E[C] = |G|² + f·tr(Σ)`` and
            ``trace_cov = (A − C)/(k/B − f)``, ``grad_sq_norm = C − f·trace_cov``. The
            default ``f = 1/B`` gives the formulas above.
    """
    A, C, B, k = float(group_sq_norm), float(mean_sq_norm), int(batch_size), int(n_groups)
    nan = math.nan
    if not (math.isfinite(A) and math.isfinite(C)):
        return NoiseStats(B, k, nan, nan, nan, C, A, FLAG_NON_FINITE, population, combo_factor)
    if k < 2:
        return NoiseStats(B, k, nan, nan, nan, C, A, FLAG_SINGLE_GROUP, population, combo_factor)
    if combo_factor is not None:
        if population is not None:
            raise ValueError("the finite-population correction needs the default weights")
        f = float(combo_factor)
        trace_cov = (A - C) / (k / B - f)
        grad_sq_norm = C - f * trace_cov
    elif population is None:
        s2 = B * (A - C) / (k - 1)
        trace_cov, grad_sq_norm = s2, C - s2 / B
    else:
        s2 = B * (A - C) / (k - 1)
        N = int(population)
        if N < B:
            raise ValueError(f"population N={N} is smaller than the batch B={B}")
        trace_cov = s2 * (N - 1) / N
        grad_sq_norm = C - s2 * (1.0 / B - 1.0 / N)
    if grad_sq_norm <= 0:
        return NoiseStats(B, k, trace_cov, grad_sq_norm, nan, C, A, FLAG_NONPOSITIVE, population, combo_factor)
    return NoiseStats(B, k, trace_cov, grad_sq_norm, trace_cov / grad_sq_norm, C, A, None, population, combo_factor)


def from_estimates(trace_cov: float, grad_sq_norm: float, batch_size: int, n_groups: int) -> NoiseStats:
    """Statistics from already-estimated ``tr(Σ)`` and ``|G|²`` (smoothed values, say):
    ``b_simple`` is their ratio, flagged when ``|G|² ≤ 0`` or either is not finite."""
    T, S, nan = float(trace_cov), float(grad_sq_norm), math.nan
    B, k = int(batch_size), int(n_groups)
    if not (math.isfinite(T) and math.isfinite(S)):
        return NoiseStats(B, k, T, S, nan, nan, nan, FLAG_NON_FINITE)
    if S <= 0:
        return NoiseStats(B, k, T, S, nan, nan, nan, FLAG_NONPOSITIVE)
    return NoiseStats(B, k, T, S, T / S, nan, nan)


def from_groups(
    group_sq_norms: Sequence[float],
    group_sizes: Sequence[int],
    mean_sq_norm: float,
    population: Optional[int] = None,
    weights: Optional[Sequence[float]] = None,
) -> NoiseStats:
    """Noise statistics from the squared norms of ``k`` group-mean gradients.

    Args:
        group_sq_norms: ``||g⁽ʲ⁾||²``, shape ``[k]``, each the squared norm of a
            group's *mean* gradient (for single samples: ``||g_i||²``, never scaled by 1/B).
        group_sizes: ``b_j``, shape ``[k]``.
        mean_sq_norm: ``C = ||Σ_j w_j g⁽ʲ⁾||²``; by default ``w_j = b_j/B``, the
            full-batch mean gradient.
        population: see :func:`from_moments`.
        weights: ``w_j`` ``[k]`` (summing to 1) when ``C`` is of another combination.
    """
    sizes = [int(b) for b in group_sizes]
    norms = [float(v) for v in group_sq_norms]
    if len(sizes) != len(norms):
        raise ValueError(f"{len(norms)} group norms but {len(sizes)} group sizes")
    if any(b <= 0 for b in sizes):
        raise ValueError(f"group sizes must be positive, got {sizes}")
    B = sum(sizes)
    A = math.fsum(b * v for b, v in zip(sizes, norms)) / B
    f = None
    if weights is not None:
        w = [float(x) for x in weights]
        if len(w) != len(sizes) or abs(math.fsum(w) - 1.0) > 1e-9:
            raise ValueError(f"weights must be {len(sizes)} numbers summing to 1, got {w}")
        f = math.fsum(x * x / b for x, b in zip(w, sizes))
    return from_moments(A, mean_sq_norm, B, len(sizes), population, f)


def from_per_sample(
    sq_norms: Sequence[float], mean_sq_norm: float, population: Optional[int] = None
) -> NoiseStats:
    """The per-sample case ``k = B``, ``b_j = 1``:
    ``trace_cov = (Σ||g_i||² − B||ḡ||²)/(B − 1)``."""
    norms = [float(v) for v in sq_norms]
    return from_groups(norms, [1] * len(norms), mean_sq_norm, population)


def total(parts: Mapping[str, NoiseStats]) -> NoiseStats:
    """The statistics of a whole model from those of its parameter blocks.

    ``A`` and ``C`` add over disjoint parameter blocks, and the estimator is linear in
    them, so the totals are the sums of the per-block values. All parts must share
    ``batch_size``, ``n_groups`` and ``population``.
    """
    if not parts:
        raise ValueError("no parameter received a gradient")
    shapes = {(s.batch_size, s.n_groups, s.population, s.combo_factor) for s in parts.values()}
    if len(shapes) != 1:
        raise ValueError(f"parameter blocks disagree on (batch_size, n_groups, population, weights): {shapes}")
    (B, k, N, f), = shapes
    A = math.fsum(s.group_sq_norm for s in parts.values())
    C = math.fsum(s.mean_sq_norm for s in parts.values())
    whole = from_moments(A, C, B, k, N, f)
    return replace(whole, by_param=dict(parts))


def finite_population_factor(b: int, population: Optional[int]) -> float:
    """``(N − b)/(N − 1)``: the noise of a batch drawn without replacement relative to
    i.i.d. draws (1 when ``population`` is None)."""
    if population is None:
        return 1.0
    N = int(population)
    if N < 2 or not 1 <= b <= N:
        raise ValueError(f"need 1 ≤ b ≤ N and N ≥ 2, got b={b}, N={N}")
    return (N - b) / (N - 1)
