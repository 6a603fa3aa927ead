"""Embeddings: per-sample gradients of a lookup table.

For ids ``[N, *T]`` (flattened to ``T``) and output gradient ``δ`` ``[N, T, d]``, the
per-sample gradient of the table ``W`` ``[V, d]`` has row ``v`` equal to
``Σ_{t: id_nt = v} δ_nt``, so ``||g_n||² = Σ_{t,s} [id_nt = id_ns] (δ_nt·δ_ns)``. Rows
are summed per distinct ``(n, id)`` pair (``O(N T d)``), never ``N·V·d`` memory unless
the table is shared and full per-sample gradients are needed. ``padding_idx`` rows
receive no gradient and are skipped.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import UnsupportedUseError
from .args import bind
from .site import ParamRef, Site, give, sq_norms


class EmbeddingFn(torch.autograd.Function):
    """``F.embedding`` whose backward also hands per-sample results to a site."""

    @staticmethod
    def forward(ctx, ids, weight, padding_idx, site: Site, n: int):
        ctx.save_for_backward(ids)
        ctx.site, ctx.padding_idx, ctx.num_rows, ctx.n = site, padding_idx, weight.shape[0], n
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, gy):
        (ids,) = ctx.saved_tensors
        site: Site = ctx.site
        pad = -1 if ctx.padding_idx is None else ctx.padding_idx
        gw = torch.ops.aten.embedding_dense_backward(gy, ids, ctx.num_rows, pad, False)
        give_table(site.store, site.weight, ids, gy, ctx.n, ctx.num_rows, ctx.padding_idx)
        return None, gw, None, None, None


def give_table(store, ref, ids: torch.Tensor, gy: torch.Tensor, n: int, v: int, padding_idx) -> None:
    """Per-sample results of a table ``[v, d]`` looked up with ``ids`` ``[k·n, …]`` (``k``
    rows per sample) and output gradient ``gy`` ``[k·n, …, d]``, handed to ``store``."""
    dim = gy.shape[-1]
    keys = (torch.arange(n, device=ids.device).view(n, 1) * v + ids.reshape(n, -1)).reshape(-1)
    rows = gy.reshape(-1, dim)
    if padding_idx is not None:
        keep = ids.reshape(-1) != padding_idx
        keys, rows = keys[keep], rows[keep]

    def per_sample_sq_norms():
        uniq, inverse = torch.unique(keys, return_inverse=True)
        sums = rows.new_zeros(uniq.shape[0], dim).index_add_(0, inverse, rows)
        return rows.new_zeros(n).index_add_(0, uniq // v, sq_norms(sums))

    def grads():
        return rows.new_zeros(n * v, dim).index_add_(0, keys, rows).view(n, v, dim)

    give(store, ref, per_sample_sq_norms, grads, n)


def table_lookup(ref) -> Optional[tuple]:
    """``(ids, ParamRef of the table, padding_idx)`` when the expression ``ref`` is
    ``F.embedding`` of constant ids on a whole table (no max_norm), else None."""
    expr = getattr(ref, "expr", None)
    if expr is None or ref.post is not None or expr.func is not F.embedding or len(expr.flat) < 4:
        return None
    ids, table, pad, max_norm = expr.flat[:4]
    if ids[0] != "value" or table[0] != "param" or table[2] is not None or max_norm[1] is not None:
        return None
    if pad[1] is not None and (not isinstance(pad[1], int) or pad[1] < 0):
        return None
    return ids[1], ParamRef(table[1]), pad[1]


def handle_embedding(cap, func, args, kwargs):
    """Rule-table entry for ``F.embedding``."""
    ids, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse = bind(
        args, kwargs,
        ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
        (None, None, 2.0, False, False),
    )
    wref = cap.ref(weight)
    if wref is None:
        return func(*args, **kwargs)
    if not isinstance(wref, ParamRef) or wref.view is not None:  # a table computed from parameters
        return cap.direct(func, args, kwargs)
    name = cap.name_of(wref.param)
    if scale_grad_by_freq or sparse:
        raise UnsupportedUseError(
            f"embedding '{name}' uses scale_grad_by_freq or sparse gradients, which "
            "gradnoise does not support; set both to False"
        )
    if ids.dim() < 1:
        raise UnsupportedUseError(f"embedding '{name}': per-sample gradients need batched ids [N, ...]")
    if padding_idx is not None and padding_idx < 0:
        padding_idx += weight.shape[0]
    if max_norm is not None:
        with torch.no_grad():
            torch.embedding_renorm_(weight, ids.contiguous(), max_norm, norm_type)
    n = cap.samples(ids.shape[0], f"embedding '{name}'")
    return EmbeddingFn.apply(ids, weight, padding_idx, cap.site(wref), n)
