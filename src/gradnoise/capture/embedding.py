"""Embeddings: per-sample gradients of a lookup table.

Kernel (:func:`lookup_form`): for ids ``[n, T]`` (samples first, positions flattened) and
output gradient ``δ`` ``[n, T, d]``, row ``v`` of sample ``n``'s gradient of the table
``W`` ``[V, d]`` is ``Σ_{t: id_nt = v} δ_nt`` — a :class:`~gradnoise.capture.forms.Lookup`,
whose squared norm ``Σ_{t,s} [id_t = id_s] (δ_t·δ_s)`` sums rows per distinct
``(n, id)`` pair (``O(n T d)``) and whose cross terms with other uses of the table (a tied
output layer) come from the ids, never from ``[n, V, d]``. ``padding_idx`` positions
receive no gradient (id −1 in the form). The table's gradient is autograd's own.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import UnsupportedUseError
from .args import bind
from .forms import Lookup
from .layout import sample_rows, to_samples
from .site import ParamRef, Site, take


def lookup_ids(ids: torch.Tensor, padding_idx: Optional[int]) -> torch.Tensor:
    """``ids`` ``[n, T]`` with ``padding_idx`` positions as −1 (no gradient)."""
    if padding_idx is None:
        return ids
    return torch.where(ids == padding_idx, torch.full_like(ids, -1), ids)


def lookup_form(ids: torch.Tensor, gy: torch.Tensor, num_rows: int) -> Lookup:
    """The per-sample form of a table ``[num_rows, d]``: ids ``[n, T]`` (−1: none), output
    gradient ``gy`` ``[n, T, d]``."""
    return Lookup(ids, gy, num_rows)


def _observe(site: Site, ids_s: torch.Tensor, num_rows: int, lay, gy: torch.Tensor) -> None:
    site.give("weight", lookup_form(ids_s, sample_rows(gy, lay, site.n), num_rows))


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
    lay, n = cap.layout(ids, f"embedding '{name}'")
    ids_s = lookup_ids(to_samples(ids, lay, n).reshape(n, -1), padding_idx)
    site = cap.site({"weight": wref}, n)
    site.use("weight", "ids", lambda: ids_s)
    y = F.embedding(ids, weight, padding_idx)
    if y.requires_grad:
        box = [ids_s]  # one backward only (a second raises)
        y.register_hook(lambda g: _observe(site, take(box), weight.shape[0], lay, g))
    cap.record_layout(y, lay)
    return y
