"""Megatron-LM's batch-size ramp-up, and the ramp that best fits a gradnoise schedule.

Megatron (``--rampup-batch-size <start> <increment> <samples> --global-batch-size <final>``,
its ``RampupBatchsizeNumMicroBatches`` calculator) grows the global batch linearly in
consumed samples ``c``::

    n   = (final − start) / increment               (whole: increment divides final − start)
    B(c) = start + ⌊c / (samples/n)⌋ · increment     for c ≤ samples,   final after.

The fit. ``start`` is the schedule's first size and ``final`` its last; ``increment``
runs over the multiples of the schedule's base batch that divide ``final − start``
(so every ramp size is a multiple of the base, at most :data:`MAX_INCREMENTS` steps);
``samples`` over the values that put one of the ramp's jumps on one of the schedule's
switches or on the run's end (the area below is piecewise linear in ``samples``, so
its minimum lies at such a value). Chosen: the smallest area
``∫₀ᴴ |B_megatron(c) − B_schedule(c)| dc`` (``H`` the later of the run's end and the
ramp's) among the ramps that stay within one increment of the schedule everywhere,
ties to the smaller increment. A single increment (``final − start``) always
qualifies, so a fit exists whenever the schedule grows.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

from .schedule import Schedule

MAX_INCREMENTS = 128  # ramp steps a candidate increment may take, at most


class Ramp(NamedTuple):
    """``--rampup-batch-size start increment samples --global-batch-size global_batch``,
    with its largest deviation from the schedule (samples per batch) and its mean over
    the run's samples."""

    start: int
    increment: int
    samples: int
    global_batch: int
    max_error: float
    mean_error: float

    @property
    def args(self) -> str:
        return (f"--rampup-batch-size {self.start} {self.increment} {self.samples} "
                f"--global-batch-size {self.global_batch}")


def megatron_batch(consumed: float, start: int, increment: int, samples: int, final: int) -> int:
    """Megatron's global batch after ``consumed`` samples (module docstring)."""
    if consumed > samples:
        return final
    n = (final - start) // increment
    return start + int(consumed / (samples / n)) * increment


def _steps(sched: Sequence[Tuple[int, int]], consumed: float) -> int:
    size = sched[0][1]
    for at, b in sched:
        if at <= consumed:
            size = b
    return size


def deviation(sched: Sequence[Tuple[int, int]], horizon: int, start: int, increment: int, samples: int,
              final: int) -> Tuple[float, float]:
    """``(max |ΔB|, ∫|ΔB| dc)`` over ``[0, max(horizon, samples)]`` between a ramp and a
    step schedule ``[(samples_from, batch)]`` (both piecewise constant, evaluated mid-piece)."""
    n = (final - start) // increment
    end = max(horizon, samples)
    cuts = sorted({0.0, float(end)} | {float(a) for a, _ in sched if a < end}
                  | {samples * k / n for k in range(1, n + 1)})
    worst = area = 0.0
    for a, b in zip(cuts, cuts[1:]):
        if b <= a:
            continue
        mid = 0.5 * (a + b)
        d = abs(megatron_batch(mid, start, increment, samples, final) - _steps(sched, mid))
        worst, area = max(worst, d), area + d * (b - a)
    return worst, area


def _increments(base: int, span: int) -> List[int]:
    return [base * d for d in range(1, span // base + 1)
            if (span // base) % d == 0 and span // (base * d) <= MAX_INCREMENTS]


def fit(schedule: Schedule) -> Optional[Ramp]:
    """The Megatron ramp that best fits ``schedule`` (module docstring); None when the
    schedule never grows (a constant ``--global-batch-size``)."""
    segs = schedule.segments
    start, final = segs[0].batch_size, segs[-1].batch_size
    if final == start:
        return None
    sched = [(s.samples, s.batch_size) for s in segs]
    horizon = max(schedule.run_samples, segs[-1].samples)
    marks = [a for a, _ in sched[1:]] + [horizon]
    best, best_key = None, None
    for inc in _increments(schedule.base_batch, final - start):
        n = (final - start) // inc
        for r in sorted({max(1, round(m * n / k)) for m in marks for k in range(1, n + 1)}):
            worst, area = deviation(sched, horizon, start, inc, r, final)
            key = (area, inc)
            if worst <= inc and (best_key is None or key < best_key):
                best, best_key = (inc, r, worst, area), key
    inc, r, worst, area = best
    return Ramp(start, inc, r, final, worst, area / max(horizon, r))
