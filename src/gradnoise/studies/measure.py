"""``gradnoise measure``: the gradient noise of one batch, layer by layer.

A built-in model on the digits data, or the user's task (``--task``, the protocol of
:mod:`gradnoise.studies.task`); one batch drawn without replacement; per-sample gradient
norms from :func:`gradnoise.capture`; ``tr(Σ)``, ``|G|²`` and ``B_simple`` for each layer
(the module that owns the parameters, named by its path and class) and for the whole
model, with the finite-population correction for the data set's size.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from .. import stats as _stats
from ..capture import capture
from ..monitor.names import layers as layer_table
from .data import digits, sample_batch
from .models import build
from .task import Task, load


def by_layer(per_param: Dict[str, _stats.NoiseStats], layers: Dict[str, Dict[str, Any]]
             ) -> Dict[str, _stats.NoiseStats]:
    """Group per-parameter statistics into layers (the estimator is additive)."""
    out = {}
    for layer, entry in layers.items():
        parts = {p: per_param[p] for p in entry["params"] if p in per_param}
        if parts:
            out[layer] = _stats.total(parts)
    return out


def _task(model: str, seed: int, task: Optional[str]) -> Task:
    if task is not None:
        return load(task, seed)
    torch.manual_seed(seed)
    x, y = digits()
    return Task(f"digits-{model}", build(model), x, y, F.cross_entropy)


def measure(model: str = "mlp", batch_size: int = 128, seed: int = 0, task: Optional[str] = None) -> Dict[str, Any]:
    """Measure one batch; returns a JSON-ready dict (NaN as None).

    Args:
        model: a built-in model on the digits data (ignored with ``task``).
        batch_size: ``B`` (at most the data set's size).
        seed: seeds the model's initialisation and the batch.
        task: a task spec (``package.module:function`` or ``path/file.py:function``).

    Keys: ``model``, ``data``, ``batch_size``, ``population``, ``seed``, ``loss``,
    ``total`` and ``layers`` (each: ``layer`` ("path (Type)"), ``path``, ``type``,
    ``params``, ``trace_cov``, ``grad_sq_norm``, ``b_simple``, ``noise_share``, ``flag``).

    Raises:
        ValueError: a bad task, or a batch size above the data set's size.
    """
    t = _task(model, seed, task)
    net = t.fresh_model()
    if batch_size > t.size:
        raise ValueError(f"--batch-size {batch_size} is larger than the task's {t.size} samples")
    xb, yb = sample_batch(t.x, t.y, batch_size, torch.Generator().manual_seed(seed))
    with capture(net, reduction="mean") as cap:
        loss = t.loss_fn(net(xb), yb)
        loss.backward()
    whole = cap.stats(population=t.size)
    table = layer_table(net)
    layers = by_layer(whole.by_param, table)
    sizes = {name: sum(p.numel() for n, p in net.named_parameters() if n in entry["params"])
             for name, entry in table.items()}
    rows: List[Dict[str, Any]] = [
        {"layer": f"{name} ({table[name]['type']})", "path": name, "type": table[name]["type"],
         "params": sizes[name], **_row(layers[name], whole.trace_cov)}
        for name in table if name in layers
    ]
    return {
        "model": type(net).__name__ if task is not None else model,
        "data": t.name if task is not None else "digits",
        "batch_size": batch_size,
        "population": t.size,
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
