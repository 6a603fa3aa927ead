"""Convolutions (1-, 2- and 3-D): per-sample weight gradients.

1-D and 2-D: from the unfolded input, by batched matmul (materialised, the weight
gradient is their sum) or by Gram matrices (norms only), whichever costs less
(:func:`_weight_grad_unfolded`). 3-D and depthwise: by a grouped convolution, as
follows. For input ``x`` ``[N, C_in, *S]`` and output gradient ``δ`` ``[N, C_out, *S']`` the
per-sample weight gradient is the weight gradient of the convolution applied to sample
``n`` alone. Folding the batch into the channel dimension (``[1, N·C_in, *S]``) and
multiplying the groups by ``N`` turns all of them into one grouped weight-gradient
convolution, whose result ``[N·C_out, C_in/groups, *k]`` is ``G_n`` for every sample.
The layer's weight gradient is then ``Σ_n G_n`` (not computed a second time), the bias
per-sample gradient is ``Σ_s δ_ns``. Samples are processed in chunks to bound memory.

String padding: ``"valid"`` is zero padding; ``"same"`` pads ``dilation·(k − 1)`` in
total per dimension, the extra element on the right when it is odd (as torch does).
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F

from ..errors import UnsupportedUseError
from . import amp
from .args import bind
from .linear import chunk_size
from .site import Site, sq_norms

_conv_backward = torch.ops.aten.convolution_backward


class ConvFn(torch.autograd.Function):
    """An N-d convolution whose backward also hands per-sample results to a site."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, site: Site, n: int):
        ctx.save_for_backward(x, weight)
        ctx.conf = (list(stride), list(padding), list(dilation), groups)
        ctx.site, ctx.has_bias, ctx.n = site, bias is not None, n
        return torch.ops.aten.convolution(x, weight, bias, *ctx.conf[:3], False, [0] * len(stride), groups)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        site: Site = ctx.site
        n, zeros = ctx.n, [0] * len(stride)
        k = x.shape[0] // n  # rows per sample (sample-major)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _conv_backward(gy, x, weight, None, stride, padding, dilation, False, zeros, groups, [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            # the grouped route is slow only when it needs many small chunks (wide
            # layers); depthwise layers would unfold to kernel× the input for tiny matmuls
            grouped_step = chunk_size(n, k * weight.numel(), x.numel() // 8)
            if len(stride) <= 2 and (site.policy.route is not None
                                     or (weight.shape[1] > 1 and grouped_step < min(n, 8))):
                gw = _weight_grad_unfolded(site, x, gy, weight, ctx.conf, n)
            else:
                gw = _weight_grad_grouped(site, x, gy, weight, ctx.conf, n)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            per = gy.flatten(2).sum(2).view(n, k, -1).sum(1)  # [N, C_out]
            site.give(site.bias, lambda: sq_norms(per), lambda: per, n)
            gb = per.sum(0)
        return gx, gw, gb, None, None, None, None, None, None


def _weight_grad_grouped(site: Site, x, gy, weight, conf, n: int) -> torch.Tensor:
    """3-D, depthwise and narrow convolutions: per-sample ``G_n`` by one grouped
    weight-gradient convolution per chunk (the batch folded into the groups); returns
    ``Σ_n G_n``."""
    stride, padding, dilation, groups = conf
    k = x.shape[0] // n
    gw = None
    step = site.policy.chunk(chunk_size(n, k * weight.numel(), x.numel() // 8))
    for lo in range(0, n, step):
        rows = slice(lo * k, (lo + step) * k)
        g = _per_sample_weight_grads(x[rows], gy[rows], weight, stride, padding, dilation, groups)
        if k > 1:
            g = g.view(-1, k, *weight.shape).sum(1)
        site.give(site.weight, lambda g=g: sq_norms(g.flatten(1)), lambda g=g: g, n, lo)
        part = g.sum(0)
        gw = part if gw is None else gw.add_(part)
        del g, part  # free this chunk before the next one is allocated
    return gw


def _weight_grad_unfolded(site: Site, x, gy, weight, conf, n: int) -> torch.Tensor:
    """1-D and 2-D convolutions from the unfolded input ``U_n`` ``[g, C_in/g·k, P]`` (``P``
    output positions of all rows of sample ``n``) and ``δ_n`` ``[g, C_out/g, P]``:

    * materialised: ``G_n = δ_n U_nᵀ`` by batched matmul; the weight gradient is
      ``Σ_n G_n``;
    * Gram: ``||G_n||² = Σ_{t,s} (u_t·u_s)(δ_t·δ_s)`` per group, ``O(P²(C_in k + C_out))``
      on top of the ordinary weight gradient: far cheaper where ``P`` is small against
      the channels (late CNN stages).

    Samples are unfolded chunk by chunk (memory bounded as for Linear). The route is
    the cheaper by the same rule as Linear's, unless the policy forces it."""
    groups = conf[3]
    k = x.shape[0] // n
    d_in, d_out, t = weight[0].numel(), weight.shape[0] // groups, k * gy[0, 0].numel()
    route = site.policy.route
    if route is None:
        step = chunk_size(n, weight.numel(), x.numel())
        route = "materialise" if step >= min(n, 8) or t * (d_in + d_out) > d_in * d_out else "gram"
    ref = site.weight
    materialise = ref is not None and (site.wants_grads(ref) or route == "materialise")
    per_sample = groups * d_in * t + (weight.numel() if materialise else groups * t * t)
    # budget: the size of the whole unfolded input (what an im2col convolution holds)
    step = site.policy.chunk(chunk_size(n, per_sample, x.numel() * weight[0, 0].numel()))
    gw = None
    for lo in range(0, n, step):
        rows = slice(lo * k, (lo + step) * k)
        u, d = _unfold(x[rows], gy[rows], weight, conf, k)  # [c·g, C·k/g, P], [c·g, C_out/g, P]
        c = u.shape[0] // groups
        if materialise:
            g = torch.bmm(d, u.transpose(1, 2)).view(c, *weight.shape)
            site.give(ref, lambda g=g: sq_norms(g.flatten(1)), lambda g=g: g, n, lo)
            part = g.sum(0)
            gw = part if gw is None else gw.add_(part)
            del g, part
        elif ref is not None:
            gram = torch.bmm(u.transpose(1, 2), u).mul_(torch.bmm(d.transpose(1, 2), d))
            sq = gram.sum((1, 2)).view(c, groups).sum(1)
            site.give(ref, lambda sq=sq: sq, lambda: None, n, lo)
        del u, d
    if materialise:
        return gw
    stride, padding, dilation, _ = conf
    return _conv_backward(gy, x, weight, None, stride, padding, dilation, False, [0] * len(stride), groups,
                          [False, True, False])[1]


def _unfold(x, gy, weight, conf, k: int):
    """Unfolded input ``[c·g, C_in/g·kernel, k·P]`` and output gradient
    ``[c·g, C_out/g, k·P]`` of ``c`` samples (``k`` rows each, side by side)."""
    stride, padding, dilation, groups = conf
    x2, gy2 = (x, gy) if x.dim() == 4 else (x.unsqueeze(2), gy.unsqueeze(2))
    kernel = weight.shape[2:] if weight.dim() == 4 else (1, weight.shape[2])
    two = lambda v, pad=1: list(v) if len(v) == 2 else [pad, v[0]]  # noqa: E731
    u = F.unfold(x2, kernel, dilation=two(dilation), padding=two(padding, 0), stride=two(stride))
    c, pos, c_out = x.shape[0] // k, u.shape[2], weight.shape[0]
    u = u.view(c, k, groups, -1, pos).permute(0, 2, 3, 1, 4).reshape(c * groups, -1, k * pos)
    d = gy2.reshape(c, k, groups, c_out // groups, pos).permute(0, 2, 3, 1, 4).reshape(c * groups, c_out // groups, k * pos)
    return u, d


def _per_sample_weight_grads(x, gy, weight, stride, padding, dilation, groups) -> torch.Tensor:
    """``G_n`` ``[c, C_out, C_in/groups, *k]`` for a chunk of ``c`` samples."""
    c = x.shape[0]
    c_out = weight.shape[0]
    folded_w = weight.new_empty(()).expand(c * c_out, *weight.shape[1:])  # shape only
    g = _conv_backward(
        gy.reshape(1, c * c_out, *gy.shape[2:]),
        x.reshape(1, c * x.shape[1], *x.shape[2:]),
        folded_w, None, stride, padding, dilation, False, [0] * len(stride), c * groups,
        [False, True, False],
    )[1]
    return g.view(c, *weight.shape)


def _ntuple(v, d: int) -> List[int]:
    return list(v) if isinstance(v, (list, tuple)) else [int(v)] * d


def _explicit_padding(x, padding, kernel: Sequence[int], dilation: List[int]):
    """Turn string padding into numbers, padding ``x`` itself where "same" is uneven."""
    d = len(kernel)
    if not isinstance(padding, str):
        return x, _ntuple(padding, d)
    if padding == "valid":
        return x, [0] * d
    if padding != "same":
        raise ValueError(f"unknown padding {padding!r}")
    totals = [dl * (k - 1) for dl, k in zip(dilation, kernel)]
    if all(t % 2 == 0 for t in totals):
        return x, [t // 2 for t in totals]
    pads: List[int] = []
    for t in reversed(totals):  # F.pad lists the last dimension first
        pads += [t // 2, t - t // 2]
    return F.pad(x, pads), [0] * d


def handle_conv(cap, func, args, kwargs):
    """Rule-table entry for ``torch.conv1d/2d/3d``."""
    x, weight, bias, stride, padding, dilation, groups = bind(
        args, kwargs, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"), (None, 1, 0, 1, 1)
    )
    if cap.ref(x) is not None:
        return cap.direct(func, args, kwargs)
    wref, bref = cap.ref(weight), cap.ref(bias)
    if wref is None and bref is None:
        return func(*args, **kwargs)
    d = weight.dim() - 2
    if x.dim() != d + 2:
        raise UnsupportedUseError(
            f"conv{d}d on an unbatched input of shape {tuple(x.shape)} (parameter "
            f"'{cap.name_of((wref or bref).params[0])}'): per-sample gradients need a "
            "leading sample dimension"
        )
    n = cap.samples(x.shape[0], f"conv{d}d")
    stride, dilation = _ntuple(stride, d), _ntuple(dilation, d)
    x, padding = _explicit_padding(x, padding, weight.shape[2:], dilation)
    site = cap.site(wref, bref)
    (x, weight, bias), ctx = amp.cast(x.device.type, (x, weight, bias))
    with ctx:
        return ConvFn.apply(x, weight, bias, stride, padding, dilation, int(groups), site, n)
