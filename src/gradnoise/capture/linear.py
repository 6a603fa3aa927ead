"""Linear layers: ``y = a Wᵀ + b`` on ``a`` of shape ``[N, d_in]`` or ``[N, *T, d_in]``.

Per-sample gradients, with ``δ = ∂L/∂y`` and the middle dimensions flattened to ``T``::

    g_n^W = Σ_t δ_nt a_ntᵀ          [d_out, d_in]
    g_n^b = Σ_t δ_nt                 [d_out]

* 2-D input: ``||g_n^W||² = ||a_n||² ||δ_n||²`` at ``O(N (d_in + d_out))``, from a hook
  on ``δ``; the layer keeps autograd's own backward.
* ``T > 1``, Gram route: ``||g_n^W||² = Σ_{t,s} (a_nt·a_ns)(δ_nt·δ_ns)`` at
  ``O(N T² (d_in + d_out))`` on top of the usual weight gradient.
* ``T > 1``, materialised route: ``G_n = Δ_nᵀ A_n`` by batched matmul, chunked over
  samples to bound memory; the weight gradient is then ``Σ_n G_n``, so it is not
  computed twice. :func:`_materialise_cheaper` picks the route (measured costs).

The backward returns ordinary gradients, so autograd, hooks and DDP see nothing unusual.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import UnsupportedUseError
from . import amp
from .args import bind
from .site import Site, sq_norms, take

# Materialised per-sample gradients of one chunk may use at most this many elements
# beyond one sample's, or the size of the layer's saved input, whichever is larger.
_CHUNK_FLOOR = 1 << 18


class LinearFn(torch.autograd.Function):
    """``F.linear`` on ``[N, *T, d_in]`` (``T`` non-empty) whose backward also hands
    per-sample results to a :class:`Site`; 2-D inputs take :func:`_observed_2d`."""

    @staticmethod
    def forward(ctx, x, weight, bias, site: Site, n: int):
        ctx.save_for_backward(x, weight)
        ctx.site, ctx.has_bias, ctx.n = site, bias is not None, n
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        site: Site = ctx.site
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = gy.matmul(weight) if need_x else None
        gw, gb = _grads_seq(site, x, gy, need_w, need_b and ctx.has_bias, ctx.n)
        return gx, gw, gb, None, None


def _observed_2d(site: Site, x: torch.Tensor, weight, bias):
    """2-D input: plain ``F.linear`` (its backward stays in C++), and a hook on the
    output's gradient ``δ`` that computes the per-sample results, as the weight gradient
    needs nothing beyond what autograd already computes."""
    y = F.linear(x, weight, bias)
    if y.requires_grad:
        # a one-shot box, emptied by the hook, so the hook does not keep x alive after it
        # ran (the graph node, with its hooks, can outlive its own backward)
        box = [x.detach() if site.weight is not None else None]
        y.register_hook(lambda d: _observe_2d(site, take(box), d))
    return y


def _observe_2d(site: Site, a: Optional[torch.Tensor], d: torch.Tensor) -> None:
    """``||g_n^W||² = ||a_n||² ||δ_n||²``, ``||g_n^b||² = ||δ_n||²`` (or the per-sample
    gradients themselves where the store needs them)."""
    n = d.shape[0]
    d_sq = None
    if site.bias is not None and not site.wants_grads(site.bias):
        d_sq = sq_norms(d)
    site.give(site.bias, lambda: d_sq, lambda: d, n)
    if a is not None:
        site.give(
            site.weight,
            lambda: sq_norms(a) * (d_sq if d_sq is not None else sq_norms(d)),
            lambda: d.unsqueeze(2) * a.unsqueeze(1),
            n,
        )


def _grads_seq(site: Site, x: torch.Tensor, gy: torch.Tensor, need_w: bool, need_b: bool, n: int):
    """``x`` ``[M, *T, d_in]``, ``gy`` ``[M, *T, d_out]`` with ``M = k·n`` rows, ``k`` per
    sample (sample-major): all but the last dim are flattened to ``[n, k·T, ·]``."""
    a = x.reshape(n, -1, x.shape[-1])
    d = gy.reshape(n, -1, gy.shape[-1])
    gw = gb = None
    if need_b:
        per = d.sum(1)  # [N, d_out]
        site.give(site.bias, lambda: sq_norms(per), lambda: per, n)
        gb = per.sum(0)
    if need_w:
        gw = _weight_grad_seq(site, a, d)
    return gw, gb


def _weight_grad_seq(site: Site, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Weight gradient ``Σ_n G_n`` ``[d_out, d_in]`` from ``a`` ``[N, T, d_in]`` and
    ``d`` ``[N, T, d_out]``; per-sample results to the site (Gram or materialised)."""
    ref = site.weight
    n, t, d_in = a.shape
    d_out = d.shape[-1]
    route = site.policy.route
    if route is None:
        route = "materialise" if _materialise_cheaper(n, t, d_in, d_out) else "gram"
    if ref is not None and (site.wants_grads(ref) or route == "materialise"):
        return _materialised(site, a, d)
    if ref is not None:
        gram = torch.bmm(a, a.transpose(1, 2)).mul_(torch.bmm(d, d.transpose(1, 2)))
        site.give(ref, lambda: gram.sum((1, 2)), lambda: None, n)
    return d.reshape(-1, d_out).t().mm(a.reshape(-1, d_in))


def _materialise_cheaper(n: int, t: int, d_in: int, d_out: int) -> bool:
    """The route choice, from measurements on 2 CPU threads: materialising costs little
    beyond the weight gradient while chunks hold ≥ 8 samples (or the whole batch); with
    smaller chunks it wins only where the Gram route's extra ``T²(d_in + d_out)`` per
    sample exceeds the weight gradient's ``T·d_in·d_out``."""
    step = chunk_size(n, d_in * d_out, n * t * max(d_in, d_out))
    return step >= min(n, 8) or t * (d_in + d_out) > d_in * d_out


def _materialised(site: Site, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``G_n = Δ_nᵀ A_n`` chunk by chunk; returns ``Σ_n G_n``."""
    n, _, d_in = a.shape
    d_out = d.shape[-1]
    step = site.policy.chunk(chunk_size(n, d_in * d_out, max(a.numel(), d.numel())))
    total = None
    for lo in range(0, n, step):
        g = torch.bmm(d[lo : lo + step].transpose(1, 2), a[lo : lo + step])
        site.give(site.weight, lambda g=g: sq_norms(g, (1, 2)), lambda g=g: g, n, lo)
        part = g.sum(0)
        total = part if total is None else total.add_(part)
        del g, part  # free this chunk before the next one is allocated
    return total


def chunk_size(n: int, per_sample: int, budget: int) -> int:
    """Samples per chunk so that a chunk of ``[c, per_sample]`` stays within
    ``max(budget, _CHUNK_FLOOR, per_sample)`` elements."""
    return max(1, min(n, max(budget, _CHUNK_FLOOR) // max(per_sample, 1)))


def handle_linear(cap, func, args, kwargs):
    """Rule-table entry for ``F.linear(input, weight, bias=None)``."""
    if kwargs or len(args) != 3:
        x, weight, bias = bind(args, kwargs, ("input", "weight", "bias"), (None,))
    else:
        x, weight, bias = args
    if cap.ref(x) is not None:  # a parameter as the input: no linear layer
        return cap.direct(func, args, kwargs)
    wref, bref = cap.ref(weight), cap.ref(bias)
    if wref is None and bref is None:
        return func(*args, **kwargs)
    return apply_linear(cap, x, weight, bias, cap.site(wref, bref))


def handle_addmm(cap, func, args, kwargs):
    """``torch.addmm(b, x, W)`` (Hugging Face's ``Conv1D`` on ``x.view(-1, d)``) is
    ``F.linear(x, Wᵀ, b)``; any other form goes to the direct-use rule."""
    b, x, w, beta, alpha = bind(args, kwargs, ("input", "mat1", "mat2", "beta", "alpha"), (1, 1))
    wref = cap.ref(w)
    if beta != 1 or alpha != 1 or cap.ref(x) is not None or b.dim() != 1 or wref is None:
        return cap.direct(func, args, kwargs)
    return apply_linear(cap, x, w.t(), b, cap.site(wref.then(lambda t: t.t()), cap.ref(b)))


def handle_matmul(cap, func, args, kwargs):
    """``x @ W`` with a measured 2-D ``W`` is ``F.linear(x, Wᵀ)``; any other form goes
    to the direct-use rule."""
    x, w = bind(args, kwargs, ("input", "other"))
    wref = cap.ref(w)
    if wref is None or w.dim() != 2 or x.dim() < 2 or cap.ref(x) is not None:
        return cap.direct(func, args, kwargs)
    return apply_linear(cap, x, w.t(), None, cap.site(wref.then(lambda t: t.t()), None))


def apply_linear(cap, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], site: Optional[Site] = None):
    """``F.linear(x, weight, bias)`` measured per sample along dim 0 of ``x``: ``x``
    ``[M, *T, d_in]`` with ``M`` the batch size or a multiple of it (``k`` rows per
    sample, sample-major, such as ``x.view(-1, d)`` of ``[B, T, d]``).

    ``weight``/``bias`` may be parameters, views of them (slices of a packed
    projection) or parameter expressions; unmeasured ones are constants of the rule."""
    if site is None:
        site = cap.site(cap.ref(weight), cap.ref(bias))
    if x.dim() < 2:
        raise UnsupportedUseError(
            f"F.linear on an unbatched input of shape {tuple(x.shape)} (parameter "
            f"'{cap.name_of((site.weight or site.bias).params[0])}'): per-sample gradients "
            "need a leading sample dimension"
        )
    n = cap.samples(x.shape[0], "F.linear")
    if x.dim() == 2 and n == x.shape[0]:
        return _observed_2d(site, x, weight, bias)
    (x, weight, bias), ctx = amp.cast(x.device.type, (x, weight, bias))
    with ctx:
        return LinearFn.apply(x, weight, bias, site, n)
