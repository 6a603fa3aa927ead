"""SVRG, stochastic variance-reduced gradient (Johnson & Zhang, 2013).

A snapshot ``x̃`` of the weights and the full-data gradient there, ``μ̃ = ∇F(x̃)``, are
kept; each step on batch ``ξ_t`` (``f_i`` in the paper) uses the control variate
``∇f(x̃, ξ_t)`` on the *same* batch (every tensor has its parameter's shape)::

    v_t = ∇f(x_t, ξ_t) − ∇f(x̃, ξ_t) + μ̃ (+ λ x_t)
    x_{t+1} = x_t − lr v_t

``E[v_t] = ∇F(x_t)``, and ``Var(v_t) → 0`` as ``x_t`` and ``x̃`` approach the optimum, so
with a constant step SVRG converges linearly on smooth strongly convex problems where
SGD stalls at its noise floor.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch.optim import Optimizer

from .closure import Closure, call_closure, gradients_at, need_closure


def _check(lr: float, weight_decay: float) -> None:
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"SVRG lr must be a finite number >= 0, got {lr}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"SVRG weight_decay must be a finite number >= 0, got {weight_decay}")


class SVRG(Optimizer):
    """SVRG (Johnson & Zhang, 2013) as a ``torch.optim.Optimizer``.

    Use::

        opt = SVRG(model.parameters(), lr=0.05)
        for epoch in range(epochs):
            opt.snapshot(full_grad_closure)      # x̃ ← x, μ̃ ← ∇F(x̃)
            for xb, yb in loader:                # m steps between snapshots
                def closure():
                    loss = loss_fn(model(xb), yb)
                    loss.backward()
                    return loss
                opt.step(closure)

    The snapshot refresh is the caller's: call ``snapshot`` every ``m`` steps. The paper
    uses ``m = 2N/B`` for ``N`` samples and batch size ``B`` (two passes of steps per
    snapshot, one more pass for ``μ̃``), with ``x̃`` the last iterate (its "option I").

    ``snapshot(closure=None)``: records ``x̃ = x`` and ``μ̃`` for every parameter with
    ``requires_grad``. With a closure, the optimizer zeroes gradients in place and calls
    it once; the closure must leave the full-data *mean* gradient in ``.grad`` (for
    example, loop over the data calling ``(loss_j * b_j / N).backward()`` without zeroing
    in between) — the same reduction as the step closure's loss. Without a closure the
    gradients already in ``.grad`` are taken as ``μ̃``. A parameter without gradient gets
    ``μ̃ = 0``. Returns the closure's value (or None).

    ``step(closure)``: required. ``closure()`` computes the loss on this step's batch,
    calls ``loss.backward()`` and returns the loss; it is called twice, first with the
    parameters temporarily set to ``x̃`` (the torch RNG is replayed afterwards, so
    dropout masks and batches drawn with ``torch`` inside the closure repeat), then at
    ``x_t``. Gradients are zeroed in place before each call. Afterwards ``p.grad`` holds
    ``∇f(x_t, ξ_t)`` (not ``v_t``) and ``step`` returns the loss at ``x_t``. Parameters
    whose gradient at ``x_t`` is ``None`` are skipped.

    Weight decay ``λ`` is an L2 term: adding ``λ x_t`` to ``v_t`` is exactly SVRG on
    ``F(x) + λ/2 ‖x‖²`` (its control-variate part ``λ x̃`` cancels). No momentum: the
    variance-reduced direction is the method; momentum would need its own analysis.

    Args:
        params: parameters or parameter groups.
        lr: the constant step (SVRG's theory needs ``lr`` below about ``1/(4L)`` for
            ``L`` the smoothness of the per-batch losses).
        weight_decay: L2 coefficient ``λ`` (default 0).

    State per parameter (parameter's shape): ``snapshot`` (``x̃``) and ``full_grad``
    (``μ̃``).
    """

    def __init__(self, params, lr: float, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    def add_param_group(self, param_group: dict) -> None:
        g = {**self.defaults, **param_group}
        _check(g["lr"], g["weight_decay"])
        super().add_param_group(param_group)

    def _trainable(self):
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    @torch.no_grad()
    def snapshot(self, closure: Optional[Closure] = None):
        """Record ``x̃ = x`` and ``μ̃`` (the full-data gradient; see the class docstring)."""
        loss = None if closure is None else call_closure(self, closure)
        params = self._trainable()
        if not any(p.grad is not None for p in params):
            raise ValueError(
                "SVRG.snapshot found no gradients: pass a closure that leaves the full-data "
                "gradient in .grad, or run the full-data backward before snapshot()"
            )
        for p in params:
            state = self.state[p]
            state["snapshot"] = p.detach().clone()
            state["full_grad"] = torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
        return loss

    @torch.no_grad()
    def step(self, closure: Optional[Closure] = None):
        """One SVRG step; ``closure`` is required (see the class docstring)."""
        need_closure("SVRG", closure, "it is evaluated at the snapshot and the current weights")
        snap = {p: self.state[p]["snapshot"] for p in self._trainable()
                if p in self.state and "snapshot" in self.state[p]}
        if not snap:
            raise RuntimeError("SVRG.step before any snapshot: call opt.snapshot(full_grad_closure) first")
        g_snap = gradients_at(self, closure, snap)[1]
        loss = call_closure(self, closure)
        missing = [tuple(p.shape) for p in self._trainable() if p.grad is not None and p not in snap]
        if missing:
            raise RuntimeError(f"SVRG parameters of shapes {missing} have no snapshot: call snapshot() after adding them")
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                v = p.grad - g_snap[p] + self.state[p]["full_grad"]
                if wd:
                    v.add_(p, alpha=wd)
                p.add_(v, alpha=-lr)
        return loss
