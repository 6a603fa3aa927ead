"""Adam's preconditioner, read from an optimizer's state as one weight per parameter
tensor, and what the monitor records of the optimizer.

Adam's update direction is ``P ĝ`` with ``P = diag(1/(√v̂ + ε))``, ``v̂`` the
bias-corrected second moment (``exp_avg_sq``; ``max_exp_avg_sq`` with amsgrad). The noise
of that direction is ``tr(PΣP) = Σ_j P_j² Σ_jj`` against the signal ``|PG|² = Σ_j P_j² G_j²``.
The monitor keeps per-tensor sums, not per-coordinate ones, so each tensor ``p`` gets one
weight ``w_p = mean_j P_j²``::

    tr(PΣP) ≈ Σ_p w_p tr Σ_p        |PG|² ≈ Σ_p w_p |G_p|²

exact when ``P`` is constant over each tensor, and the expectation when ``P_j²`` is
uncorrelated with ``Σ_jj`` and ``G_j²`` within a tensor. A tensor of more than ``SAMPLE``
elements is read at a fixed random subset of that many coordinates (relative error
≈ CV(P²)/√SAMPLE), so reading costs a few µs per tensor and one host transfer.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch

SAMPLE = 1024  # coordinates of a tensor's Adam state that its weight reads

# optimizer classes whose update is SGD's (with or without momentum)
SGD_LIKE = ("SGD", "ASGD")


def family(optimizer) -> str:
    """``"adam"`` (a second-moment preconditioner: groups with ``betas`` and ``eps``, not
    a sign-based Lion), ``"sgd"``, or ``"other"``."""
    group = optimizer.param_groups[0] if getattr(optimizer, "param_groups", None) else {}
    name = type(optimizer).__name__
    if "betas" in group and "eps" in group and "lion" not in name.lower():
        return "adam"
    return "sgd" if name in SGD_LIKE else "other"


def describe(optimizer) -> Dict[str, Any]:
    """The run file's ``optimizer`` entry: class, family and the first group's
    hyper-parameters (``lr``, ``betas``, ``eps``, ``weight_decay``, ``momentum``,
    ``nesterov``, where the group has them) and the number of groups."""
    group = optimizer.param_groups[0]
    out: Dict[str, Any] = {"class": type(optimizer).__name__, "family": family(optimizer),
                           "groups": len(optimizer.param_groups)}
    for key in ("lr", "betas", "eps", "weight_decay", "momentum", "nesterov"):
        if key in group:
            v = group[key]
            v = [float(b) for b in v] if isinstance(v, (tuple, list)) else v
            out[key] = float(v) if isinstance(v, torch.Tensor) else v
    return out


def current_lr(optimizer) -> Optional[float]:
    """The first group's learning rate now (a schedule may have moved it)."""
    lr = optimizer.param_groups[0].get("lr")
    return None if lr is None else float(lr)


class Preconditioner:
    """Per-tensor weights ``w_p = mean_j P_j²`` of an Adam-type optimizer's state.

    Args:
        optimizer: any optimizer; tensors without ``exp_avg_sq`` state get no weight.
        names: parameter -> name (the parameters to read).
    """

    def __init__(self, optimizer, names: Mapping[torch.nn.Parameter, str]):
        self.optimizer = optimizer
        self.names = dict(names)
        self._subsets: Dict[torch.nn.Parameter, torch.Tensor] = {}

    def weights(self) -> Dict[torch.nn.Parameter, float]:
        """Parameter -> ``w_p`` for the parameters with Adam state (empty before the
        optimizer's first step). Tensors sharing ``(β₂^step, ε)``, device and dtype are
        done together: one flat tensor, five in-place ops, one transfer; on a copy, never
        on the optimizer's state."""
        batches: Dict[tuple, List[Tuple[torch.nn.Parameter, torch.Tensor]]] = {}
        for group in self.optimizer.param_groups:
            if "betas" not in group or "eps" not in group:
                continue
            beta2, eps, ams = float(group["betas"][1]), float(group["eps"]), group.get("amsgrad", False)
            for p in group["params"]:
                st = self.optimizer.state.get(p)
                if not st or "exp_avg_sq" not in st or p not in self.names:
                    continue
                v = (st["max_exp_avg_sq"] if ams and "max_exp_avg_sq" in st else st["exp_avg_sq"]).reshape(-1)
                if v.numel() > SAMPLE:
                    v = v.index_select(0, self._subset(p, v))
                key = (1.0 / (1.0 - beta2 ** float(st["step"])), eps, v.device, v.dtype)
                batches.setdefault(key, []).append((p, v))
        out: Dict[torch.nn.Parameter, float] = {}
        for (inv_bc2, eps, _, _), items in batches.items():
            sizes = [v.numel() for _, v in items]
            with torch.no_grad():
                q = torch.cat([v for _, v in items]).mul_(inv_bc2).sqrt_().add_(eps).reciprocal_().square_()
                sums = torch.stack([c.sum() for c in q.split(sizes)]).tolist()
            out.update((p, total / n) for (p, _), total, n in zip(items, sums, sizes))
        return out

    def by_name(self) -> Dict[str, float]:
        """Name -> ``w_p`` (as :meth:`weights`)."""
        return {self.names[p]: w for p, w in self.weights().items()}

    def _subset(self, p: torch.nn.Parameter, v: torch.Tensor) -> torch.Tensor:
        """``SAMPLE`` coordinates of ``p`` drawn once (seeded: the same in every run)."""
        idx = self._subsets.get(p)
        if idx is None or idx.device != v.device:
            gen = torch.Generator().manual_seed(len(self._subsets))
            idx = torch.randperm(v.numel(), generator=gen)[:SAMPLE].to(v.device)
            self._subsets[p] = idx
        return idx


def weighted(by_param: Mapping[str, Any], weights: Mapping[str, float]) -> Tuple[float, float]:
    """``(Σ w_p tr Σ_p, Σ w_p |G_p|²)`` over the parameters with a weight and finite
    statistics (``NoiseStats`` values of ``by_param``); NaN where none has both."""
    t = g = 0.0
    k = 0
    for name, w in weights.items():
        s = by_param.get(name)
        if s is None or not (math.isfinite(s.trace_cov) and math.isfinite(s.grad_sq_norm)):
            continue
        t += w * s.trace_cov
        g += w * s.grad_sq_norm
        k += 1
    return (t, g) if k else (math.nan, math.nan)


__all__ = ["Preconditioner", "SAMPLE", "current_lr", "describe", "family", "weighted"]
