"""``gradnoise measure``: the gradient noise of one batch, layer by layer.

A built-in model on the digits data; one batch drawn without replacement; per-sample
gradient norms from :func:`gradnoise.capture`; ``tr(Σ)``, ``|G|²`` and ``B_simple`` for
each layer (a layer's parameters together) and for the whole model, with the
finite-population correction for the 1,797-sample data set.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List

import torch
import torch.nn.functional as F

from .. import stats as _stats
from ..capture import capture
from .data import digits, sample_batch
from .models import build


def layer_of(param_name: str) -> str:
    """``"encoder.linear1.weight"`` -> ``"encoder.linear1"`` (``"<model>"`` for top level)."""
    return param_name.rsplit(".", 1)[0] if "." in param_name else "<model>"


def by_layer(per_param: Dict[str, _stats.NoiseStats]) -> Dict[str, _stats.NoiseStats]:
    """Group per-parameter statistics into layers (the estimator is additive)."""
    groups: Dict[str, Dict[str, _stats.NoiseStats]] = {}
    for name, s in per_param.items():
        groups.setdefault(layer_of(name), {})[name] = s
    return {layer: _stats.total(parts) for layer, parts in groups.items()}


def measure(model: str = "mlp", batch_size: int = 128, seed: int = 0) -> Dict[str, Any]:
    """Measure one batch; returns a JSON-ready dict (NaN as None).

    Keys: ``model``, ``batch_size``, ``population``, ``seed``, ``loss``, ``total`` and
    ``layers`` (each: ``layer``, ``params``, ``trace_cov``, ``grad_sq_norm``,
    ``b_simple``, ``noise_share``, ``flag``).
    """
    torch.manual_seed(seed)
    x, y = digits()
    net = build(model)
    xb, yb = sample_batch(x, y, batch_size, torch.Generator().manual_seed(seed))
    with capture(net, reduction="mean") as cap:
        loss = F.cross_entropy(net(xb), yb)
        loss.backward()
    whole = cap.stats(population=len(y))
    sizes: Dict[str, int] = {}
    for name, p in net.named_parameters():
        sizes[layer_of(name)] = sizes.get(layer_of(name), 0) + p.numel()
    layers = by_layer(whole.by_param)
    rows: List[Dict[str, Any]] = [
        {"layer": layer, "params": sizes[layer], **_row(layers[layer], whole.trace_cov)}
        for layer in sizes  # in the model's order
        if layer in layers
    ]
    return {
        "model": model,
        "batch_size": batch_size,
        "population": len(y),
        "seed": seed,
        "loss": float(loss.detach()),
        "total": {"params": sum(sizes.values()), **_row(whole, whole.trace_cov), "reason": whole.reason},
        "layers": rows,
    }


def _row(s: _stats.NoiseStats, total_trace: float) -> Dict[str, Any]:
    return {
        "trace_cov": _num(s.trace_cov),
        "grad_sq_norm": _num(s.grad_sq_norm),
        "b_simple": _num(s.b_simple),
        "noise_share": _num(s.trace_cov / total_trace) if total_trace else None,
        "flag": s.flag,
    }


def _num(v: float):
    return None if v is None or not math.isfinite(v) else float(v)
