"""Normalisation layers' affine parameters: ``y = x̂ ⊙ w + b``.

Each normalisation (LayerNorm, RMSNorm, GroupNorm, InstanceNorm, BatchNorm in eval
mode) runs as torch runs it, forward and backward. A hook on its output's gradient
``δ`` recomputes ``x̂ = norm(x)`` without the affine parameters (one extra
normalisation forward) and hands over the kernel's dense forms (:func:`affine_forms`)::

    g_n^w = Σ δ_n ⊙ x̂_n        g_n^b = Σ δ_n

summed over every dimension except the sample's and the parameter's own (``[n, *w.shape]``,
small). The hook holds only ``x``, which the layer saves anyway. BatchNorm in training
mode mixes samples and is refused.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Dict, Optional, Sequence

import torch

from ..errors import MICROBATCH_RECIPE, SampleMixingError
from .args import bind
from .forms import Dense, Form
from .layout import Layout, to_samples
from .site import Site, take


def affine_forms(xhat: Optional[torch.Tensor], d: torch.Tensor, w_shape, b_shape, channel: bool) -> Dict[str, Form]:
    """Per-sample forms of an affine ``x̂ ⊙ w + b``: ``x̂`` and ``δ`` ``[n, k, *feature
    dims]`` (``k`` positions of the sample dimension per sample); ``channel``: the
    parameters run along feature dim 0 (GroupNorm, InstanceNorm, BatchNorm: sums over the
    positions are dot products per channel), else along the last ``len(w_shape)`` dims
    (LayerNorm, RMSNorm)."""
    out = {}
    if channel:
        d3 = _channels(d)
        if w_shape is not None:
            out["weight"] = Dense(torch.linalg.vecdot(d3, _channels(xhat), dim=-1))
        if b_shape is not None:
            out["bias"] = Dense(d3.sum(-1))
        return out
    n = d.shape[0]
    if w_shape is not None:
        out["weight"] = Dense((d * xhat).reshape(n, -1, *w_shape).sum(1))
    if b_shape is not None:
        out["bias"] = Dense(d.reshape(n, -1, *b_shape).sum(1))
    return out


def _channels(t: torch.Tensor) -> torch.Tensor:
    """``[n, k, C, *S] -> [n, C, k·S]``."""
    n, k, c = t.shape[:3]
    return t.reshape(n, c, -1) if k == 1 else t.transpose(1, 2).reshape(n, c, -1)


def _observed(cap, y: torch.Tensor, x: torch.Tensor, weight, bias, recompute: Callable, channel: bool):
    """Hook ``y``'s gradient ``δ``; there, recompute ``x̂ = recompute(x)`` and hand the
    per-sample gradients of ``weight`` and ``bias`` to the store."""
    lay, n = cap.layout(x, "normalisation")
    shape = weight.shape if weight is not None else bias.shape
    if (channel and lay.dim != 0) or (not channel and lay.dim >= x.dim() - len(shape)):
        raise SampleMixingError(
            f"a normalisation meets data of shape {tuple(x.shape)} whose samples lie on dim "
            f"{lay.dim}, which it normalises over: each output mixes samples, so per-sample "
            "gradients do not exist")
    site = cap.site({"weight": cap.ref(weight), "bias": cap.ref(bias)}, n)
    site.use("weight")
    site.use("bias")
    if y.requires_grad:
        box = [x.detach()]  # emptied by the hook: x is not kept alive after it ran
        w_shape = None if "weight" not in site else weight.shape
        b_shape = None if "bias" not in site else bias.shape
        y.register_hook(lambda d: _observe(site, lay, take(box), d, recompute, channel, w_shape, b_shape))
    cap.record_layout(y, lay)
    return y


def _observe(site: Site, lay: Layout, x, d, recompute, channel, w_shape, b_shape) -> None:
    n = site.n
    with torch.no_grad():
        xhat = None if w_shape is None else to_samples(recompute(x), lay, n)
        forms = affine_forms(xhat, to_samples(d, lay, n), w_shape, b_shape, channel)
    for role, form in forms.items():
        site.give(role, form)


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
            f"LayerNorm, or {MICROBATCH_RECIPE}."
        )
    if cap.ref(x) is not None:
        return cap.direct(func, args, kwargs)
    if not _measured(cap, weight, bias):
        return func(*args, **kwargs)
    y = func(*args, **kwargs)
    recompute = partial(func, running_mean=rm, running_var=rv, training=False, eps=eps)
    return _observed(cap, y, x, weight, bias, recompute, channel=True)
