"""Fitting the batch-size laws of McCandlish et al. (2018) to measured points.

Both laws have the form ``y(B) = A · (1 + C/B)^s``:

* steps to a target: ``S(B) = S_min (1 + B_crit/B)`` (``s = +1``), the same as
  ``(S/S_min − 1)(E/E_min − 1) = 1`` with ``E = S·B`` and ``B_crit = E_min/S_min``;
* the best (or largest stable) learning rate: ``ε(B) = ε_max / (1 + B_noise/B)``
  (``s = −1``).

The fit is least squares on ``log y`` (the points span decades, and their scatter is
roughly multiplicative). For a fixed ``C`` the best ``log A`` is the mean of
``log y − s log(1 + C/B)``, so only ``log C`` is searched. The interval is a residual
bootstrap: resample the log-residuals of the fit (inflated by ``√(n/(n − 2))`` for the
two fitted parameters), refit, take the 2.5 and 97.5 percentiles of ``C``.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence, Tuple

import numpy as np
from scipy.optimize import minimize_scalar


class HyperbolicFit(NamedTuple):
    """``y(B) = a (1 + c/B)^s``.

    Attributes:
        a: ``S_min`` or ``ε_max``.
        c: ``B_crit`` or ``B_noise``.
        interval: 95 % bootstrap interval of ``c`` (NaN when not computed).
        rms: root-mean-square log-residual of the fit.
        at_bound: True when ``c`` sits at an end of the searched range (the points do
            not show the bend: all far above or all far below ``c``).
        s: the exponent, ``+1`` (steps) or ``−1`` (learning rates).
    """

    a: float
    c: float
    interval: Tuple[float, float]
    rms: float
    at_bound: bool

    s: float = 1.0

    def __call__(self, b):
        """``a (1 + c/B)^s`` at batch sizes ``b``."""
        return self.a * (1.0 + self.c / np.asarray(b, dtype=float)) ** self.s


def _profile(b: np.ndarray, logy: np.ndarray, s: float, logc: float) -> Tuple[float, float]:
    """``(log a, sse)`` at ``c = exp(logc)``."""
    g = s * np.log1p(np.exp(logc) / b)
    loga = float(np.mean(logy - g))
    return loga, float(np.sum((logy - loga - g) ** 2))


def _fit_logc(b: np.ndarray, logy: np.ndarray, s: float, lo: float, hi: float) -> float:
    res = minimize_scalar(lambda lc: _profile(b, logy, s, lc)[1], bounds=(lo, hi), method="bounded",
                          options={"xatol": 1e-6})
    # the bounded search can miss a better end point on flat profiles: compare
    cands = [res.x, lo, hi]
    return min(cands, key=lambda lc: _profile(b, logy, s, lc)[1])


def fit_hyperbolic(batch_sizes: Sequence[float], values: Sequence[float], s: float = 1.0,
                   n_boot: int = 2000, seed: int = 0, span: float = 1e3) -> HyperbolicFit:
    """Fit ``y(B) = a (1 + c/B)^s`` by least squares in ``log y``.

    Args:
        batch_sizes: ``B`` of each point, ``[n]``, positive.
        values: ``y`` of each point, ``[n]``, positive (steps, or learning rates).
        s: ``+1`` for steps, ``−1`` for learning rates.
        n_boot: bootstrap resamples for the interval (0: no interval).
        seed: for the bootstrap.
        span: ``c`` is searched in ``[min B / span, max B · span]``.

    Raises:
        ValueError: fewer than 3 points, or a non-positive or non-finite value.
    """
    b = np.asarray(batch_sizes, dtype=float)
    y = np.asarray(values, dtype=float)
    if b.shape != y.shape or b.ndim != 1:
        raise ValueError("batch_sizes and values must be 1-D of the same length")
    if len(b) < 3 or len(np.unique(b)) < 2:
        raise ValueError(f"need at least 3 points at 2 or more batch sizes, got {len(b)}")
    if not (np.all(np.isfinite(b)) and np.all(np.isfinite(y)) and np.all(b > 0) and np.all(y > 0)):
        raise ValueError("batch sizes and values must be finite and positive")
    logy = np.log(y)
    lo, hi = math.log(b.min() / span), math.log(b.max() * span)
    logc = _fit_logc(b, logy, s, lo, hi)
    loga, sse = _profile(b, logy, s, logc)
    at_bound = min(logc - lo, hi - logc) < 1e-3 * (hi - lo)
    interval = (math.nan, math.nan)
    if n_boot > 0:
        fitted = loga + s * np.log1p(math.exp(logc) / b)
        resid = (logy - fitted) * math.sqrt(len(b) / (len(b) - 2))  # undo the shrinkage of 2 fitted parameters
        rng = np.random.default_rng(seed)
        cs = np.empty(n_boot)
        for i in range(n_boot):
            cs[i] = _fit_logc(b, fitted + rng.choice(resid, size=len(resid), replace=True), s, lo, hi)
        lo_c, hi_c = np.percentile(cs, [2.5, 97.5])
        interval = (math.exp(lo_c), math.exp(hi_c))
    return HyperbolicFit(math.exp(loga), math.exp(logc), interval, math.sqrt(sse / len(b)), at_bound, s)


def frontier(b: np.ndarray, s_min: float, b_crit: float) -> Tuple[np.ndarray, np.ndarray]:
    """Steps and examples to the target at batch sizes ``b`` (shape ``[n]``), on the law
    ``S(B) = S_min (1 + B_crit/B)`` and ``E = S·B = E_min (1 + B/B_crit)`` with
    ``E_min = S_min B_crit``: the points of the frontier ``(S/S_min − 1)(E/E_min − 1) = 1``
    (``B_crit/B`` times ``B/B_crit``). Returns ``(S, E)``, each of shape ``[n]``."""
    b = np.asarray(b, dtype=float)
    steps = s_min * (1.0 + b_crit / b)
    return steps, steps * b


def frontier_examples(steps: np.ndarray, s_min: float, e_min: float) -> np.ndarray:
    """``E`` on the curve ``(S/S_min − 1)(E/E_min − 1) = 1`` for ``S > S_min``: the
    :func:`frontier` at the batch size ``B = B_crit/(S/S_min − 1)`` that takes ``S`` steps."""
    b_crit = e_min / s_min
    b = b_crit / (np.asarray(steps, dtype=float) / s_min - 1.0)
    return frontier(b, s_min, b_crit)[1]
