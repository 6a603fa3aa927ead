"""Learning-rate rules for a change of batch size, ``B -> B'`` (scale ``k = B'/B``).

* linear (Goyal et al., 2017): ``ε' = ε k`` — right while the batch is well below the
  noise scale, where a step's progress is proportional to its sample count;
* square root (Hoffer et al., 2017; Krizhevsky, 2014): ``ε' = ε √k`` — keeps the
  variance of the update ``ε² tr(Σ)/B`` fixed;
* AdaScale (Johnson et al., 2020): ``ε' = ε r`` with the gain ratio
  ``r = (tr(Σ)/B + |G|²) / (tr(Σ)/B' + |G|²) = (1 + B_noise/B) / (1 + B_noise/B')``,
  which moves from ``k`` (noise-dominated, ``B' ≪ B_noise``) to 1 (``B ≫ B_noise``).
  It is the same law as the optimal step ``ε(B) = ε_max/(1 + B_noise/B)`` of
  McCandlish et al. (2018).

The rules return multipliers of the learning rate, so ``lr_new = multiplier * lr_old``;
:func:`optimal_lr` is the law itself. For an Adam-type optimizer the AdaScale gain of its
preconditioned noise is taken as ``√r`` (AdaptDL's rule, :func:`adam_sqrt`). The one place
these decision formulas live: the controls, the studies and the report import them.
"""
from __future__ import annotations

import math


def _check(b_from: float, b_to: float) -> None:
    if not (b_from > 0 and b_to > 0):
        raise ValueError(f"batch sizes must be positive, got {b_from} -> {b_to}")


def linear(b_from: float, b_to: float) -> float:
    """``B'/B``."""
    _check(b_from, b_to)
    return b_to / b_from


def sqrt(b_from: float, b_to: float) -> float:
    """``√(B'/B)``."""
    _check(b_from, b_to)
    return math.sqrt(b_to / b_from)


def adascale(b_from: float, b_to: float, b_noise: float) -> float:
    """``(1 + B_noise/B) / (1 + B_noise/B')``; NaN when ``b_noise`` is not a finite
    non-negative number (the noise scale is unknown)."""
    _check(b_from, b_to)
    if not (math.isfinite(b_noise) and b_noise >= 0):
        return math.nan
    return (1.0 + b_noise / b_from) / (1.0 + b_noise / b_to)


def adam_sqrt(b_from: float, b_to: float, b_noise: float) -> float:
    """``√((1 + B_noise/B) / (1 + B_noise/B'))``: AdaScale's gain for an Adam-type optimizer,
    ``B_noise`` the noise scale of its preconditioned gradient; NaN when it is unknown."""
    return math.sqrt(adascale(b_from, b_to, b_noise))


def optimal_lr(b: float, eps_max: float, b_noise: float) -> float:
    """``ε(B) = ε_max / (1 + B_noise/B)`` (McCandlish et al., 2018, eq. 2.6)."""
    if b <= 0:
        raise ValueError(f"batch size must be positive, got {b}")
    return eps_max / (1.0 + b_noise / b)
