"""Normalisation layers' affine parameters: ``y = x̂ ⊙ w + b``.

Each normalisation (LayerNorm, RMSNorm, GroupNorm, InstanceNorm, BatchNorm in eval
mode) runs as torch runs it, forward and backward. A hook on its output's gradient
``δ`` recomputes ``x̂ = norm(x)`` without the affine parameters (one extra
normalisation forward) and, summing over every dimension except the sample dimension
and the parameter's own, forms the per-sample gradients::

    g_n^w = Σ δ_n ⊙ x̂_n        g_n^b = Σ δ_n

These are small (``[N, *w.shape]``) and always computed in full. The hook holds only
``x``, which the layer saves anyway, so no activation-sized tensor is kept alive.
BatchNorm in training mode mixes samples and is refused.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch

from ..errors import SampleMixingError
from .args import bind
from .site import Site, sq_norms, take


def _observed(cap, y: torch.Tensor, x: torch.Tensor, weight, bias, recompute: Callable, channel: bool):
    """Hook ``y``'s gradient ``δ``; there, recompute ``x̂ = recompute(x)`` and hand the
    per-sample gradients of ``weight`` and ``bias`` to the store."""
    n = cap.samples(x.shape[0], "normalisation")
    site = cap.site(cap.ref(weight), cap.ref(bias))
    if y.requires_grad:
        box = [x.detach()]  # emptied by the hook: x is not kept alive after it ran
        w_shape = None if weight is None else weight.shape
        b_shape = None if bias is None else bias.shape
        y.register_hook(lambda d: _observe(site, take(box), d, recompute, channel, w_shape, b_shape, n))
    return y


def _observe(site: Site, x, d, recompute, channel, w_shape, b_shape, n: int) -> None:
    if site.weight is not None:
        with torch.no_grad():
            per = _per_sample(d * recompute(x), w_shape, channel, n)
        site.give(site.weight, lambda: sq_norms(per.flatten(1)), lambda: per, n)
    if site.bias is not None:
        per_b = _per_sample(d, b_shape, channel, n)
        site.give(site.bias, lambda: sq_norms(per_b.flatten(1)), lambda: per_b, n)


def _per_sample(t: torch.Tensor, shape: Sequence[int], channel: bool, n: int) -> torch.Tensor:
    """Sum ``t`` ``[k·N, ...]`` (``k`` rows per sample) over all dims but the sample dim
    and the parameter's (dim 1 for ``channel`` norms, the last ones otherwise)."""
    if channel:
        return t.reshape(n, t.shape[0] // n, t.shape[1], -1).sum((1, 3))
    return t.reshape(n, -1, *shape).sum(1)


def _measured(cap, *params) -> bool:
    return any(cap.ref(p) is not None for p in params)


def handle_layer_norm(cap, func, args, kwargs):
    x, shape, weight, bias, eps = bind(args, kwargs, ("input", "normalized_shape", "weight", "bias", "eps"), (None, None, 1e-5))
    if cap.ref(x) is not None:
        return cap.direct(func, args, kwargs)
    if not _measured(cap, weight, bias):
        return func(*args, **kwargs)
    y = func(*args, **kwargs)
    return _observed(cap, y, x, weight, bias, partial(func, normalized_shape=shape, eps=eps), channel=False)


def handle_rms_norm(cap, func, args, kwargs):
    x, shape, weight, eps = bind(args, kwargs, ("input", "normalized_shape", "weight", "eps"), (None, None))
    if cap.ref(x) is not None:
        return cap.direct(func, args, kwargs)
    if not _measured(cap, weight):
        return func(*args, **kwargs)
    y = func(*args, **kwargs)
    return _observed(cap, y, x, weight, None, partial(func, normalized_shape=shape, eps=eps), channel=False)


def handle_group_norm(cap, func, args, kwargs):
    x, groups, weight, bias, eps = bind(args, kwargs, ("input", "num_groups", "weight", "bias", "eps"), (None, None, 1e-5))
    if cap.ref(x) is not None:
        return cap.direct(func, args, kwargs)
    if not _measured(cap, weight, bias):
        return func(*args, **kwargs)
    y = func(*args, **kwargs)
    return _observed(cap, y, x, weight, bias, partial(func, num_groups=groups, eps=eps), channel=True)


def handle_instance_norm(cap, func, args, kwargs):
    names = ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps")
    x, rm, rv, weight, bias, use_stats, momentum, eps = bind(args, kwargs, names, (None, None, None, None, True, 0.1, 1e-5))
    if cap.ref(x) is not None:
        return cap.direct(func, args, kwargs)
    if not _measured(cap, weight, bias):
        return func(*args, **kwargs)
    y = func(*args, **kwargs)
    # the recomputation must not update the running statistics a second time
    if use_stats:
        recompute = partial(func, use_input_stats=True, eps=eps)
    else:
        recompute = partial(func, running_mean=rm, running_var=rv, use_input_stats=False, eps=eps)
    return _observed(cap, y, x, weight, bias, recompute, channel=True)


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
    if cap.ref(x) is not None:
        return cap.direct(func, args, kwargs)
    if not _measured(cap, weight, bias):
        return func(*args, **kwargs)
    y = func(*args, **kwargs)
    recompute = partial(func, running_mean=rm, running_var=rv, training=False, eps=eps)
    return _observed(cap, y, x, weight, bias, recompute, channel=True)
