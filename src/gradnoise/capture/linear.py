"""Linear layers: ``y = a Wᵀ + b`` on ``a`` of shape ``[N, d_in]`` or ``[N, *T, d_in]``.

Per-sample gradients, with ``δ = ∂L/∂y`` and the middle dimensions flattened to ``T``::

    g_n^W = Σ_t δ_nt a_ntᵀ          [d_out, d_in]
    g_n^b = Σ_t δ_nt                 [d_out]

* ``T = 1``: ``||g_n^W||² = ||a_n||² ||δ_n||²`` at ``O(N (d_in + d_out))``.
* ``T > 1``, Gram route: ``||g_n^W||² = Σ_{t,s} (a_nt·a_ns)(δ_nt·δ_ns)`` at
  ``O(N T² (d_in + d_out))`` on top of the usual weight gradient.
* ``T > 1``, materialised route: ``G_n = Δ_nᵀ A_n`` by batched matmul, chunked over
  samples to bound memory; the weight gradient is then ``Σ_n G_n``, so it is not
  computed twice. Chosen when ``T² (d_in + d_out) > d_in d_out``.

The backward returns ordinary gradients, so autograd, hooks and DDP see nothing unusual.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import UnsupportedUseError
from . import amp
from .args import bind
from .site import Site, sq_norms

# Materialised per-sample gradients of one chunk may use at most this many elements
# beyond one sample's, or the size of the layer's saved input, whichever is larger.
_CHUNK_FLOOR = 1 << 18


class LinearFn(torch.autograd.Function):
    """``F.linear`` whose backward also hands per-sample results to a :class:`Site`."""

    @staticmethod
    def forward(ctx, x, weight, bias, site: Site):
        ctx.save_for_backward(x, weight)
        ctx.site, ctx.has_bias = site, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        site: Site = ctx.site
        gx = gy.matmul(weight.to(gy.dtype)) if ctx.needs_input_grad[0] else None
        n = x.shape[0]
        a = x.reshape(n, -1, x.shape[-1]).to(gy.dtype)
        d = gy.reshape(n, -1, gy.shape[-1])
        per_b = d.sum(1)  # [N, d_out]: per-sample bias gradients, and δ_n itself when T = 1
        bias_sq = functools.cache(lambda: sq_norms(per_b))
        gw = _weight_grad(site, a, d, bias_sq) if ctx.needs_input_grad[1] else None
        gb = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            site.give(site.bias, bias_sq, lambda: per_b, n)
            gb = per_b.sum(0)
        return gx, _cast(gw, weight), gb, None


def _cast(g: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    return None if g is None else g.to(like.dtype)


def _weight_grad(site: Site, a: torch.Tensor, d: torch.Tensor, delta_sq) -> torch.Tensor:
    """Weight gradient ``Σ_n G_n`` ``[d_out, d_in]``; per-sample results to the site.

    Args:
        a: layer input, ``[N, T, d_in]``.
        d: output gradient, ``[N, T, d_out]``.
        delta_sq: callable giving ``||Σ_t δ_nt||²`` ``[N]`` (used when ``T = 1``).
    """
    ref = site.weight
    n, t, d_in = a.shape
    d_out = d.shape[-1]
    if t == 1:
        a2, d2 = a[:, 0], d[:, 0]
        site.give(ref, lambda: sq_norms(a2) * delta_sq(), lambda: d2.unsqueeze(2) * a2.unsqueeze(1), n)
        return d2.t().mm(a2)
    if ref is None:
        return d.reshape(-1, d_out).t().mm(a.reshape(-1, d_in))
    if site.wants_grads(ref) or t * t * (d_in + d_out) > d_in * d_out:
        return _materialised(site, a, d)
    gram = torch.bmm(a, a.transpose(1, 2)).mul_(torch.bmm(d, d.transpose(1, 2)))
    site.give(ref, lambda: gram.sum((1, 2)), lambda: None, n)
    return d.reshape(-1, d_out).t().mm(a.reshape(-1, d_in))


def _materialised(site: Site, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``G_n = Δ_nᵀ A_n`` chunk by chunk; returns ``Σ_n G_n``."""
    n, _, d_in = a.shape
    d_out = d.shape[-1]
    step = chunk_size(n, d_in * d_out, a.numel())
    total = None
    for lo in range(0, n, step):
        g = torch.bmm(d[lo : lo + step].transpose(1, 2), a[lo : lo + step])
        site.give(site.weight, lambda: sq_norms(g, (1, 2)), lambda: g, n, lo)
        part = g.sum(0)
        total = part if total is None else total.add_(part)
    return total


def chunk_size(n: int, per_sample: int, budget: int) -> int:
    """Samples per chunk so that a chunk of ``[c, per_sample]`` stays within
    ``max(budget, _CHUNK_FLOOR, per_sample)`` elements."""
    return max(1, min(n, max(budget, _CHUNK_FLOOR) // max(per_sample, 1)))


def handle_linear(cap, func, args, kwargs):
    """Rule-table entry for ``F.linear(input, weight, bias=None)``."""
    x, weight, bias = bind(args, kwargs, ("input", "weight", "bias"), (None,))
    wref, bref = cap.ref(weight), cap.ref(bias)
    if (wref is None and bref is None) or not torch.is_grad_enabled():
        return func(*args, **kwargs)
    if x.dim() < 2:
        raise UnsupportedUseError(
            f"F.linear on an unbatched input of shape {tuple(x.shape)} (parameter "
            f"'{cap.name_of((wref or bref).param)}'): per-sample gradients need a "
            "leading sample dimension"
        )
    return apply_linear(cap, x, weight, bias)


def apply_linear(cap, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """``F.linear(x, weight, bias)`` measured per sample along dim 0 of ``x``.

    ``weight``/``bias`` may be parameters or views of them (slices of a packed
    projection); unmeasured ones are treated as constants of the rule."""
    site = cap.site(cap.ref(weight), cap.ref(bias))
    (x, weight, bias), ctx = amp.cast(x.device.type, (x, weight, bias))
    with ctx:
        return LinearFn.apply(x, weight, bias, site)
