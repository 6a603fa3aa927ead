"""``nn.MultiheadAttention``: its own rule, on the functional call it makes.

The module calls ``F.multi_head_attention_forward`` with sequence-first tensors
``[T, N, E]`` and its weights as plain tensors (no child Linear modules are called).
This rule computes the same attention with the sample dimension first, sending each
projection through the linear rule (:func:`~gradnoise.capture.linear.apply_linear`):
the packed ``in_proj_weight`` as one use for self-attention, or as slices (views) of it
for cross-attention, whose per-sample gradients are then assembled exactly. The
attention itself has no parameters and is left to autograd::

    q, k, v = x W_qᵀ + b_q, …      (per head: [N, H, T, E/H])
    o = softmax(q kᵀ / √(E/H) + mask) v
    y = o W_oᵀ + b_o

Not supported (a clear error): ``add_bias_kv``, ``add_zero_attn``, static keys/values.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import UnsupportedUseError
from .args import bind
from .layout import Layout
from .linear import apply_linear

_NAMES = (
    "query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight",
    "in_proj_bias", "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight",
    "out_proj_bias", "training", "key_padding_mask", "need_weights", "attn_mask",
    "use_separate_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
    "static_k", "static_v", "average_attn_weights", "is_causal",
)
_DEFAULTS = (True, None, True, None, False, None, None, None, None, None, True, False)


def handle_mha(cap, func, args, kwargs):
    """Rule-table entry for ``F.multi_head_attention_forward``."""
    a = dict(zip(_NAMES, bind(args, kwargs, _NAMES, _DEFAULTS)))
    params = [a[k] for k in ("in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias",
                             "q_proj_weight", "k_proj_weight", "v_proj_weight", "bias_k", "bias_v")]
    if not torch.is_grad_enabled() or all(cap.ref(p) is None for p in params):
        return func(*args, **kwargs)
    if a["bias_k"] is not None or a["bias_v"] is not None or a["add_zero_attn"] \
            or a["static_k"] is not None or a["static_v"] is not None:
        raise UnsupportedUseError(
            "nn.MultiheadAttention with add_bias_kv, add_zero_attn or static keys/values "
            "is not supported by gradnoise's attention rule"
        )
    query, key, value = a["query"], a["key"], a["value"]
    if query.dim() != 3:
        raise UnsupportedUseError("nn.MultiheadAttention on unbatched input (no sample dimension)")
    q_lay = _batch_layout(cap, query)
    # batch-first views, keeping "is" identity of shared inputs (self-attention)
    q_in = query.transpose(0, 1)
    k_in = q_in if key is query else key.transpose(0, 1)
    v_in = k_in if value is key else value.transpose(0, 1)
    lays = (q_lay, q_lay if key is query else _batch_layout(cap, key), None)
    lays = (lays[0], lays[1], lays[1] if value is key else _batch_layout(cap, value))
    q, k, v = _in_projection(cap, a, (q_in, k_in, v_in), lays)
    n, t, e = q.shape
    heads = a["num_heads"]
    if e != a["embed_dim_to_check"] or e % heads:
        raise ValueError(f"embedding dimension {e} does not match {a['embed_dim_to_check']} / {heads} heads")
    q, k, v = (x.reshape(n, x.shape[1], heads, e // heads).transpose(1, 2) for x in (q, k, v))
    mask, causal = _mask(a, n, heads, t, k.shape[2], q.dtype)
    p = a["dropout_p"] if a["training"] else 0.0
    weights = None
    if a["need_weights"]:
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(e // heads)
        if mask is not None:
            scores = scores + mask
        elif causal:
            scores = scores.masked_fill(torch.ones(t, k.shape[2], dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        if p > 0:
            weights = F.dropout(weights, p=p)
        o = torch.matmul(weights, v)
        weights = weights.mean(1) if a["average_attn_weights"] else weights
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal and mask is None)
    o = o.transpose(1, 2).reshape(n, t, e)
    y = apply_linear(cap, o, a["out_proj_weight"], a["out_proj_bias"], lays[0]).transpose(0, 1)
    cap.record_layout(y, _seq_first(lays[0]))
    if weights is not None:
        cap.record_layout(weights, lays[0])
    return y, weights


def _batch_layout(cap, t: torch.Tensor) -> Layout:
    """The layout of the batch-first view ``t.transpose(0, 1)`` of a sequence-first input:
    the module's batch dimension 1 must hold the samples."""
    lay, _ = cap.layout(t, "nn.MultiheadAttention")
    if lay.dim != 1:
        raise UnsupportedUseError(
            f"nn.MultiheadAttention meets data whose samples lie on dim {lay.dim} of its "
            "sequence-first input, not on its batch dimension: attention would mix samples"
        )
    return Layout(0, lay.outer, lay.inner)


def _seq_first(lay: Layout) -> Layout:
    return Layout(1, lay.outer, lay.inner)


def _in_projection(cap, a, xs, lays):
    """``q, k, v`` ``[N, T|S, E]`` through the linear rule, as torch packs them."""
    q_in, k_in, v_in = xs
    b = a["in_proj_bias"]
    if a["use_separate_proj_weight"]:
        bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
        return tuple(apply_linear(cap, x, w, bi, lay) for x, w, bi, lay in
                     zip(xs, (a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"]), (bq, bk, bv), lays))
    w = a["in_proj_weight"]
    e = q_in.shape[-1]
    if k_in is q_in and v_in is k_in:
        return apply_linear(cap, q_in, w, b, lays[0]).chunk(3, dim=-1)
    if v_in is k_in:
        kv = apply_linear(cap, k_in, w[e:], None if b is None else b[e:], lays[1]).chunk(2, dim=-1)
        return (apply_linear(cap, q_in, w[:e], None if b is None else b[:e], lays[0]), *kv)
    ws = w.chunk(3)
    bs = (None, None, None) if b is None else b.chunk(3)
    return tuple(apply_linear(cap, x, wi, bi, lay) for x, wi, bi, lay in zip(xs, ws, bs, lays))


def _as_float_mask(m: torch.Tensor, dtype) -> torch.Tensor:
    if m.dtype == torch.bool:
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(m, float("-inf"))
    return m.to(dtype)


def _mask(a, n, heads, t, s, dtype):
    """Additive mask broadcastable to ``[N, H, T, S]`` (or None) and the causal flag."""
    attn, kpm = a["attn_mask"], a["key_padding_mask"]
    causal = bool(a["is_causal"]) and attn is None
    mask = None
    if attn is not None:
        attn = _as_float_mask(attn, dtype)
        mask = attn.view(1, 1, t, s) if attn.dim() == 2 else attn.view(n, heads, t, s)
    if kpm is not None:
        kpm = _as_float_mask(kpm, dtype).view(n, 1, 1, s)
        mask = kpm if mask is None else mask + kpm
    return mask, causal
