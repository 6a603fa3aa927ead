"""Sharpness of a solution: the top eigenvalue and the trace of the Hessian of the
full-data loss, from Hessian-vector products (double backward), never the Hessian.

* top eigenvalue ``λ_max``: power iteration ``v ← Hv/‖Hv‖``, ``λ = vᵀHv`` (the largest in
  magnitude; at a minimum the Hessian is close to positive semi-definite);
* trace: Hutchinson's estimator ``E[vᵀHv] = tr H`` over Rademacher vectors ``v``, with
  the standard error of the mean over probes.
"""
from __future__ import annotations

import math
from typing import Callable, List, Tuple

import torch
from torch import nn


def _params(model: nn.Module) -> List[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def hvp_fn(model: nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Callable[[List[torch.Tensor]], List[torch.Tensor]]:
    """``v -> Hv`` for the loss ``loss_fn()`` (a scalar of ``model``'s parameters); the
    gradient graph is built once and reused by every product."""
    params = _params(model)
    grads = torch.autograd.grad(loss_fn(), params, create_graph=True)

    def hvp(v: List[torch.Tensor]) -> List[torch.Tensor]:
        dot = sum((g * x).sum() for g, x in zip(grads, v))
        return [h.detach() for h in torch.autograd.grad(dot, params, retain_graph=True)]

    return hvp


def _dot(a: List[torch.Tensor], b: List[torch.Tensor]) -> float:
    return float(sum((x * y).sum() for x, y in zip(a, b)))


def top_eigenvalue(model: nn.Module, loss_fn: Callable[[], torch.Tensor], iters: int = 30, tol: float = 1e-4,
                   generator: torch.Generator = None) -> float:
    """The Hessian's largest-magnitude eigenvalue by power iteration (stops when the
    estimate changes by less than ``tol`` relative)."""
    hvp = hvp_fn(model, loss_fn)
    v = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in _params(model)]
    norm = math.sqrt(_dot(v, v))
    v = [x / norm for x in v]
    lam = math.nan
    for _ in range(iters):
        hv = hvp(v)
        new = _dot(v, hv)
        norm = math.sqrt(_dot(hv, hv))
        if norm == 0:
            return 0.0
        v = [x / norm for x in hv]
        if math.isfinite(lam) and abs(new - lam) <= tol * abs(new):
            return new
        lam = new
    return lam


def hessian_trace(model: nn.Module, loss_fn: Callable[[], torch.Tensor], probes: int = 30,
                  generator: torch.Generator = None) -> Tuple[float, float]:
    """Hutchinson's ``tr H`` and its standard error over ``probes`` Rademacher vectors."""
    hvp = hvp_fn(model, loss_fn)
    values = []
    for _ in range(probes):
        v = [torch.randint(0, 2, p.shape, generator=generator).to(p.dtype) * 2 - 1 for p in _params(model)]
        values.append(_dot(v, hvp(v)))
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std() / math.sqrt(len(values))) if len(values) > 1 else math.nan
