"""Parameters used directly: measured at the op where they meet per-sample data.

``x + self.pos_embed``, ``torch.cat([self.cls_token.expand(B, -1, -1), x], 1)``,
LayerScale ``x * self.gamma``, ``self.weight * x`` in an RMSNorm, Swin's
``attn + table[index]…``: a parameter, a view of one or a parameter expression ``e``
(:mod:`gradnoise.capture.expression`) meets data ``x`` ``[M, …]`` (``M = k·N``: ``k`` rows
per sample) in a call ``y = f(x, e)``. Each sample's gradient of ``e`` is the part of
``∂L/∂e`` that flows through that sample's rows of ``y``.

* Broadcasting calls (arithmetic, ``where``, ``cat`` along a non-sample dim, attention
  masks): ``e`` is handed to ``f`` expanded along dim 0 to ``M`` rows (a stride-0 view;
  the result is the same), so autograd's own backward delivers ``∂L/∂e`` per row,
  ``[M, *e.shape]``, at no extra cost; rows are summed per sample.
* Any other call: the per-row cotangents come from ``vmap`` over rows of the vjp of
  ``f`` (one batched recomputation of this one call), and the recomputed output is
  checked against the real one, so a call that mixes rows raises instead.

An ``e`` with ``M`` rows of its own (``cls_token.expand(B, …)``) is *aligned*: row ``r``
belongs to row ``r`` of the data. Stride-0 (expanded) rows all equal ``e[:1]`` and are
measured as uses of it; other aligned rows are mapped back one sample at a time.
"""
from __future__ import annotations

import warnings
from typing import List

import torch
import torch.nn.functional as F
from torch.func import vjp, vmap
from torch.utils._pytree import tree_unflatten

from ..errors import SampleMixingError, UnsupportedUseError
from .embedding import give_table, table_lookup
from .site import give, sq_norms

_T = torch.Tensor
BROADCASTING = {
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.true_divide,
    torch.where, torch.addcmul, torch.addcdiv, torch.lerp, torch.maximum, torch.minimum,
    _T.add, _T.sub, _T.mul, _T.div, _T.add_, _T.sub_, _T.mul_, _T.div_, _T.addcmul, _T.addcmul_,
    _T.__add__, _T.__radd__, _T.__iadd__, _T.__sub__, _T.__rsub__, _T.__isub__, _T.__mul__,
    _T.__rmul__, _T.__imul__, _T.__truediv__, _T.__rtruediv__, _T.__itruediv__,
    _T.where, _T.lerp, _T.maximum, _T.minimum, F.scaled_dot_product_attention,
}
JOINING = {torch.cat, torch.concat, torch.stack}


def handle_direct(cap, func, flat: list, spec, refs: dict, what: str):
    """Run ``func`` on the flat arguments ``flat`` (``refs``: position -> ref of each
    measured tensor) and arrange for each ref's per-sample gradient to reach the store."""
    data = [t for i, t in enumerate(flat) if isinstance(t, torch.Tensor) and i not in refs
            and t.dim() > 0 and cap.tracker.kind(t) == "data"]
    if not data:
        raise UnsupportedUseError(f"{what} meets no tensor with a sample dimension")
    rows = data[0].shape[0]
    n = cap.tracker.samples(rows, what)
    ndim = max(t.dim() for t in flat if isinstance(t, torch.Tensor))
    fast = func in BROADCASTING or func in JOINING
    data_ndim = max(t.dim() for t in data)
    modes = {i: _mode(flat[i], rows, data_ndim, what, fast) for i in refs}
    for ref in refs.values():
        cap.count_use(ref)
    if func in BROADCASTING or (func in JOINING and all(m != "broadcast" for m in modes.values())):
        vals = list(flat)
        for i, ref in refs.items():
            vals[i] = _rows_view(cap, ref, flat[i], modes[i], rows, n, ndim)
        args, kwargs = tree_unflatten(vals, spec)
        out = func(*args, **kwargs)
        _check_rows(out, rows, what)
        return out
    return _generic(cap, func, flat, spec, refs, modes, rows, n, what)


def _mode(t: torch.Tensor, rows: int, ndim: int, what: str, broadcasting: bool) -> str:
    """How the measured tensor ``t`` lines up with the data's ``rows`` rows (``ndim``: the
    data's dims): its own rows ("aligned": as many dims and ``rows`` rows), or shared by
    all ("broadcast"; in a broadcasting call only when its leading dim is absent or 1)."""
    if t.dim() == ndim and t.shape[0] == rows and rows > 1:
        return "aligned0" if t.stride(0) == 0 else "aligned"
    if not broadcasting or t.dim() < ndim or t.shape[0] == 1:
        return "broadcast"
    raise UnsupportedUseError(
        f"{what}: a parameter of shape {tuple(t.shape)} meets data with {rows} rows on "
        "dim 0; gradnoise cannot tell which samples use which of its rows"
    )


def _rows_view(cap, ref, t: torch.Tensor, mode: str, rows: int, n: int, ndim: int) -> torch.Tensor:
    """``t`` as the call will see it, with a hook that receives its gradient per row."""
    if mode == "broadcast":
        padded = (1,) * (ndim - t.dim()) + tuple(t.shape)
        view = t.reshape(padded).expand(rows, *padded[1:])
    else:
        view = t.view(t.shape)  # a node of its own: its gradient is this call's alone
    view.register_hook(lambda g: _give_rows(cap, ref, t, mode, g, n))
    return view


def _give_rows(cap, ref, t: torch.Tensor, mode: str, g: torch.Tensor, n: int) -> None:
    """Per-row gradient ``g`` ``[M, …]`` of ``t`` -> per-sample gradients of ``ref``."""
    rows = g.shape[0]
    per = g.reshape(n, rows // n, *g.shape[1:]).sum(1)  # rows of one sample summed
    if mode in ("broadcast", "whole"):
        cot = per.reshape(n, *t.shape)
    elif mode == "aligned0":
        ref, cot = ref.first_row(), per.unsqueeze(1)
    elif (lookup := table_lookup(ref)) is not None and lookup[0].shape[0] == rows:
        ids, table, pad = lookup  # row r of t is table[ids[r]]: per-sample rows directly
        give_table(cap.store, table, ids, g, n, table.param.shape[0], pad)
        return
    else:  # each sample's rows of t, zero elsewhere
        k = rows // n
        cot = g.new_zeros(n, n, k, *g.shape[1:])
        idx = torch.arange(n, device=g.device)
        cot[idx, idx] = g.reshape(n, k, *g.shape[1:])
        cot = cot.reshape(n, *t.shape)
    give(cap.store, ref, lambda: sq_norms(cot.flatten(1)), lambda: cot, n)


def _check_rows(out, rows: int, what: str) -> None:
    for o in out if isinstance(out, (list, tuple)) else (out,):
        if isinstance(o, torch.Tensor) and o.requires_grad and (o.dim() == 0 or o.shape[0] != rows):
            raise UnsupportedUseError(
                f"{what} turns per-sample data with {rows} rows into an output of shape "
                f"{tuple(o.shape)}, which has no sample dimension"
            )


def _generic(cap, func, flat, spec, refs, modes, rows, n, what):
    """Any other call: per-row vjp by vmap, checked against the real output."""
    args, kwargs = tree_unflatten(list(flat), spec)
    out = func(*args, **kwargs)
    _check_rows(out, rows, what)
    outs = out if isinstance(out, (list, tuple)) else (out,)
    live = [j for j, o in enumerate(outs) if isinstance(o, torch.Tensor) and o.requires_grad]
    if not live:
        return out
    fixed = [t.detach() if isinstance(t, torch.Tensor) else t for t in flat]
    data_pos = [i for i, t in enumerate(flat) if i not in refs and isinstance(t, torch.Tensor)
                and t.dim() > 0 and t.shape[0] == rows]
    shared_pos = [i for i in refs if modes[i] == "broadcast"]
    row_pos = [i for i in refs if modes[i] != "broadcast"]

    def one(xs, es, deltas):
        def call(*prims):
            vals = list(fixed)
            for i, x in zip(data_pos, xs):
                vals[i] = x.unsqueeze(0)
            for i, v in zip(shared_pos + row_pos, prims):
                vals[i] = v if i in shared_pos else v.unsqueeze(0)
            a, kw = tree_unflatten(vals, spec)
            o = func(*a, **kw)
            o = o if isinstance(o, (list, tuple)) else (o,)
            return tuple(o[j].squeeze(0) for j in live)

        res, pull = vjp(call, *[fixed[i] for i in shared_pos], *es)
        return pull(deltas), res

    def on_grads(grads: List[torch.Tensor]) -> None:
        grads = [g if g is not None else torch.zeros_like(outs[j]) for j, g in zip(live, grads)]
        with cap.suspend(), torch.enable_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            cots, redone = vmap(one)([fixed[i] for i in data_pos], [fixed[i] for i in row_pos], tuple(grads))
        for j, again in zip(live, redone):
            real = outs[j].detach()
            tol = 1e-4 * float(real.abs().max()) if real.numel() else 0.0
            if again.shape != real.shape or not torch.allclose(again.to(real.dtype), real, rtol=1e-4, atol=1e-6 + tol):
                raise SampleMixingError(
                    f"{what} does not act on each sample's rows separately (its output "
                    "recomputed row by row differs), so per-sample gradients cannot be "
                    "measured there; register a rule for the module that makes this call"
                )
        for i, g in zip(shared_pos + row_pos, cots):
            _give_rows(cap, refs[i], flat[i], "whole" if i in shared_pos else modes[i], g, n)

    return _tap_outputs(out, live, on_grads)


def _tap_outputs(out, live: List[int], callback):
    """``out`` with its outputs ``live`` passed through an identity whose backward calls
    ``callback(grads)`` once all their gradients exist."""
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    tapped = Tap.apply(callback, *[outs[j] for j in live])
    for j, t in zip(live, tapped):
        outs[j] = t
    if isinstance(out, tuple):
        return tuple(outs)
    return outs if isinstance(out, list) else outs[0]


class Tap(torch.autograd.Function):
    """Identity on some tensors; its backward calls ``callback(grads)`` first."""

    @staticmethod
    def forward(ctx, callback, *outputs):
        ctx.callback = callback
        # clones: outputs of a custom Function that alias its inputs may not be modified
        # in place afterwards (ReLU(inplace=True), say)
        return tuple(t.clone() for t in outputs)

    @staticmethod
    def backward(ctx, *grads):
        ctx.callback(list(grads))
        return (None, *grads)


def describe(cap, func, refs: dict) -> str:
    """``"torch.add on parameter 'pos_embed'"``, for error messages."""
    names = dict.fromkeys(cap.name_of(p) for r in refs.values() for p in r.params)
    return f"{func_name(func)} on parameter {', '.join(repr(n) for n in names)}"


def func_name(func) -> str:
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    name = name.replace("TensorBase.", "Tensor.").replace("_TensorBase.", "Tensor.")
    return name if "." in name or name.startswith("torch") else f"torch.{name}"
