"""Batch-size rules of :class:`~gradnoise.control.AdaptiveBatchSampler`: pure functions
of floats, and the fitted step-time model of the goodput rule.

Sizes live on a grid: multiples of ``q`` (``multiple_of × num_replicas``) in
``[lo, hi]``, ``lo`` and ``hi`` themselves multiples of ``q``.

* proportional: ``B = c · B_simple``, rounded to the grid.
* goodput (Pollux, Qiao et al. 2021, after McCandlish et al. 2018): with the noise scale
  ``B_noise`` (estimated by ``B_simple``) a step of ``B`` samples makes the progress of
  ``B_noise·B/(B_noise + B)`` "perfectly efficient" samples, so relative to the base
  batch ``B₀`` the statistical efficiency of one sample is::

      E(B) = (B_noise + B₀) / (B_noise + B)          (1 at B = B₀, falls as B grows)

  and the goodput is ``throughput(B) · E(B)`` with ``throughput(B) = B / time(B)``
  (samples per second, ``time`` the seconds of one optimizer step of ``B`` samples).
  For ``time(B) = α + βB`` the goodput ``B (B_noise + B₀) / ((α + βB)(B_noise + B))`` has
  one maximum, at ``B* = sqrt(α B_noise / β)``: ``d log/dB = 1/B − β/(α+βB) − 1/(B_noise+B)``
  vanishes where ``α B_noise = β B²``. On the grid the best size is a grid neighbour of
  ``B*`` (the goodput is unimodal); any other ``time`` is searched over the grid.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Callable, List, Optional, Sequence, Tuple

StepTime = Callable[[float], float]
MAX_SEARCH = 4096  # grid points a callable step time is evaluated at, at most


def grid_bounds(min_batch: int, max_batch: int, q: int) -> Tuple[int, int]:
    """``(lo, hi)``: the smallest multiple of ``q`` at least ``min_batch`` and the largest at
    most ``max_batch``."""
    lo = -(-int(min_batch) // q) * q
    hi = int(max_batch) // q * q
    if lo > hi or hi < q:
        raise ValueError(f"no multiple of {q} lies in [min_batch={min_batch}, max_batch={max_batch}]")
    return lo, hi


def round_to_grid(b: float, q: int, lo: int, hi: int) -> int:
    """The multiple of ``q`` nearest ``b``, clipped to ``[lo, hi]`` (``b`` finite)."""
    return int(min(hi, max(lo, q * math.floor(b / q + 0.5))))


def split(b: int, max_device_batch: Optional[int]) -> List[int]:
    """``b`` samples as ``ceil(b / max_device_batch)`` micro-batches whose sizes differ by
    at most one (``[b]`` when there is no limit)."""
    if not max_device_batch or b <= max_device_batch:
        return [b]
    n = -(-b // max_device_batch)
    return [b // n + (1 if i < b % n else 0) for i in range(n)]


def efficiency(b: float, b_noise: float, b0: float) -> float:
    """``E(B) = (B_noise + B₀)/(B_noise + B)``: one sample of a size-``b`` batch is worth
    ``E`` samples of a size-``b0`` batch."""
    return (b_noise + b0) / (b_noise + b)


def goodput(b: float, b_noise: float, b0: float, step_time: StepTime) -> float:
    """``(b / step_time(b)) · E(b)``: base-batch-equivalent samples per second."""
    return b / step_time(b) * efficiency(b, b_noise, b0)


def proportional(b_simple: float, c: float, q: int, lo: int, hi: int) -> int:
    """``c · B_simple`` on the grid."""
    return round_to_grid(c * b_simple, q, lo, hi)


def linear_optimum(alpha: float, beta: float, b_noise: float) -> float:
    """``B* = sqrt(α B_noise / β)``, the goodput maximiser for ``time(B) = α + βB``."""
    return math.sqrt(max(alpha, 0.0) * max(b_noise, 0.0) / beta)


def candidates(q: int, lo: int, hi: int) -> List[int]:
    """The grid; beyond :data:`MAX_SEARCH` points a geometric subset of it (ends kept)."""
    n = (hi - lo) // q + 1
    if n <= MAX_SEARCH:
        return list(range(lo, hi + 1, q))
    ratio = (hi / lo) ** (1.0 / (MAX_SEARCH - 1))
    return sorted({round_to_grid(lo * ratio**i, q, lo, hi) for i in range(MAX_SEARCH)} | {lo, hi})


def best_goodput(b_noise: float, b0: float, q: int, lo: int, hi: int,
                 step_time: StepTime, linear: Optional[Tuple[float, float]] = None) -> int:
    """The grid size of highest goodput. With ``linear=(α, β)`` (``step_time`` is then
    ``α + βB``) only the two grid neighbours of ``B*`` are compared; else the grid is
    searched (:func:`candidates`). Ties go to the smaller size."""
    if linear is not None:
        star = linear_optimum(linear[0], linear[1], b_noise)
        below = int(min(hi, max(lo, math.floor(star / q) * q)))
        pool: Sequence[int] = sorted({below, min(hi, below + q)})
    else:
        pool = candidates(q, lo, hi)
    best, best_g = pool[0], -math.inf
    for b in pool:
        g = goodput(b, b_noise, b0, step_time)
        if g > best_g:
            best, best_g = b, g
    return best


class LinearStepTime:
    """``time(B) = α + βB`` fitted by least squares to the last ``window`` reported
    ``(B, seconds)`` of optimizer steps.

    The fit is undetermined (:meth:`fit` returns None) below two distinct batch sizes or
    when the slope comes out ``β ≤ 0``; a negative intercept is read as ``α = 0``.
    """

    def __init__(self, window: int = 64):
        self.points: deque = deque(maxlen=int(window))

    def add(self, batch_size: int, seconds: float) -> None:
        """One optimizer step of ``batch_size`` samples took ``seconds``."""
        self.points.append((float(batch_size), float(seconds)))

    def fit(self) -> Optional[Tuple[float, float]]:
        """``(α, β)``, or None when undetermined."""
        n = len(self.points)
        if n < 2:
            return None
        mb = sum(b for b, _ in self.points) / n
        mt = sum(t for _, t in self.points) / n
        var = sum((b - mb) ** 2 for b, _ in self.points)
        if var <= 1e-12 * max(mb * mb, 1.0):
            return None
        beta = sum((b - mb) * (t - mt) for b, t in self.points) / var
        if not (beta > 0 and math.isfinite(beta)):
            return None
        return max(mt - beta * mb, 0.0), beta

    def state_dict(self) -> dict:
        return {"window": self.points.maxlen, "points": [list(p) for p in self.points]}

    def load_state_dict(self, state: dict) -> None:
        self.points = deque((tuple(p) for p in state["points"]), maxlen=int(state["window"]))
