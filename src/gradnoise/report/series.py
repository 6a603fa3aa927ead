"""The step lines of a ``gradnoise-run`` file as arrays for plotting.

Everything is read from the file as the monitor wrote it (:mod:`gradnoise.formats`):
smoothed values, the 95 % intervals of the smoothed ``tr(Σ)``, ``|G|²`` and ``B_simple``
(clipped to ``[0, inf)``), and the per-layer values (:mod:`gradnoise.report.layers`). A
version-1 file has no intervals for ``tr(Σ)`` and ``|G|²``, so those bands are absent.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .fmt import domain_interval, floats
from .layers import PLOTTED, LayerNoise, layer_of, layer_series

Steps = Sequence[Dict[str, Any]]


@dataclass(frozen=True)
class NoiseSeries:
    """A run file's noise, step by step; every array has shape ``[n_steps]``.

    Attributes:
        step: optimizer step index.
        skipped: True where the step was not folded into the averages.
        raw: ``{"trace_cov", "grad_sq_norm", "b_simple"}`` -> this step alone.
        smoothed: the same keys -> the smoothed values.
        b_band: ``(low, high)`` of the 95 % interval of the smoothed ``B_simple``
            (``inf`` where unbounded, NaN where undefined; never below 0).
        bands: ``"trace_cov"``/``"grad_sq_norm"`` -> ``(low, high)`` of their 95 %
            intervals; empty for a version-1 file.
        layers: every layer (:class:`~gradnoise.report.layers.LayerNoise`), largest
            share of the noise first.
    """

    step: np.ndarray
    skipped: np.ndarray
    raw: Dict[str, np.ndarray]
    smoothed: Dict[str, np.ndarray]
    b_band: Tuple[np.ndarray, np.ndarray]
    bands: Dict[str, Tuple[np.ndarray, np.ndarray]]
    layers: List[LayerNoise]

    @property
    def plotted(self) -> List[LayerNoise]:
        """The layers drawn in the per-layer panel: the :data:`PLOTTED` largest shares."""
        return self.layers[:PLOTTED]

    @property
    def empty(self) -> bool:
        """True when no step has a finite smoothed or raw value."""
        values = list(self.raw.values()) + list(self.smoothed.values())
        return not any(np.isfinite(v).any() for v in values)


KEYS = ("trace_cov", "grad_sq_norm", "b_simple")


def _column(steps: Steps, part: str, key: str) -> np.ndarray:
    return floats([(s.get(part) or {}).get(key) for s in steps])


def _band(steps: Steps, key: str) -> Tuple[np.ndarray, np.ndarray]:
    pairs = [domain_interval(v) for v in (_get(s, key) for s in steps)]
    return (np.array([p[0] for p in pairs], dtype=np.float64), np.array([p[1] for p in pairs], dtype=np.float64))


def _get(step: Dict[str, Any], key: str) -> Any:
    """``b_simple_interval`` of the step, or ``smoothed.<key>`` for the others."""
    return step.get(key) if key == "b_simple_interval" else (step.get("smoothed") or {}).get(key)


def noise_series(header: Dict[str, Any], steps: Steps) -> NoiseSeries:
    """Arrays of a run file's steps (:func:`gradnoise.read_run`'s output)."""
    smoothed = {k: _column(steps, "smoothed", k) for k in KEYS}
    bands = {k: _band(steps, f"{k}_interval") for k in ("trace_cov", "grad_sq_norm")
             if any(f"{k}_interval" in (s.get("smoothed") or {}) for s in steps)}
    finite = smoothed["trace_cov"][np.isfinite(smoothed["trace_cov"])]
    return NoiseSeries(
        step=floats([s.get("step") for s in steps]),
        skipped=np.array([bool(s.get("skipped")) for s in steps], dtype=bool),
        raw={k: _column(steps, "raw", k) for k in KEYS},
        smoothed=smoothed,
        b_band=_band(steps, "b_simple_interval"),
        bands=bands,
        layers=layer_series(header, steps, float(finite[-1]) if finite.size else float("nan")),
    )


@dataclass(frozen=True)
class StepCounts:
    """How many steps a run file holds, the one definition every part of the page uses.

    Attributes:
        measured: step lines in the file ("measured steps").
        skipped: those the monitor did not fold into its averages.
        defined: those not skipped whose smoothed ``B_simple`` is defined: the steps
            the advice can read (:func:`gradnoise.stats.advice.advise`'s ``steps``).
    """

    measured: int
    skipped: int
    defined: int

    def text(self) -> str:
        """``"300 (299 with a defined smoothed B_simple; 1 skipped)"``; the number alone
        when every measured step has a defined value."""
        if self.defined == self.measured:
            return str(self.measured)
        skipped = f"; {self.skipped} skipped, not averaged" if self.skipped else ""
        return f"{self.measured} ({self.defined} with a defined smoothed B_simple{skipped})"


def step_counts(steps: Steps) -> StepCounts:
    """:class:`StepCounts` of a run file's step lines."""
    skipped = sum(bool(s.get("skipped")) for s in steps)
    defined = sum(not s.get("skipped") and (s.get("smoothed") or {}).get("b_simple") is not None for s in steps)
    return StepCounts(len(steps), skipped, defined)


@dataclass(frozen=True)
class Marks:
    """Indices of the smoothed ``B_simple`` values the page quotes (None when undefined).

    Attributes:
        first: the first value with a bounded 95 % interval (the first finite value when
            no interval is bounded).
        low: the lowest value with a bounded interval (``first`` when none is bounded).
        last: the last finite value.
    """

    first: Optional[int]
    low: Optional[int]
    last: Optional[int]


def b_simple_marks(series: NoiseSeries) -> Marks:
    """The first, lowest and last smoothed ``B_simple`` worth quoting (:class:`Marks`):
    values whose interval is unbounded above are left out where a bounded one exists."""
    b, high = series.smoothed["b_simple"], series.b_band[1]
    ok = np.flatnonzero(np.isfinite(b))
    if not ok.size:
        return Marks(None, None, None)
    bounded = np.flatnonzero(np.isfinite(b) & np.isfinite(high))
    first = int(bounded[0] if bounded.size else ok[0])
    low = int(bounded[np.argmin(b[bounded])]) if bounded.size else first
    return Marks(first, low, int(ok[-1]))


def last_finite(values: np.ndarray) -> Optional[int]:
    """Index of the last finite entry of a 1-D array, or None."""
    idx = np.flatnonzero(np.isfinite(values))
    return int(idx[-1]) if idx.size else None


def first_finite(values: np.ndarray) -> Optional[int]:
    """Index of the first finite entry of a 1-D array, or None."""
    idx = np.flatnonzero(np.isfinite(values))
    return int(idx[0]) if idx.size else None


__all__ = ["KEYS", "PLOTTED", "Marks", "NoiseSeries", "StepCounts", "b_simple_marks", "first_finite", "last_finite",
           "layer_of", "noise_series", "step_counts"]
