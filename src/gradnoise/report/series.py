"""The step lines of a ``gradnoise-run`` file as arrays for plotting.

Smoothed ``tr(Σ)`` and ``|G|²`` are debiased EMAs (decay ``β`` = the header's ``beta``)
of the steps that were not skipped. Replaying those EMAs with
:mod:`gradnoise.stats.smoothing` gives their variances, hence a 95 % band
``T̄ ± 1.96·sqrt(Var T̄)`` for each; the band is dropped when the replay does not match
the smoothed values in the file (a run continued from a checkpoint, say).

Everything is additive over parameters, and so are the EMAs (they are linear), so the
smoothed ``B_simple`` of a layer ``"a.b"`` is ``Σ_p tr(Σ_p) / Σ_p |G_p|²`` over its
parameters ``"a.b.weight"``, ``"a.b.bias"``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..stats import smoothing
from .fmt import floats, interval, to_float

Steps = Sequence[Dict[str, Any]]
MAX_LAYERS = 10


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
        layers: layer name -> smoothed ``B_simple`` of the layer, at most
            :data:`MAX_LAYERS` layers, largest final ``tr(Σ)`` first.
        n_layers: how many layers the run file has in all.
    """

    step: np.ndarray
    skipped: np.ndarray
    raw: Dict[str, np.ndarray]
    smoothed: Dict[str, np.ndarray]
    b_band: Tuple[np.ndarray, np.ndarray]
    bands: Dict[str, Tuple[np.ndarray, np.ndarray]]
    layers: Dict[str, np.ndarray]
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
    layers, n_layers = layer_b_simple(steps)
    return NoiseSeries(
        step=floats([s.get("step") for s in steps]),
        skipped=np.array([bool(s.get("skipped")) for s in steps], dtype=bool),
        raw={k: _column(steps, "raw", k) for k in KEYS},
        smoothed=smoothed,
        b_band=(low, high),
        bands=replay_bands(steps, to_float(header.get("beta")), smoothed),
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


def layer_of(param: str) -> str:
    """``"a.b.weight"`` -> ``"a.b"``; a name without a dot is its own layer."""
    return param.rsplit(".", 1)[0] if "." in param else param


def _layer_sums(steps: Steps) -> Dict[str, np.ndarray]:
    """Layer -> array ``[2, n_steps]`` of summed smoothed ``tr(Σ)`` and ``|G|²``."""
    names: List[str] = []
    for s in steps:
        for name in (s.get("by_param") or {}):
            if name not in names:
                names.append(name)
    sums: Dict[str, np.ndarray] = {}
    for name in names:
        part = [((s.get("by_param") or {}).get(name) or {}).get("smoothed") or {} for s in steps]
        values = np.array([[to_float(p.get("trace_cov")), to_float(p.get("grad_sq_norm"))] for p in part],
                          dtype=np.float64).reshape(-1, 2).T
        layer = layer_of(name)
        sums[layer] = sums[layer] + values if layer in sums else values
    return sums


def layer_b_simple(steps: Steps, limit: int = MAX_LAYERS) -> Tuple[Dict[str, np.ndarray], int]:
    """Smoothed ``B_simple`` per layer (at most ``limit``, largest final ``tr(Σ)`` first).

    Returns:
        ``(layers, n_layers)``: layer name -> array ``[n_steps]`` (NaN where the layer's
        ``|G|² ≤ 0`` or undefined), and the number of layers in the file.
    """
    sums = _layer_sums(steps)

    def final_trace(item: Tuple[str, np.ndarray]) -> float:
        finite = item[1][0][np.isfinite(item[1][0])]
        return -float(finite[-1]) if finite.size else math.inf

    ranked = sorted(sums.items(), key=final_trace)[:limit]
    out: Dict[str, np.ndarray] = {}
    for layer, (t, g) in ranked:
        with np.errstate(divide="ignore", invalid="ignore"):
            out[layer] = np.where(g > 0, t / g, np.nan)
    return out, len(sums)


def last_finite(values: np.ndarray) -> Optional[int]:
    """Index of the last finite entry of a 1-D array, or None."""
    idx = np.flatnonzero(np.isfinite(values))
    return int(idx[-1]) if idx.size else None


def first_finite(values: np.ndarray) -> Optional[int]:
    """Index of the first finite entry of a 1-D array, or None."""
    idx = np.flatnonzero(np.isfinite(values))
    return int(idx[0]) if idx.size else None
