"""Normalisation layers' affine parameters: ``y = x̂ ⊙ w + b``.

Each normalisation (LayerNorm, RMSNorm, GroupNorm, InstanceNorm, BatchNorm in eval
mode) runs as its normalisation without affine parameters, ``x̂ = norm(x)``, followed by
the affine map, inside :class:`NormFn`. Summing over every dimension except the sample
dimension and the parameter's own, the per-sample gradients are::

    g_n^w = Σ δ_n ⊙ x̂_n        g_n^b = Σ δ_n

These are small (``[N, *w.shape]``) and always computed in full. Only ``x`` is saved,
as the plain layer does; ``x̂`` is recomputed in the backward (one extra normalisation
forward), so no activation-sized tensor is kept alive.
BatchNorm in training mode mixes samples and is refused.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch

from ..errors import SampleMixingError
from .args import bind
from .site import Site, sq_norms


class NormFn(torch.autograd.Function):
    """``normalize(x) ⊙ w + b`` with ``w``, ``b`` over the trailing dims (``channel=False``)
    or over dim 1 (``channel=True``). ``recompute`` gives the same ``x̂`` without side
    effects (no running-statistics update)."""

    @staticmethod
    def forward(ctx, x, weight, bias, normalize: Callable, recompute: Callable, channel: bool, site: Site):
        ctx.save_for_backward(x, weight)
        ctx.recompute, ctx.channel, ctx.site = recompute, channel, site
        ctx.has_bias = bias is not None
        ctx.bias_shape = None if bias is None else bias.shape
        y = normalize(x)
        if weight is not None:
            y = y * _bcast(weight, y, channel)
        return y if bias is None else y + _bcast(bias, y, channel)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        site: Site = ctx.site
        n = gy.shape[0]
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(ctx.needs_input_grad[0])
            xhat = ctx.recompute(x_in)
        gx = gw = gb = None
        if weight is not None and ctx.needs_input_grad[1]:
            per = _per_sample(gy * xhat.detach(), weight.shape, ctx.channel)
            site.give(site.weight, lambda: sq_norms(per.flatten(1)), lambda: per, n)
            gw = per.sum(0)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            per_b = _per_sample(gy, ctx.bias_shape, ctx.channel)
            site.give(site.bias, lambda: sq_norms(per_b.flatten(1)), lambda: per_b, n)
            gb = per_b.sum(0)
        if ctx.needs_input_grad[0]:
            g_xhat = gy if weight is None else gy * _bcast(weight, gy, ctx.channel)
            (gx,) = torch.autograd.grad(xhat, x_in, g_xhat)
        return gx, gw, gb, None, None, None, None


def _bcast(p: torch.Tensor, x: torch.Tensor, channel: bool) -> torch.Tensor:
    if channel:
        return p.view(1, -1, *([1] * (x.dim() - 2)))
    return p


def _per_sample(t: torch.Tensor, shape: Sequence[int], channel: bool) -> torch.Tensor:
    """Sum ``t`` ``[N, ...]`` over all dims but the sample dim and the parameter's."""
    n = t.shape[0]
    if channel:
        return t.reshape(n, t.shape[1], -1).sum(2)
    return t.reshape(n, -1, *shape).sum(1)


def _measured(cap, *params) -> bool:
    return torch.is_grad_enabled() and any(cap.ref(p) is not None for p in params)


def _apply(cap, x, weight, bias, normalize, channel: bool, recompute=None):
    site = cap.site(cap.ref(weight), cap.ref(bias))
    return NormFn.apply(x, weight, bias, normalize, recompute or normalize, channel, site)


def handle_layer_norm(cap, func, args, kwargs):
    x, shape, weight, bias, eps = bind(args, kwargs, ("input", "normalized_shape", "weight", "bias", "eps"), (None, None, 1e-5))
    if not _measured(cap, weight, bias):
        return func(*args, **kwargs)
    return _apply(cap, x, weight, bias, partial(func, normalized_shape=shape, eps=eps), channel=False)


def handle_rms_norm(cap, func, args, kwargs):
    x, shape, weight, eps = bind(args, kwargs, ("input", "normalized_shape", "weight", "eps"), (None, None))
    if not _measured(cap, weight):
        return func(*args, **kwargs)
    return _apply(cap, x, weight, None, partial(func, normalized_shape=shape, eps=eps), channel=False)


def handle_group_norm(cap, func, args, kwargs):
    x, groups, weight, bias, eps = bind(args, kwargs, ("input", "num_groups", "weight", "bias", "eps"), (None, None, 1e-5))
    if not _measured(cap, weight, bias):
        return func(*args, **kwargs)
    return _apply(cap, x, weight, bias, partial(func, num_groups=groups, eps=eps), channel=True)


def handle_instance_norm(cap, func, args, kwargs):
    names = ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps")
    x, rm, rv, weight, bias, use_stats, momentum, eps = bind(args, kwargs, names, (None, None, None, None, True, 0.1, 1e-5))
    if not _measured(cap, weight, bias):
        return func(*args, **kwargs)
    normalize = partial(func, running_mean=rm, running_var=rv, use_input_stats=use_stats, momentum=momentum, eps=eps)
    # the recomputation must not update the running statistics a second time
    recompute = normalize if not use_stats else partial(func, use_input_stats=True, eps=eps)
    return _apply(cap, x, weight, bias, normalize, channel=True, recompute=recompute)


def handle_batch_norm(cap, func, args, kwargs):
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    x, rm, rv, weight, bias, training, momentum, eps = bind(args, kwargs, names, (None, None, False, 0.1, 1e-5))
    if torch.is_grad_enabled() and (training or rm is None):
        raise SampleMixingError(
            "batch_norm in training mode normalises with the statistics of the whole "
            "batch, so per-sample gradients do not exist. Use eval mode, GroupNorm/"
            "LayerNorm, or the micro-batch source (gradnoise.NoiseMonitor(model, "
            "source='microbatch'))."
        )
    if not _measured(cap, weight, bias):
        return func(*args, **kwargs)
    normalize = partial(func, running_mean=rm, running_var=rv, training=False, momentum=momentum, eps=eps)
    return _apply(cap, x, weight, bias, normalize, channel=True)
