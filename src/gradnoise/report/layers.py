"""Per-layer noise of a ``gradnoise-run`` file, as the monitor wrote it.

A version-2 run file holds each layer's smoothed ``tr(Σ)``, ``|G|²``, ``B_simple`` and the
95 % interval of ``B_simple`` in every step's ``by_layer``, and the layers' classes in the
header (:mod:`gradnoise.formats`); nothing is recomputed here. A version-1 file has only
per-parameter values: a layer's smoothed ``tr(Σ)`` and ``|G|²`` are then the sums over
its parameters (EMAs are linear) and it has no band.

Layers are ranked by their share of the noise, ``tr(Σ)`` at the last step; the plot
shows the few largest (:data:`PLOTTED`), the table all of them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from ..formats import interval, to_float

Steps = Sequence[Dict[str, Any]]
PLOTTED = 4
KEYS = ("trace_cov", "grad_sq_norm")


@dataclass(frozen=True)
class LayerNoise:
    """One layer's smoothed noise; every array has shape ``[n_steps]``.

    Attributes:
        label: ``"blocks.0.attn (MultiheadAttention)"``.
        trace_cov: smoothed ``Σ_p tr(Σ_p)`` of its parameters.
        grad_sq_norm: smoothed ``Σ_p |G_p|²``.
        b_simple: their ratio (NaN where ``|G|² ≤ 0`` or undefined).
        band: ``(low, high)`` of the 95 % interval of ``b_simple`` (``inf`` where
            unbounded, NaN where the file has none).
        share: the layer's part of the total ``tr(Σ)`` at the last step (NaN if unknown).
        reason: why ``b_simple`` is undefined at every step (``""`` when it is defined
            somewhere), for the table's row of dashes.
    """

    label: str
    trace_cov: np.ndarray
    grad_sq_norm: np.ndarray
    b_simple: np.ndarray
    band: Tuple[np.ndarray, np.ndarray]
    share: float
    reason: str = ""


def layer_of(param: str) -> str:
    """``"a.b.weight"`` -> ``"a.b"``; a name without a dot is its own layer."""
    return param.rsplit(".", 1)[0] if "." in param else param


def _types(header: Dict[str, Any]) -> Dict[str, str]:
    layers = header.get("layers") if isinstance(header.get("layers"), dict) else {}
    return {name: str(e.get("type")) for name, e in layers.items() if isinstance(e, dict) and e.get("type")}


def _names(header: Dict[str, Any], steps: Steps) -> List[str]:
    """Layer names in the model's order: the header's, else by first appearance."""
    names = list(_types(header))
    for s in steps:
        for name in (s.get("by_layer") or {}):
            if name not in names:
                names.append(name)
        if "by_layer" not in s:
            for p in (s.get("by_param") or {}):
                if layer_of(p) not in names:
                    names.append(layer_of(p))
    return names


def _from_file(steps: Steps, name: str) -> np.ndarray:
    """``[4, n]``: smoothed ``tr(Σ)``, ``|G|²`` and the interval's ends of layer ``name``
    (v2 ``by_layer``; for a v1 step, sums of its parameters and no interval)."""
    out = np.full((4, len(steps)), np.nan)
    for i, s in enumerate(steps):
        by_layer = s.get("by_layer")
        if isinstance(by_layer, dict):
            entry = by_layer.get(name) or {}
            sm = entry.get("smoothed") or {}
            out[:, i] = [to_float(sm.get(k)) for k in KEYS] + list(interval(entry.get("b_simple_interval")))
            continue
        parts = [(v or {}).get("smoothed") or {} for p, v in (s.get("by_param") or {}).items() if layer_of(p) == name]
        if parts:
            out[:2, i] = [sum(to_float(v.get(k)) for v in parts) for k in KEYS]
    return out


def _undefined_reason(header: Dict[str, Any], name: str, v: np.ndarray) -> str:
    """Why layer ``name`` has no ``B_simple`` at any step (``v`` as :func:`_from_file`
    returns it), or ``""`` when it has one."""
    if np.isfinite(_ratio(v[0], v[1])).any():
        return ""
    layers = header.get("layers") if isinstance(header.get("layers"), dict) else {}
    own = [str(p) for p in (layers.get(name) or {}).get("params") or []]
    measured = {str(p) for p in header.get("params") or []} if isinstance(header.get("params"), list) else set()
    if own and measured and not measured.intersection(own):
        return (f"not measured: {', '.join(own)} is not among the run file's parameters (a weight tied to "
                "another layer is counted in that layer's row)")
    if not np.isfinite(v[0]).any() and not np.isfinite(v[1]).any():
        return "no value recorded for this layer at any step"
    return "undefined at every step: its |G|² was never above zero"


def _ratio(t: np.ndarray, g: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(g > 0, t / g, np.nan)


def layer_series(header: Dict[str, Any], steps: Steps, total_trace: float) -> List[LayerNoise]:
    """Every layer of the run file, largest share of the noise first.

    Args:
        header, steps: as :func:`gradnoise.read_run` returns them.
        total_trace: the total smoothed ``tr(Σ)`` at the last step (for the shares).
    """
    types = _types(header)
    found = []
    for name in _names(header, steps):
        v = _from_file(steps, name)
        finite = v[0][np.isfinite(v[0])]
        last = float(finite[-1]) if finite.size else math.nan
        share = last / total_trace if math.isfinite(total_trace) and total_trace > 0 else math.nan
        label = f"{name} ({types[name]})" if name in types else name
        low, high = np.maximum(v[2], 0.0), np.maximum(v[3], 0.0)  # a v1 file may hold -inf
        found.append(LayerNoise(label, v[0], v[1], _ratio(v[0], v[1]), (low, high), share,
                                _undefined_reason(header, name, v)))
    return sorted(found, key=lambda layer: -layer.share if math.isfinite(layer.share) else math.inf)
