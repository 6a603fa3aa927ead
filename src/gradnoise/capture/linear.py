"""Linear layers: ``y = a Wᵀ + b`` on ``a`` ``[…, d_in]``, the samples on any dimension but
the last.

Kernel (:func:`linear_forms`), samples first and every other position flattened to ``T``,
``δ = ∂L/∂y``::

    G_n^W = Σ_t δ_nt a_ntᵀ      [d_out, d_in]   Factored(rows=δ, cols=a)
    g_n^b = Σ_t δ_nt            [d_out]         Dense

The store turns the factored form into squared norms by the cheaper route (Gram
``Σ_{t,s} (a_t·a_s)(δ_t·δ_s)`` or materialised ``Δ_nᵀ A_n`` in chunks) and into cross
terms with the parameter's other uses. One sample, one position (``[N, d_in]`` data): the
layer runs as torch runs it and a hook on ``δ`` hands the forms over (``||a||²·||δ||²``).
Otherwise :class:`LinearFn` takes the weight gradient from the store (``Σ_n G_n`` of the
materialised route, else one matrix product), so it is never computed twice.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from ..errors import SampleMixingError, UnsupportedUseError
from . import amp
from .args import bind
from .forms import Dense, Factored, Form, sq_norms
from .layout import Layout, sample_rows
from .site import Site, take


def linear_forms(a: torch.Tensor, d: torch.Tensor) -> Dict[str, Form]:
    """Per-sample forms of ``F.linear``: ``a`` ``[n, T, d_in]``, ``δ`` ``[n, T, d_out]``."""
    return {"weight": Factored(d, a, d.shape[-1]), "bias": Dense(d.sum(1) if d.shape[1] > 1 else d[:, 0])}


class LinearFn(torch.autograd.Function):
    """``F.linear`` whose backward hands the per-sample forms to its site and returns the
    weight and bias gradients the store sums from them."""

    @staticmethod
    def forward(ctx, x, weight, bias, site: Site, lay: Layout):
        ctx.save_for_backward(x, weight)
        ctx.site, ctx.lay = site, lay
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        site: Site = ctx.site
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = gy.matmul(weight) if need_x else None
        n, lay = site.n, ctx.lay
        forms = linear_forms(sample_rows(x, lay, n), sample_rows(gy, lay, n))
        gb = site.give("bias", forms["bias"], want_sum=need_b)
        gw = site.give("weight", forms["weight"], want_sum=need_w)
        return gx, gw, gb, None, None


def _observed_2d(site: Site, x: torch.Tensor, weight, bias):
    """``[N, d_in]`` data: plain ``F.linear`` (its backward stays in C++) and a hook on
    ``δ`` that hands over the forms, as the weight gradient needs nothing beyond what
    autograd computes."""
    y = F.linear(x, weight, bias)
    if y.requires_grad:
        # a one-shot box, emptied by the hook, so the hook does not keep x alive after it
        # ran (the graph node, with its hooks, can outlive its own backward)
        box = [x.detach()]
        y.register_hook(lambda d: _observe_2d(site, take(box), d))
    return y


def _observe_2d(site: Site, a: torch.Tensor, d: torch.Tensor) -> None:
    """One position per sample: ``||g_n^W||² = ||a_n||²·||δ_n||²``, ``||g_n^b||² = ||δ_n||²``
    (``||δ_n||²`` computed once for both)."""
    d_sq = sq_norms(d)
    if "bias" in site:
        site.give("bias", Dense(d, d_sq))
    if "weight" in site:
        site.give("weight", Factored(d.unsqueeze(1), a.unsqueeze(1), d.shape[-1], sq=d_sq * sq_norms(a)))


def apply_linear(cap, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 lay: Optional[Layout] = None, wref=None, bref=None):
    """``F.linear(x, weight, bias)`` measured per sample: the samples of ``x`` where the
    tracker (or ``lay``) says. ``weight``/``bias`` may be parameters, views of them (slices
    of a packed projection) or parameter expressions; unmeasured ones are constants of
    the rule. ``wref``/``bref`` override the references looked up for them."""
    wref = cap.ref(weight) if wref is None else wref
    bref = cap.ref(bias) if bref is None else bref
    if x.dim() < 2:
        raise UnsupportedUseError(
            f"F.linear on an unbatched input of shape {tuple(x.shape)} (parameter "
            f"'{cap.name_of((wref or bref).params[0])}'): per-sample gradients need a "
            "leading sample dimension"
        )
    if lay is None:
        lay, n = cap.layout(x, "F.linear")
    else:
        n = cap.tracker.n if cap.tracker.n is not None else x.shape[lay.dim]
    if lay.dim == x.dim() - 1:
        raise SampleMixingError("F.linear contracts the sample dimension of its input: each "
                                "output mixes samples, so per-sample gradients do not exist")
    out_features = (weight if weight is not None else bias).shape[0]
    site = cap.site({"weight": wref, "bias": bref}, n, budget=x.numel() // x.shape[-1] * max(x.shape[-1], out_features))
    site.use("weight", "cols", lambda: sample_rows(x.detach(), lay, n))
    site.use("bias")
    if x.dim() == 2 and lay == Layout(0):
        y = _observed_2d(site, x, weight, bias)
    else:
        (x, weight, bias), ctx = amp.cast(x.device.type, (x, weight, bias))
        with ctx:
            y = LinearFn.apply(x, weight, bias, site, lay)
    cap.record_layout(y, lay)
    return y


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
    return apply_linear(cap, x, weight, bias, wref=wref, bref=bref)


def handle_addmm(cap, func, args, kwargs):
    """``torch.addmm(b, x, W)`` (Hugging Face's ``Conv1D`` on ``x.view(-1, d)``) is
    ``F.linear(x, Wᵀ, b)``; any other form goes to the direct-use rule."""
    b, x, w, beta, alpha = bind(args, kwargs, ("input", "mat1", "mat2", "beta", "alpha"), (1, 1))
    wref = cap.ref(w)
    if beta != 1 or alpha != 1 or cap.ref(x) is not None or b.dim() != 1 or wref is None:
        return cap.direct(func, args, kwargs)
    return apply_linear(cap, x, w.t(), b, wref=wref.then(lambda t: t.t()), bref=cap.ref(b))


def handle_matmul(cap, func, args, kwargs):
    """``x @ W`` with a measured 2-D ``W`` is ``F.linear(x, Wᵀ)``; any other form goes
    to the direct-use rule."""
    x, w = bind(args, kwargs, ("input", "other"))
    wref = cap.ref(w)
    if wref is None or w.dim() != 2 or x.dim() < 2 or cap.ref(x) is not None:
        return cap.direct(func, args, kwargs)
    return apply_linear(cap, x, w.t(), None, wref=wref.then(lambda t: t.t()), bref=None)
