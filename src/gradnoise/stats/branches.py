"""The critical batch size read from branches of training (pure maths on loss curves).

A branch is a short run from one checkpoint at batch size ``B``; its held-out loss curve is
``[(samples, steps, loss), …]``, the first point the checkpoint. Two readings:

* **McCandlish et al. (2018)**, the local trade-off: the steps ``S(B)`` each batch size
  takes to bring the held-out loss to a common target follow ``S = S_min (1 + B_noise/B)``
  (:func:`~gradnoise.stats.fits.fit_hyperbolic`); ``B_noise = E_min/S_min`` is the batch
  beyond which steps stop falling in proportion. The target is 80 % of the way from the
  checkpoint's loss to where the parent's own batch size gets on the budget
  (:func:`common_target`).
* **Merrill et al. (2025)**, the largest batch that does not waste data: after a fixed
  budget of samples, the largest ``B`` whose median loss is within ``tolerance`` of the
  way from the checkpoint to the best median loss, ``L(B) − L_best ≤ tol·(L₀ − L_best)``
  (:func:`largest_within`).

Intervals come from a bootstrap over seeds: each batch size's seeds resampled with
replacement, the reading redone, the 2.5 and 97.5 percentiles taken (with three seeds a
rough interval, as the number of seeds allows). ``B_noise``'s interval is the hull of that
and the fit's residual bootstrap (:func:`~gradnoise.stats.fits.fit_hyperbolic`): the
medians also stray from the law itself, which the seeds' scatter alone does not show.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .fits import fit_hyperbolic

Curve = Sequence[Sequence[float]]   # [(samples, steps, loss), ...]
SPAN = 1e3  # B_noise is searched in [min B / SPAN, max B · SPAN]; an interval end there is unbounded


def crossing(curve: Curve, target: float) -> Optional[Tuple[float, float]]:
    """``(steps, samples)`` where the curve first reaches ``loss ≤ target``, linearly
    interpolated between evaluations; None when it never does."""
    prev = None
    for e, s, loss in curve:
        if math.isfinite(loss) and loss <= target:
            if prev is None or not math.isfinite(prev[2]):
                return float(s), float(e)
            f = (prev[2] - target) / (prev[2] - loss)
            return prev[1] + f * (s - prev[1]), prev[0] + f * (e - prev[0])
        prev = (e, s, loss)
    return None


def loss_at(curve: Curve, samples: float) -> float:
    """The held-out loss after ``samples`` samples, linearly interpolated (NaN past the
    curve's end or where it is not finite)."""
    pts = [(e, loss) for e, _, loss in curve]
    for (e0, l0), (e1, l1) in zip(pts, pts[1:]):
        if e0 <= samples <= e1:
            return l0 if e1 == e0 else l0 + (samples - e0) / (e1 - e0) * (l1 - l0)
    return pts[-1][1] if pts and pts[-1][0] == samples else math.nan


def common_target(start: float, base_losses: Sequence[float], fraction: float = 0.8) -> float:
    """The target loss: ``start − fraction·δ``, ``δ = start − median`` of the base batch
    size's branches' losses at the budget; NaN when they do not lower the loss (``δ ≤ 0``)."""
    med = float(np.median([v if math.isfinite(v) else math.inf for v in base_losses]))
    drop = start - med
    return start - fraction * drop if math.isfinite(drop) and drop > 0 else math.nan


def _spread(values: Sequence[float]) -> List[float]:
    """The 2.5 and 97.5 percentiles of a few seeds' values, taken at observed values (a
    diverged branch's ``inf`` stays ``inf``, never an interpolated NaN)."""
    v = np.asarray(values, dtype=float)
    return [float(np.percentile(v, 2.5, method="lower")), float(np.percentile(v, 97.5, method="higher"))]


def _medians(by_batch: Dict[int, List[float]]) -> Dict[int, float]:
    return {b: float(np.median(v)) for b, v in by_batch.items() if v}


def mccandlish(steps_by_batch: Dict[int, List[float]], n_boot: int = 200, seed: int = 0
               ) -> Dict[str, object]:
    """``B_noise`` from the steps to the target (``inf`` for a branch that missed it).

    Returns ``{"b_noise", "interval", "s_min", "e_min", "points", "reason"}``: ``points``
    the median steps per batch size; ``b_noise`` None with a ``reason`` when fewer than
    three batch sizes have a finite median, or the bend lies outside the sweep."""
    med = {b: m for b, m in _medians(steps_by_batch).items() if math.isfinite(m) and m > 0}
    points = [[b, med[b]] for b in sorted(med)]
    out: Dict[str, object] = {"b_noise": None, "interval": [None, None], "s_min": None, "e_min": None,
                              "points": points, "reason": None}
    if len(med) < 3:
        out["reason"] = f"only {len(med)} batch size(s) reached the target in most seeds (3 are needed)"
        return out
    fit = fit_hyperbolic(list(med), list(med.values()), s=1.0, n_boot=n_boot, seed=seed, span=SPAN)
    if fit.at_bound:
        out["reason"] = ("the steps do not bend within the sweep (every batch size far above or below B_noise): "
                         "widen --batch-sizes")
        return out
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        res = {b: float(np.median(rng.choice(v, size=len(v)))) for b, v in steps_by_batch.items() if v}
        res = {b: m for b, m in res.items() if math.isfinite(m) and m > 0}
        if len(res) >= 3:
            refit = fit_hyperbolic(list(res), list(res.values()), s=1.0, n_boot=0, span=SPAN)
            if not refit.at_bound:  # a resample whose bend leaves the search range says nothing of c
                boots.append(refit.c)
    ends = [(float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5)))] if boots else []
    ends += [fit.interval] if all(math.isfinite(x) for x in fit.interval) else []
    # the hull of both: the seeds' scatter, and how far the points stray from the law
    lo, hi = (min(e[0] for e in ends), max(e[1] for e in ends)) if ends else (math.nan, math.nan)
    # an end at the fit's search range is no bound at all: the data do not limit it there
    lo = 0.0 if lo <= min(med) / SPAN * (1 + 1e-6) else lo
    hi = math.inf if hi >= max(med) * SPAN / (1 + 1e-6) else hi
    out.update(b_noise=fit.c, interval=[float(lo), float(hi)], s_min=fit.a, e_min=fit.a * fit.c)
    return out


def largest_within(start: float, loss_by_batch: Dict[int, List[float]], tolerance: float,
                   n_boot: int = 200, seed: int = 0) -> Dict[str, object]:
    """Merrill's critical batch: the largest ``B`` whose median loss at the budget is within
    ``tolerance`` of the way from ``start`` to the best median loss.

    Returns ``{"b_crit", "interval", "tolerance", "best_loss", "losses", "reason"}``;
    ``losses`` ``[B, median, [low, high]]`` (percentile interval over seeds); ``b_crit``
    None with a ``reason`` when the best batch size does not lower the loss, or every batch
    size is within the tolerance (the bend lies above the sweep: a lower bound only)."""
    def pick(med: Dict[int, float]) -> Tuple[Optional[int], float]:
        best = min(med.values())
        if not (math.isfinite(best) and best < start):
            return None, best
        ok = [b for b, m in med.items() if math.isfinite(m) and m - best <= tolerance * (start - best)]
        return max(ok), best

    med = _medians({b: [v if math.isfinite(v) else math.inf for v in vals] for b, vals in loss_by_batch.items()})
    losses = [[b, med[b], _spread(loss_by_batch[b])] for b in sorted(med)]
    b_crit, best = pick(med)
    out: Dict[str, object] = {"b_crit": b_crit, "interval": [None, None], "tolerance": tolerance,
                              "best_loss": best, "losses": losses, "reason": None}
    if b_crit is None:
        out["reason"] = "no batch size lowered the held-out loss within the budget: raise --budget"
        return out
    if b_crit == max(med):
        out["reason"] = (f"every batch size up to the largest ({b_crit}) is within the tolerance: the critical "
                         "batch is at least that (widen --batch-sizes)")
    rng = np.random.default_rng(seed)
    picks = []
    for _ in range(n_boot):
        res = {b: float(np.median(rng.choice(v, size=len(v)))) for b, v in loss_by_batch.items() if v}
        b, _ = pick(res)
        if b is not None:
            picks.append(b)
    if picks:
        out["interval"] = [float(np.percentile(picks, 2.5)), float(np.percentile(picks, 97.5))]
    return out


def ratio_interval(num: Sequence[Optional[float]], den: Sequence[Optional[float]]) -> List[float]:
    """A conservative interval of ``a/b`` from intervals of ``a`` and ``b`` (each ≥ 0):
    ``[a_lo/b_hi, a_hi/b_lo]`` (0 where ``b_hi`` is unbounded, ``inf`` where ``b_lo`` is 0);
    ``[nan, nan]`` where an end is unknown."""
    a_lo, a_hi, b_lo, b_hi = (math.nan if v is None else float(v) for v in (*num, *den))
    if any(math.isnan(v) for v in (a_lo, a_hi, b_lo, b_hi)):
        return [math.nan, math.nan]
    lo = a_lo / b_hi if b_hi > 0 else math.inf
    hi = a_hi / b_lo if b_lo > 0 else math.inf
    return [float(lo), float(hi)]


__all__ = ["common_target", "crossing", "largest_within", "loss_at", "mccandlish", "ratio_interval"]
