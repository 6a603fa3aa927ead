"""MARS, variance reduction for AdamW (Yuan et al., 2025, "MARS: Unleashing the Power of
Variance Reduction for Training Large Models"), the MARS-AdamW instance.

Per parameter tensor (every tensor below has its parameter's shape), at step ``t``
with gradient ``g_t = ∇f(x_t, ξ_t)``::

    c_t = g_t + γ β₁/(1 − β₁) (g_t − g̃_{t−1})           scaled gradient correction
    c_t ← c_t / ‖c_t‖  if ‖c_t‖ > 1                      per-tensor clip to norm 1
    m_t = β₁ m_{t−1} + (1 − β₁) c_t
    v_t = β₂ v_{t−1} + (1 − β₂) c_t²
    x_{t+1} = x_t − lr (λ x_t + m̂_t / (√v̂_t + ε)),   m̂_t = m_t/(1 − β₁ᵗ), v̂_t = v_t/(1 − β₂ᵗ)

with ``g̃_{t−1} = ∇f(x_{t−1}, ξ_t)`` (exact: the previous iterate on the *current* batch)
or ``g̃_{t−1} = g_{t−1} = ∇f(x_{t−1}, ξ_{t−1})`` (approximate, the paper's MARS-approx).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch.optim import Optimizer

from .closure import Closure, call_closure, gradients_at, need_closure


def _check(lr: float, betas: Tuple[float, float], eps: float, weight_decay: float, gamma: float) -> None:
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"MARS lr must be a finite number >= 0, got {lr}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"MARS betas must be two numbers in [0, 1), got {betas}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"MARS eps must be a finite number >= 0, got {eps}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"MARS weight_decay must be a finite number >= 0, got {weight_decay}")
    if not (math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"MARS gamma must be a finite number >= 0, got {gamma}")


class MARS(Optimizer):
    """MARS-AdamW (Yuan et al., 2025) as a ``torch.optim.Optimizer``.

    See the module docstring for the update. Choices made here:

    * ``exact=False`` (default, the paper's MARS-approx): ``g̃_{t−1}`` is the previous
      step's gradient, kept as a *copy* (``state["prev_grad"]``). A reference to
      ``p.grad`` would be overwritten in place by ``zero_grad(set_to_none=False)`` and the
      next ``backward``, making the correction zero and MARS silently AdamW.
      ``exact=True``: ``g̃_{t−1} = ∇f(x_{t−1}, ξ_t)``, evaluated through the closure with
      all parameters temporarily set to ``x_{t−1}`` (``state["prev"]``), on the same batch
      and the same torch random draws; two closure calls per step.
      ``exact`` must be the same in every parameter group (the previous iterate is the
      whole model's).
    * First step: there is no previous iterate (the paper sets ``x_1 = x_0``), so the
      correction is zero and ``c_1 = g_1``. (The authors' reference code starts from
      ``g̃_0 = 0``, i.e. ``c_1 = (1 + γβ₁/(1 − β₁)) g_1`` before clipping.)
    * Which tensors get MARS: tensors with ``p.dim() >= 2`` — Linear weights, embeddings,
      and conv weights ``[C_out, C_in/groups, *kernel]``, each clipped as one tensor.
      Tensors with ``p.dim() < 2`` (biases, norm scales, scalars) get plain AdamW on
      ``g_t`` (no correction, no clip) with the group's ``lr``, ``betas``, ``eps`` and
      ``weight_decay``, as the paper's reference code does by default;
      ``mars_1d=True`` gives them MARS too. For the reference code's separate 1-D
      settings (betas (0.9, 0.95), weight decay 0.1) put those tensors in their own
      parameter group. (The reference code selects MARS by ``p.dim() == 2``, so it sends
      conv weights to AdamW; here they get MARS.)
    * Weight decay ``λ`` is decoupled (AdamW): ``x ← x − lr λ x`` on the pre-step ``x``.

    Closure contract: ``closure()`` computes the loss on this step's batch, calls
    ``loss.backward()`` and returns the loss; the optimizer zeroes gradients in place
    before each call. With ``exact=False`` it is optional and called once (the usual
    ``loss.backward(); opt.step()`` works too). With ``exact=True`` ``step(closure)`` is
    required: the closure is called at ``x_{t−1}`` (the torch RNG is replayed afterwards,
    so dropout masks and batches drawn with ``torch`` inside the closure repeat), then at
    ``x_t``. Either way ``p.grad`` ends holding ``∇f(x_t, ξ_t)`` and ``step`` returns the
    loss at ``x_t``.

    Parameters whose ``grad`` is ``None`` are skipped (not moved, moments kept).

    Args:
        params: parameters or parameter groups.
        lr: learning rate (default 3e-3).
        betas: ``(β₁, β₂)`` in ``[0, 1)`` (default (0.95, 0.99)).
        eps: ``ε`` added to ``√v̂`` (default 1e-8).
        weight_decay: decoupled weight decay ``λ`` (default 0).
        gamma: correction scale ``γ >= 0`` (default 0.025); ``γ = 0`` is AdamW on the
            clipped gradient.
        exact: evaluate ``∇f(x_{t−1}, ξ_t)`` through the closure (default False).
        mars_1d: apply MARS to tensors with fewer than 2 dimensions too (default False).

    State per parameter (parameter's shape): ``exp_avg`` (m), ``exp_avg_sq`` (v),
    ``step`` (int), and ``prev_grad`` (approximate) or ``prev`` (exact).
    """

    def __init__(self, params, lr: float = 3e-3, betas: Tuple[float, float] = (0.95, 0.99),
                 eps: float = 1e-8, weight_decay: float = 0.0, gamma: float = 0.025, *,
                 exact: bool = False, mars_1d: bool = False):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        gamma=gamma, exact=bool(exact), mars_1d=bool(mars_1d))
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        g = {**self.defaults, **param_group}
        _check(g["lr"], tuple(g["betas"]), g["eps"], g["weight_decay"], g["gamma"])
        if self.param_groups and bool(g["exact"]) != self.param_groups[0]["exact"]:
            raise ValueError("MARS exact must be the same in every parameter group (the previous iterate is the whole model's)")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Optional[Closure] = None):
        """One MARS step; ``closure`` is required when ``exact=True``."""
        exact = self.param_groups[0]["exact"]
        g_prev: Dict[torch.Tensor, torch.Tensor] = {}
        if exact:
            need_closure("MARS(exact=True)", closure, "it is evaluated at the previous and the current iterate")
            prev = {p: self.state[p]["prev"] for g in self.param_groups for p in g["params"]
                    if p in self.state and "prev" in self.state[p]}
            if prev:
                g_prev = gradients_at(self, closure, prev)[1]
            loss = call_closure(self, closure)
        else:
            loss = None if closure is None else call_closure(self, closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group, exact, g_prev.get(p))
                elif exact and p in self.state and "prev" in self.state[p]:
                    self.state[p]["prev"].copy_(p)
        return loss

    def _direction(self, p: torch.Tensor, group: dict, exact: bool,
                   g_prev: Optional[torch.Tensor]) -> torch.Tensor:
        """``c_t``, clipped (MARS tensors), or ``g_t`` (AdamW tensors)."""
        g, state = p.grad, self.state[p]
        if p.dim() < 2 and not group["mars_1d"]:
            return g
        g_tilde = g_prev if exact else state.get("prev_grad")
        beta1 = group["betas"][0]
        c = g if g_tilde is None else g + (group["gamma"] * beta1 / (1.0 - beta1)) * (g - g_tilde)
        c = c / torch.linalg.vector_norm(c).clamp(min=1.0)
        if not exact:
            if "prev_grad" in state:
                state["prev_grad"].copy_(g)
            else:
                state["prev_grad"] = g.detach().clone()
        return c

    def _update(self, p: torch.Tensor, group: dict, exact: bool, g_prev: Optional[torch.Tensor]) -> None:
        c = self._direction(p, group, exact, g_prev)
        state = self.state[p]
        if exact:
            if "prev" in state:
                state["prev"].copy_(p)
            else:
                state["prev"] = p.detach().clone()
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        t, (beta1, beta2) = state["step"], group["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(beta1).add_(c, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(c, c, value=1.0 - beta2)
        denom = (v.sqrt() / math.sqrt(1.0 - beta2 ** t)).add_(group["eps"])
        p.mul_(1.0 - group["lr"] * group["weight_decay"])
        p.addcdiv_(m, denom, value=-group["lr"] / (1.0 - beta1 ** t))
