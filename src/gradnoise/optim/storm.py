"""STORM, stochastic recursive momentum (Cutkosky & Orabona, 2019, Algorithm 1).

For a parameter vector ``x`` (every tensor below has its parameter's shape) and the
batch ``ξ_t`` of step ``t``::

    d_0 = ∇f(x_0, ξ_0)
    d_t = ∇f(x_t, ξ_t) + (1 − a_t) (d_{t−1} − ∇f(x_{t−1}, ξ_t))      t ≥ 1
    x_{t+1} = x_t − η_t d_t

Both gradients of step ``t`` are taken on the *same* batch ``ξ_t``, at the current and
at the previous iterate, so ``step`` needs a closure that it can call at both points.

The closure is evaluated at the previous iterate through :mod:`gradnoise.optim.closure`
(the same batch and the same random draws).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch.optim import Optimizer

from .closure import Closure, call_closure, gradients_at, need_closure


def _check(k: float, w: float, c: float, lr: Optional[float], a: Optional[float]) -> None:
    if not (math.isfinite(k) and k >= 0):
        raise ValueError(f"STORM k must be a finite number >= 0, got {k}")
    if not (math.isfinite(w) and w > 0):
        raise ValueError(f"STORM w must be a finite number > 0, got {w}")
    if not (math.isfinite(c) and c >= 0):
        raise ValueError(f"STORM c must be a finite number >= 0, got {c}")
    if (lr is None) != (a is None):
        raise ValueError(f"STORM takes both lr and a (constant form) or neither (adaptive form), got lr={lr}, a={a}")
    if lr is not None and not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"STORM lr must be a finite number >= 0, got {lr}")
    if a is not None and not 0.0 <= a <= 1.0:
        raise ValueError(f"STORM a must be in [0, 1], got {a}")


class STORM(Optimizer):
    """STORM (Cutkosky & Orabona, 2019) as a ``torch.optim.Optimizer``.

    The update, per parameter tensor (``d``, ``x``, gradients: the parameter's shape)::

        d_t = ∇f(x_t, ξ_t) + (1 − a_t) (d_{t−1} − ∇f(x_{t−1}, ξ_t)),   d_0 = ∇f(x_0, ξ_0)
        x_{t+1} = x_t − η_t d_t

    Two schedules for ``(η_t, a_t)``, chosen per parameter group:

    * adaptive (the default, the paper's): ``η_t = k / (w + Σ_{i≤t} ‖∇f(x_i, ξ_i)‖²)^{1/3}``
      and ``a_t = min(1, c η_{t−1}²)``. The norm is taken over all parameters of the
      group with a gradient (the group is the paper's vector ``x``); the running sum is
      kept in the group as ``"grad_sq_sum"`` and so saved by ``state_dict``. ``a_t`` is
      clipped to 1 (the paper's analysis picks ``w`` large enough that it never exceeds
      1; with small ``w`` early steps would otherwise flip the sign of the momentum).
    * constant: give both ``lr`` and ``a``: ``η_t = lr``, ``a_t = a``. ``lr`` then works
      with ``torch.optim.lr_scheduler``.

    Closure contract: ``step(closure)``; ``closure()`` computes the loss on this step's
    batch (the same batch every time it is called within one step), calls
    ``loss.backward()`` and returns the loss. The optimizer zeroes gradients in place
    before each call. From the second step on it calls the closure twice: first with the
    parameters temporarily set to ``x_{t−1}`` (the torch RNG is replayed afterwards, so
    dropout masks and batches drawn with ``torch`` inside the closure repeat), then at
    ``x_t``. Afterwards ``p.grad`` holds ``∇f(x_t, ξ_t)`` and ``step`` returns the loss at
    ``x_t``. Do not call ``backward`` yourself before ``step``: the closure does it.

    Parameters whose gradient at ``x_t`` is ``None`` are skipped (not moved, ``d`` kept);
    their stored previous value follows them, so a later step swaps in their actual value.
    ``x_{t−1}`` is the value each parameter had at the start of the last ``step``: editing
    parameters between steps (loading weights, projecting) makes the correction use the
    pre-edit values.

    Args:
        params: parameters or parameter groups.
        k: adaptive step scale ``k`` (default 0.1).
        w: adaptive offset ``w > 0`` (default 0.1).
        c: adaptive momentum scale ``c`` (default 100).
        lr: constant step ``η`` (constant form only, with ``a``).
        a: constant momentum weight ``a ∈ [0, 1]`` (constant form only, with ``lr``);
            ``a = 1`` is SGD.

    State per parameter: ``d`` (the direction ``d_t``) and ``prev`` (``x_t`` before the
    update, the next step's previous iterate), both of the parameter's shape.
    """

    def __init__(self, params, k: float = 0.1, w: float = 0.1, c: float = 100.0, *,
                 lr: Optional[float] = None, a: Optional[float] = None):
        super().__init__(params, dict(k=k, w=w, c=c, lr=lr, a=a))

    def add_param_group(self, param_group: dict) -> None:
        g = {**self.defaults, **param_group}
        _check(g["k"], g["w"], g["c"], g["lr"], g["a"])
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Optional[Closure] = None):
        """One STORM step; ``closure`` is required (see the class docstring)."""
        need_closure("STORM", closure, "it is evaluated at the previous and the current iterate")
        prev = {p: self.state[p]["prev"] for g in self.param_groups for p in g["params"]
                if p in self.state and "prev" in self.state[p]}
        g_prev = gradients_at(self, closure, prev)[1] if prev else {}
        loss = call_closure(self, closure)
        for group in self.param_groups:
            self._update_group(group, g_prev)
        return loss

    def _coefficients(self, group: dict, grads) -> Tuple[float, float]:
        """``(a_t, η_t)`` for this step; advances the adaptive group's running sum."""
        if group["lr"] is not None:
            return group["a"], group["lr"]
        k, w, c = group["k"], group["w"], group["c"]
        s_prev = group.get("grad_sq_sum")
        a = 1.0 if s_prev is None else min(1.0, c * (k / (w + s_prev) ** (1 / 3)) ** 2)
        s = (0.0 if s_prev is None else s_prev) + sum(float(g.square().sum()) for g in grads)
        group["grad_sq_sum"] = s
        return a, k / (w + s) ** (1 / 3)

    def _update_group(self, group: dict, g_prev: Dict[torch.Tensor, torch.Tensor]) -> None:
        live = [p for p in group["params"] if p.grad is not None]
        for p in group["params"]:
            if p.grad is None and p in self.state and "prev" in self.state[p]:
                self.state[p]["prev"].copy_(p)
        if not live:
            return
        a, lr = self._coefficients(group, [p.grad for p in live])
        for p in live:
            state, g = self.state[p], p.grad
            if "d" in state:
                state["d"].sub_(g_prev[p]).mul_(1.0 - a).add_(g)
                state["prev"].copy_(p)
            else:
                state["d"] = g.detach().clone()
                state["prev"] = p.detach().clone()
            p.add_(state["d"], alpha=-lr)
