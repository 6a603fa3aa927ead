"""Within- and between-client gradient noise of federated data (DESIGN.md §1, "Clients").

Data spread over ``K`` clients; client ``k`` has weight ``w_k`` (``Σ w_k = 1``), true
gradient ``∇F_k`` and per-sample covariance ``Σ_k``; ``∇f = Σ_k w_k ∇F_k``. The pooled
per-sample covariance (draw a client with probability ``w_k``, then one of its samples)
splits by the law of total variance::

    tr Σ = within + between
    within  = Σ_k w_k tr Σ_k
    between = Σ_k w_k ||∇F_k − ∇f||² = Σ_k w_k ||∇F_k||² − ||∇f||² = (B² − 1)||∇f||²
    B²      = Σ_k w_k ||∇F_k||² / ||∇f||²          (FedProx's dissimilarity)

Client side, :func:`client_moments` turns ``n_k`` per-sample gradients ``g_i`` into a
record of three scalars — ``n_k``, ``S_k = Σ_i ||g_i||²``, ``q_k = ||ḡ_k||²`` — plus
the mean gradient ``ḡ_k`` itself, which the server needs *only* for
``U = ||Σ_k w_k ḡ_k||²``. A server that already holds the aggregate ``Σ_k w_k ḡ_k``
(FedAvg, secure aggregation) passes ``aggregate_sq_norm=U`` to :func:`decompose`
and the clients may drop their vectors (``keep_mean_grad=False``).

Server side, :func:`decompose` uses, per client (``s_k² = (S_k − n_k q_k)/(n_k − 1)``)::

    i.i.d. draws from the client's distribution      without replacement, n_k of N_k
    tr Σ_k  = s_k²                                   s_k² (N_k − 1)/N_k
    v_k     = s_k² / n_k                             s_k² (1/n_k − 1/N_k)
    ||∇F_k||² = q_k − v_k                            q_k − v_k

where ``v_k`` estimates ``E||ḡ_k − ∇F_k||²`` (the finite-population case targets the
population covariance with divisor ``N_k``, as ``stats.noise`` does), and then::

    within       = Σ_k w_k tr Σ_k
    A            = Σ_k w_k ||∇F_k||²
    grad_sq_norm = U − Σ_k w_k² v_k            (E[U] = ||∇f||² + Σ_k w_k² E||ḡ_k − ∇F_k||²)
    between      = A − grad_sq_norm
    B²           = A / grad_sq_norm = 1 + between / grad_sq_norm
    trace_cov_total = within + between

``within``, ``between``, ``grad_sq_norm`` and ``trace_cov_total`` are unbiased when the
clients sample independently of each other and the weights are fixed (not estimated
from the draws). ``B²`` is a ratio of unbiased estimates, hence biased, and undefined
when ``grad_sq_norm ≤ 0``. Default weights are ``N_k/ΣN`` when every client gives its
``population``, else ``n_k/Σn`` (the pooled batch mean).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import torch
from torch import Tensor

FLAG_NON_FINITE = "non_finite"
FLAG_CLIENT_TOO_SMALL = "client_too_small"
FLAG_SINGLE_CLIENT = "single_client"
FLAG_NONPOSITIVE = "grad_sq_norm_nonpositive"


@dataclass(frozen=True)
class ClientMoments:
    """What one client reports: ``n`` samples' ``Σ_i ||g_i||²``, ``||ḡ||²`` and ``ḡ``.

    Attributes:
        n: ``n_k``, the number of samples used.
        sq_norm_sum: ``S_k = Σ_i ||g_i||²`` (per-sample gradients, never scaled by 1/n).
        mean_sq_norm: ``q_k = ||ḡ_k||²``.
        mean_grad: ``ḡ_k`` flattened, shape ``[D]``; None when the server gets the
            aggregate's squared norm another way.
        population: ``N_k`` when the ``n_k`` samples were drawn without replacement
            from the client's ``N_k``; None for i.i.d. draws.
    """

    n: int
    sq_norm_sum: float
    mean_sq_norm: float
    mean_grad: Optional[Tensor] = None
    population: Optional[int] = None


@dataclass(frozen=True)
class ClientNoise:
    """The server's decomposition of the pooled per-sample noise.

    Attributes:
        within: unbiased ``Σ_k w_k tr Σ_k``.
        between: unbiased ``Σ_k w_k ||∇F_k − ∇f||²``.
        dissimilarity_sq: ``B² = Σ_k w_k ||∇F_k||² / ||∇f||²`` (ratio of unbiased
            estimates); NaN when flagged.
        grad_sq_norm: unbiased ``||∇f||²``.
        trace_cov_total: ``within + between``, the pooled ``tr Σ``.
        weights: ``w_k``, shape ``[K]``.
        sizes: ``n_k``, shape ``[K]``.
        client_trace_cov: per-client ``tr Σ_k`` estimates, ``[K]``.
        client_grad_sq_norm: per-client ``||∇F_k||²`` estimates, ``[K]``.
        aggregate_sq_norm: ``U = ||Σ_k w_k ḡ_k||²``.
        flag: None, or ``non_finite``, ``client_too_small``, ``single_client``,
            ``grad_sq_norm_nonpositive``; the values it makes undefined are NaN.
        reason: one sentence for ``flag``, or None.
    """

    within: float
    between: float
    dissimilarity_sq: float
    grad_sq_norm: float
    trace_cov_total: float
    weights: Tuple[float, ...]
    sizes: Tuple[int, ...]
    client_trace_cov: Tuple[float, ...]
    client_grad_sq_norm: Tuple[float, ...]
    aggregate_sq_norm: float
    flag: Optional[str] = None
    reason: Optional[str] = None

    @property
    def ok(self) -> bool:
        """True when every statistic is defined."""
        return self.flag is None


def client_moments(
    per_sample_sq_norm_sum: Any,
    mean_grad: Any,
    n: int,
    population: Optional[int] = None,
    keep_mean_grad: bool = True,
) -> ClientMoments:
    """One client's record from its ``n`` per-sample gradients.

    Args:
        per_sample_sq_norm_sum: ``Σ_i ||g_i||²`` over the ``n`` samples (float or
            0-d tensor), per-sample gradients not scaled by ``1/n``.
        mean_grad: ``ḡ_k = (1/n) Σ_i g_i``, a tensor or array of any shape (flattened).
        n: ``n_k ≥ 1``.
        population: ``N_k ≥ n`` when drawn without replacement from ``N_k`` samples.
        keep_mean_grad: False drops the vector from the record (the server then
            needs ``aggregate_sq_norm``).
    """
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if population is not None and (int(population) != population or population < n):
        raise ValueError(f"population N={population!r} must be an integer ≥ n={n}")
    vec = torch.as_tensor(mean_grad).detach().flatten()
    if not vec.is_floating_point():
        raise ValueError(f"mean_grad must be floating point, got {vec.dtype}")
    S = float(per_sample_sq_norm_sum)
    q = float(vec.double().pow(2).sum())
    if math.isfinite(S) and math.isfinite(q) and S < n * q * (1 - 1e-4):
        raise ValueError(
            f"Σ||g_i||²={S:.6g} < n||ḡ||²={n * q:.6g}: pass the sum (not the mean) of the "
            "per-sample squared norms, and the unscaled mean gradient"
        )
    pop = None if population is None else int(population)
    return ClientMoments(int(n), S, q, vec if keep_mean_grad else None, pop)


def _client_terms(r: ClientMoments) -> Tuple[float, float]:
    """``(tr Σ_k, v_k)`` of one client (module docstring); NaN when ``n_k < 2``."""
    n, N = r.n, r.population
    if N is not None and n == N == 1:
        return 0.0, 0.0  # a census of one sample: no spread, no sampling error
    if n < 2:
        return math.nan, math.nan
    s2 = (r.sq_norm_sum - n * r.mean_sq_norm) / (n - 1)
    if N is None:
        return s2, s2 / n
    return s2 * (N - 1) / N, s2 * (1.0 / n - 1.0 / N)


def _weights(records: Sequence[ClientMoments], weights: Optional[Sequence[float]]) -> Tuple[float, ...]:
    K = len(records)
    if weights is None:
        pops = [r.population for r in records]
        if all(p is not None for p in pops):
            sizes = pops
        elif any(p is not None for p in pops):
            raise ValueError("some clients give a population and some do not: pass weights explicitly")
        else:
            sizes = [r.n for r in records]
        total = sum(sizes)
        return tuple(s / total for s in sizes)
    w = tuple(float(x) for x in weights)
    if len(w) != K or any(not math.isfinite(x) or x < 0 for x in w) or abs(math.fsum(w) - 1.0) > 1e-9:
        raise ValueError(f"weights must be {K} non-negative numbers summing to 1, got {w}")
    return w


def _aggregate_sq_norm(records: Sequence[ClientMoments], w: Sequence[float]) -> float:
    """``U = ||Σ_k w_k ḡ_k||²`` from the clients' vectors, in float64."""
    vecs = [r.mean_grad for r in records]
    if any(v is None for v in vecs):
        raise ValueError("a record has no mean_grad: keep the vectors or pass aggregate_sq_norm")
    shapes = {tuple(v.shape) for v in vecs}
    if len(shapes) != 1:
        raise ValueError(f"clients' mean gradients disagree in shape: {sorted(shapes)}")
    device = vecs[0].device
    agg = sum(wk * v.to(device=device, dtype=torch.float64) for wk, v in zip(w, vecs))
    return float(agg.pow(2).sum())


def decompose(
    records: Sequence[ClientMoments],
    weights: Optional[Sequence[float]] = None,
    aggregate_sq_norm: Optional[float] = None,
) -> ClientNoise:
    """Within/between-client split of the pooled per-sample noise (module docstring).

    Args:
        records: one :class:`ClientMoments` per client, ``K ≥ 1`` (``K = 1`` is flagged).
        weights: ``w_k`` ``[K]`` summing to 1; default ``N_k/ΣN`` when every record has
            a population, else ``n_k/Σn``.
        aggregate_sq_norm: ``U = ||Σ_k w_k ḡ_k||²`` if the server computed it (with
            these weights); otherwise it is computed from the records' vectors.
    """
    records = list(records)
    if not records:
        raise ValueError("decompose needs at least one client record")
    w = _weights(records, weights)
    U = float(aggregate_sq_norm) if aggregate_sq_norm is not None else _aggregate_sq_norm(records, w)
    terms = [_client_terms(r) for r in records]
    tr_k = tuple(t for t, _ in terms)
    F2_k = tuple(r.mean_sq_norm - v for r, (_, v) in zip(records, terms))
    within = math.fsum(wk * t for wk, t in zip(w, tr_k))
    A = math.fsum(wk * f for wk, f in zip(w, F2_k))
    g2 = U - math.fsum(wk * wk * v for wk, (_, v) in zip(w, terms))
    between = A - g2
    nan = math.nan

    def result(within, between, B2, g2, flag=None, reason=None):
        return ClientNoise(within, between, B2, g2, within + between, w, tuple(r.n for r in records),
                           tr_k, F2_k, U, flag, reason)

    raw = [U] + [x for r in records for x in (r.sq_norm_sum, r.mean_sq_norm)]
    if not all(math.isfinite(x) for x in raw):
        return result(nan, nan, nan, nan, FLAG_NON_FINITE, "the client moments contain NaN or inf")
    small = [k for k, t in enumerate(tr_k) if math.isnan(t)]
    if small:
        return result(nan, nan, nan, nan, FLAG_CLIENT_TOO_SMALL,
                      f"clients {small} used fewer than 2 samples, so tr Σ_k cannot be estimated")
    if len(records) < 2:
        return result(within, nan, nan, g2, FLAG_SINGLE_CLIENT,
                      "one client: there is no between-client part to estimate")
    if g2 <= 0:
        return result(within, between, nan, g2, FLAG_NONPOSITIVE,
                      "the estimate of ||∇f||² is ≤ 0 (noise dominates), so B² is undefined")
    return result(within, between, A / g2, g2)
