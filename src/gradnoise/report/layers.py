"""Per-layer noise of a ``gradnoise-run`` file: smoothed ``B_simple`` with its 95 % band.

Everything is additive over parameters, so a layer ``"a.b"`` has the noise
``T = Σ_p tr(Σ_p)`` and signal ``S = Σ_p |G_p|²`` of its parameters ``"a.b.weight"``,
``"a.b.bias"``. The raw sums of each step are folded into a debiased EMA with the
header's decay ``β`` (:mod:`gradnoise.stats.smoothing`), leaving out skipped steps and
steps whose raw sums are not finite, as the monitor does for the total. The layer's
smoothed ``B_simple`` is ``T̄/S̄`` and its band Fieller's 95 % interval.

EMAs are linear, so ``T̄`` equals the sum of the parameters' smoothed ``tr(Σ)`` in the
file. Where the replay disagrees with the file (a run continued from a checkpoint, a
parameter that joined late), the layer keeps the file's sums and has no band.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from ..stats import smoothing
from .fmt import to_float

Steps = Sequence[Dict[str, Any]]
MAX_LAYERS = 10
KEYS = ("trace_cov", "grad_sq_norm")


@dataclass(frozen=True)
class LayerNoise:
    """One layer's smoothed noise; every array has shape ``[n_steps]``.

    Attributes:
        trace_cov: smoothed ``Σ_p tr(Σ_p)`` of its parameters.
        grad_sq_norm: smoothed ``Σ_p |G_p|²``.
        b_simple: their ratio (NaN where ``|G|² ≤ 0`` or undefined).
        band: ``(low, high)`` of the 95 % interval of ``b_simple`` (±inf where
            unbounded, NaN before two steps or when the replay failed).
    """

    trace_cov: np.ndarray
    grad_sq_norm: np.ndarray
    b_simple: np.ndarray
    band: Tuple[np.ndarray, np.ndarray]


def layer_of(param: str) -> str:
    """``"a.b.weight"`` -> ``"a.b"``; a name without a dot is its own layer."""
    return param.rsplit(".", 1)[0] if "." in param else param


def layer_label(name: str) -> str:
    """A layer's name for people: nn.Sequential children ``"0"``, ``"1"`` become ``"layer 0"``."""
    return f"layer {name}" if name.isdigit() else name


def _layers(steps: Steps) -> Dict[str, List[str]]:
    """Layer -> its parameter names, in order of first appearance."""
    out: Dict[str, List[str]] = {}
    for s in steps:
        for name in (s.get("by_param") or {}):
            params = out.setdefault(layer_of(name), [])
            if name not in params:
                params.append(name)
    return out


def _sums(steps: Steps, params: Sequence[str], part: str) -> np.ndarray:
    """``[2, n_steps]``: ``Σ_p`` of ``part`` (``"raw"`` or ``"smoothed"``) ``tr(Σ_p)`` and
    ``|G_p|²`` over the ``params`` present at each step (NaN when none is, or any is not
    finite)."""
    out = np.full((2, len(steps)), np.nan)
    for i, s in enumerate(steps):
        by_param = s.get("by_param") or {}
        present = [(by_param[p] or {}).get(part) or {} for p in params if p in by_param]
        if present:
            out[:, i] = [sum(to_float(v.get(k)) for v in present) for k in KEYS]
    return out


def _replay(steps: Steps, raw: np.ndarray, beta: float) -> np.ndarray:
    """``[4, n_steps]``: replayed ``T̄``, ``S̄`` and the Fieller interval's ends."""
    out = np.full((4, len(steps)), np.nan)
    state = smoothing.init()
    for i, s in enumerate(steps):
        t, g = raw[:, i]
        if not s.get("skipped") and math.isfinite(t) and math.isfinite(g):
            state = smoothing.update(state, float(t), float(g), beta)
        if state.count:
            out[:2, i] = smoothing.means(state, beta)
            out[2:, i] = smoothing.ratio_interval(state, beta)
    return out


def _agrees(replayed: np.ndarray, filed: np.ndarray) -> bool:
    """True when the replayed means match the file's wherever both are finite."""
    both = np.isfinite(replayed) & np.isfinite(filed)
    scale = np.maximum(np.abs(filed[both]), 1e-300)
    return not np.any(np.abs(replayed[both] - filed[both]) > 1e-6 * scale)


def _ratio(t: np.ndarray, g: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(g > 0, t / g, np.nan)


def layer_noise(steps: Steps, params: Sequence[str], beta: float) -> LayerNoise:
    """The smoothed noise of the layer made of ``params`` (see the module docstring)."""
    filed = _sums(steps, params, "smoothed")
    no_band = np.full(len(steps), np.nan)
    if not 0.0 <= beta < 1.0:
        return LayerNoise(filed[0], filed[1], _ratio(*filed), (no_band, no_band))
    replay = _replay(steps, _sums(steps, params, "raw"), beta)
    if not (_agrees(replay[0], filed[0]) and _agrees(replay[1], filed[1])):
        return LayerNoise(filed[0], filed[1], _ratio(*filed), (no_band, no_band))
    return LayerNoise(replay[0], replay[1], _ratio(replay[0], replay[1]), (replay[2], replay[3]))


def layer_series(steps: Steps, beta: float, limit: int = MAX_LAYERS) -> Tuple[Dict[str, LayerNoise], int]:
    """The smoothed noise of at most ``limit`` layers, largest final ``tr(Σ)`` first.

    Returns:
        ``(layers, n_layers)``: layer name -> :class:`LayerNoise`, and the number of
        layers in the file.
    """
    found = {name: layer_noise(steps, params, beta) for name, params in _layers(steps).items()}

    def final_trace(item: Tuple[str, LayerNoise]) -> float:
        finite = item[1].trace_cov[np.isfinite(item[1].trace_cov)]
        return -float(finite[-1]) if finite.size else math.inf

    return dict(sorted(found.items(), key=final_trace)[:limit]), len(found)
