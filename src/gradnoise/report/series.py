"""The step lines of a ``gradnoise-run`` file as arrays for plotting.

Smoothed ``tr(Σ)`` and ``|G|²`` are debiased EMAs (decay ``β`` = the header's ``beta``)
of the steps that were not skipped. Replaying those EMAs with
:mod:`gradnoise.stats.smoothing` gives their variances, hence a 95 % band
``T̄ ± 1.96·sqrt(Var T̄)`` for each; the band is dropped when the replay does not match
the smoothed values in the file (a run continued from a checkpoint, say).

The per-layer values, with their own replayed 95 % bands, come from
:mod:`gradnoise.report.layers`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from ..stats import smoothing
from .fmt import floats, interval, to_float
from .layers import MAX_LAYERS, LayerNoise, layer_of, layer_series

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
            (±inf where unbounded, NaN where undefined).
        bands: ``"trace_cov"``/``"grad_sq_norm"`` -> ``(low, high)`` of the replayed
            95 % band; empty when it could not be replayed.
        layers: layer name -> its smoothed noise and ``B_simple`` with a 95 % band
            (:class:`~gradnoise.report.layers.LayerNoise`), at most
            :data:`MAX_LAYERS` layers, largest final ``tr(Σ)`` first.
        n_layers: how many layers the run file has in all.
    """

    step: np.ndarray
    skipped: np.ndarray
    raw: Dict[str, np.ndarray]
    smoothed: Dict[str, np.ndarray]
    b_band: Tuple[np.ndarray, np.ndarray]
    bands: Dict[str, Tuple[np.ndarray, np.ndarray]]
    layers: Dict[str, LayerNoise]
    n_layers: int

    @property
    def empty(self) -> bool:
        """True when no step has a finite smoothed or raw value."""
        values = list(self.raw.values()) + list(self.smoothed.values())
        return not any(np.isfinite(v).any() for v in values)


KEYS = ("trace_cov", "grad_sq_norm", "b_simple")


def _column(steps: Steps, part: str, key: str) -> np.ndarray:
    return floats([(s.get(part) or {}).get(key) for s in steps])


def noise_series(header: Dict[str, Any], steps: Steps) -> NoiseSeries:
    """Arrays of a run file's steps (:func:`gradnoise.read_run`'s output)."""
    smoothed = {k: _column(steps, "smoothed", k) for k in KEYS}
    pairs = [interval(s.get("b_simple_interval")) for s in steps]
    low = np.array([p[0] for p in pairs], dtype=np.float64)
    high = np.array([p[1] for p in pairs], dtype=np.float64)
    beta = to_float(header.get("beta"))
    layers, n_layers = layer_series(steps, beta)
    return NoiseSeries(
        step=floats([s.get("step") for s in steps]),
        skipped=np.array([bool(s.get("skipped")) for s in steps], dtype=bool),
        raw={k: _column(steps, "raw", k) for k in KEYS},
        smoothed=smoothed,
        b_band=(low, high),
        bands=replay_bands(steps, beta, smoothed),
        layers=layers,
        n_layers=n_layers,
    )


def replay_bands(steps: Steps, beta: float, smoothed: Dict[str, np.ndarray]
                 ) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """95 % bands of the smoothed ``tr(Σ)`` and ``|G|²`` from the replayed EMAs.

    Returns:
        ``{"trace_cov": (low, high), "grad_sq_norm": (low, high)}`` with arrays of shape
        ``[n_steps]`` (NaN before two steps were folded in), or ``{}`` when ``beta`` is
        not a valid decay or the replay disagrees with ``smoothed``.
    """
    if not (0.0 <= beta < 1.0):
        return {}
    n = len(steps)
    mean = np.full((2, n), np.nan)
    sd = np.full((2, n), np.nan)
    state = smoothing.init()
    for i, s in enumerate(steps):
        raw = s.get("raw") or {}
        t, g = to_float(raw.get("trace_cov")), to_float(raw.get("grad_sq_norm"))
        if not s.get("skipped") and math.isfinite(t) and math.isfinite(g):
            state = smoothing.update(state, t, g, beta)
        mean[:, i] = smoothing.means(state, beta)
        v_t, v_s, _ = smoothing.covariance(state, beta)
        sd[:, i] = math.sqrt(v_t), math.sqrt(v_s)
    for row, key in enumerate(("trace_cov", "grad_sq_norm")):
        both = np.isfinite(mean[row]) & np.isfinite(smoothed[key])
        scale = np.maximum(np.abs(smoothed[key][both]), 1e-300)
        if np.any(np.abs(mean[row][both] - smoothed[key][both]) > 1e-6 * scale):
            return {}
    half = smoothing.Z95 * sd
    return {key: (mean[row] - half[row], mean[row] + half[row])
            for row, key in enumerate(("trace_cov", "grad_sq_norm"))}


def last_finite(values: np.ndarray) -> Optional[int]:
    """Index of the last finite entry of a 1-D array, or None."""
    idx = np.flatnonzero(np.isfinite(values))
    return int(idx[-1]) if idx.size else None


def first_finite(values: np.ndarray) -> Optional[int]:
    """Index of the first finite entry of a 1-D array, or None."""
    idx = np.flatnonzero(np.isfinite(values))
    return int(idx[0]) if idx.size else None


__all__ = ["KEYS", "MAX_LAYERS", "NoiseSeries", "first_finite", "last_finite", "layer_of", "noise_series",
           "replay_bands"]
