"""Normalisation layers' affine parameters: ``y = x̂ ⊙ w + b``.

Each normalisation (LayerNorm, RMSNorm, GroupNorm, InstanceNorm, BatchNorm in eval
mode) is split into the normalisation without affine parameters, left to autograd, and
the affine map :class:`AffineFn`, whose per-sample gradients are, summing over every
dimension except the sample dimension and the parameter's own::

    g_n^w = Σ δ_n ⊙ x̂_n        g_n^b = Σ δ_n

These are small (``[N, *w.shape]``) and always computed in full.
BatchNorm in training mode mixes samples and is refused.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import SampleMixingError
from .args import bind
from .site import Site, sq_norms


class AffineFn(torch.autograd.Function):
    """``x̂ ⊙ w + b`` with ``w``, ``b`` broadcast over the trailing ``len(shape)`` dims
    (``channel=False``) or over dim 1 (``channel=True``)."""

    @staticmethod
    def forward(ctx, xhat, weight, bias, channel: bool, site: Site):
        ctx.save_for_backward(xhat, weight)
        ctx.channel, ctx.site, ctx.has_bias = channel, site, bias is not None
        ctx.bias_shape = None if bias is None else bias.shape
        y = xhat if weight is None else xhat * _bcast(weight, xhat, channel)
        return y if bias is None else y + _bcast(bias, xhat, channel)

    @staticmethod
    def backward(ctx, gy):
        xhat, weight = ctx.saved_tensors
        site: Site = ctx.site
        n = gy.shape[0]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = gy if weight is None else gy * _bcast(weight, xhat, ctx.channel)
        if weight is not None and ctx.needs_input_grad[1]:
            per = _per_sample(gy * xhat, weight.shape, ctx.channel)
            site.give(site.weight, lambda: sq_norms(per.flatten(1)), lambda: per, n)
            gw = per.sum(0)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            per_b = _per_sample(gy, ctx.bias_shape, ctx.channel)
            site.give(site.bias, lambda: sq_norms(per_b.flatten(1)), lambda: per_b, n)
            gb = per_b.sum(0)
        return gx, gw, gb, None, None


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


def _affine(cap, xhat, weight, bias, channel: bool):
    wref, bref = cap.ref(weight), cap.ref(bias)
    return AffineFn.apply(xhat, weight, bias, channel, cap.site(wref, bref))


def _measured(cap, *params) -> bool:
    return torch.is_grad_enabled() and any(cap.ref(p) is not None for p in params)


def handle_layer_norm(cap, func, args, kwargs):
    x, shape, weight, bias, eps = bind(args, kwargs, ("input", "normalized_shape", "weight", "bias", "eps"), (None, None, 1e-5))
    if not _measured(cap, weight, bias):
        return func(*args, **kwargs)
    return _affine(cap, func(x, shape, None, None, eps), weight, bias, channel=False)


def handle_rms_norm(cap, func, args, kwargs):
    x, shape, weight, eps = bind(args, kwargs, ("input", "normalized_shape", "weight", "eps"), (None, None))
    if not _measured(cap, weight):
        return func(*args, **kwargs)
    return _affine(cap, func(x, shape, None, eps), weight, None, channel=False)


def handle_group_norm(cap, func, args, kwargs):
    x, groups, weight, bias, eps = bind(args, kwargs, ("input", "num_groups", "weight", "bias", "eps"), (None, None, 1e-5))
    if not _measured(cap, weight, bias):
        return func(*args, **kwargs)
    return _affine(cap, func(x, groups, None, None, eps), weight, bias, channel=True)


def handle_instance_norm(cap, func, args, kwargs):
    names = ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps")
    x, rm, rv, weight, bias, use_stats, momentum, eps = bind(args, kwargs, names, (None, None, None, None, True, 0.1, 1e-5))
    if not _measured(cap, weight, bias):
        return func(*args, **kwargs)
    return _affine(cap, func(x, rm, rv, None, None, use_stats, momentum, eps), weight, bias, channel=True)


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
    return _affine(cap, func(x, rm, rv, None, None, False, momentum, eps), weight, bias, channel=True)
