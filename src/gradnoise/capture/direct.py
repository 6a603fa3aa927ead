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

The samples lie on the data's sample dimension (its tracked layout, placed in the call's
broadcast dimensions). An ``e`` with a size there equal to the data's (``M``) is
*aligned*, row for row, as broadcasting defines it: ``cls_token.expand(B, …)``, whose
stride-0 rows all equal one row of the parameter (measured as uses of it), or an
expression with rows of its own, mapped back one sample at a time. In any other call a
parameter is shared by all rows unless it is such a stride-0 expansion. A table looked up
with constant ids (``wpe(position_ids)``) is handed over as a lookup: no ``[n, V, d]``.
"""
from __future__ import annotations

import warnings
from typing import List

import torch
import torch.nn.functional as F
from torch.func import vjp, vmap
from torch.utils._pytree import tree_unflatten

from ..errors import SampleMixingError, UnsupportedUseError
from .expression import table_lookup
from .forms import Dense, Lookup
from .layout import Layout, to_samples

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
    lay, n = cap.layout(data[0], what)
    ndim = max(t.dim() for t in flat if isinstance(t, torch.Tensor))
    sdim = lay.dim + ndim - data[0].dim()  # the sample dimension among the call's broadcast dims
    call = _Call(Layout(sdim, lay.outer, lay.inner), data[0].shape[lay.dim], n, ndim)
    fast = func in BROADCASTING or func in JOINING
    modes = {i: _mode(flat[i], call, what, fast) for i in refs}
    uses = _Uses(cap, call, {i: (ref, flat[i], modes[i]) for i, ref in refs.items()})
    if func in BROADCASTING or (func in JOINING and all(m != "broadcast" for m in modes.values())):
        vals = list(flat)
        for i in refs:
            vals[i] = uses.rows_view(i)
        args, kwargs = tree_unflatten(vals, spec)
        out = func(*args, **kwargs)
        _check_rows(out, call, what)
        return out
    return _generic(cap, uses, func, flat, spec, refs, modes, call, what)


class _Call:
    """The samples of one call: their layout among the call's ``ndim`` broadcast
    dimensions (``lay.dim``, of size ``rows``) and their number ``n``."""

    def __init__(self, lay: Layout, rows: int, n: int, ndim: int):
        self.lay, self.rows, self.n, self.ndim = lay, rows, n, ndim

    def dim_of(self, t: torch.Tensor) -> int:
        """Where the sample dimension falls in ``t`` (right-aligned; < 0: absent)."""
        return self.lay.dim - (self.ndim - t.dim())


def _mode(t: torch.Tensor, call: _Call, what: str, broadcasting: bool) -> str:
    """How the measured tensor ``t`` lines up with the samples: its own row for each
    ("aligned"; "aligned0" when those rows are one expanded row), or shared ("broadcast")."""
    d, rows = call.dim_of(t), call.rows
    size = t.shape[d] if d >= 0 else 1
    if size == rows and rows > 1 and t.stride(d) == 0:
        return "aligned0"
    if size == rows and rows > 1 and broadcasting:
        return "aligned"
    if not broadcasting or size == 1:
        return "broadcast"
    raise UnsupportedUseError(
        f"{what}: a parameter of shape {tuple(t.shape)} meets data with {rows} rows on "
        f"dim {call.lay.dim}; gradnoise cannot tell which samples use which of its rows"
    )


class _Uses:
    """The measured arguments of one call (``role`` = position) and their site: a table
    looked up with constant ids is measured as a lookup of the table, an expanded
    parameter as its one row, anything else as itself."""

    def __init__(self, cap, call: _Call, args: dict):
        self.call, self.args, self.ids = call, args, {}
        refs = {}
        for i, (ref, t, mode) in args.items():
            ids = _lookup_ids(ref, mode, t, call)
            if ids is not None:
                self.ids[i], refs[i] = ids, table_lookup(ref)[1]
            elif mode == "aligned0":
                d = call.dim_of(t)
                refs[i] = ref.then(lambda v, d=d: v.narrow(d, 0, 1))
            else:
                refs[i] = ref
        self.site = cap.site(refs, call.n)
        for i in args:
            ids = self.ids.get(i)
            self.site.use(i, *(("ids", lambda ids=ids: ids) if ids is not None else ()))

    def rows_view(self, i) -> torch.Tensor:
        """The argument as the call will see it, with a hook that receives its gradient
        per row."""
        _, t, mode = self.args[i]
        call = self.call
        if mode == "broadcast":
            padded = (1,) * (call.ndim - t.dim()) + tuple(t.shape)
            shape = list(padded)
            shape[call.lay.dim] = call.rows
            view = t.reshape(padded).expand(shape)
        else:
            view = t.view(t.shape)  # a node of its own: its gradient is this call's alone
        view.register_hook(lambda g: self.give_rows(i, g, call.lay.dim if mode == "broadcast" else call.dim_of(t)))
        return view

    def give_rows(self, i, g: torch.Tensor, d: int) -> None:
        """Per-row gradient ``g`` of argument ``i`` (rows on dim ``d``) -> per-sample
        gradients of its reference."""
        _, t, mode = self.args[i]
        call, n = self.call, self.call.n
        per = to_samples(g, Layout(d, call.lay.outer, call.lay.inner), n)  # [n, rows per sample, …]
        if i in self.ids:  # the table's rows, looked up by the ids of each sample's rows
            self._give(i, per if mode == "aligned" else per.sum(1))
        elif mode == "broadcast":
            self._give(i, per.sum(1).reshape(n, *t.shape))
        elif mode == "aligned0":
            self._give(i, per.sum(1).unsqueeze(d + 1))
        else:  # each sample's rows of t, zero elsewhere
            o, k = call.lay.outer, call.lay.inner
            cot = g.new_zeros(n, *per.shape)
            idx = torch.arange(n, device=g.device)
            cot[idx, idx] = per
            cot = cot.reshape(n, n, o, k, *per.shape[2:]).movedim(1, 2).reshape(n, o * n * k, *per.shape[2:])
            self._give(i, cot.movedim(1, d + 1))

    def give_shared(self, i, g: torch.Tensor) -> None:
        """Per-row gradients ``[rows, *shape]`` of a shared argument (a generic call's)."""
        call = self.call
        per = to_samples(g, Layout(0, call.lay.outer, call.lay.inner), call.n)
        self._give(i, per.sum(1))

    def _give(self, i, cot: torch.Tensor) -> None:
        """Hand ``cot`` ``[n, *shape]`` (per-sample gradients of argument ``i``) over."""
        ids = self.ids.get(i)
        if ids is not None:
            table = self.site.refs[i].param
            self.site.give(i, Lookup(ids, cot.reshape(cot.shape[0], ids.shape[1], -1), table.shape[0]))
        else:
            self.site.give(i, Dense(cot))


def _lookup_ids(ref, mode: str, t: torch.Tensor, call: _Call):
    """Per-sample ids ``[n, T]`` when ``ref`` is a table looked up with constant ids that
    the samples share (broadcast) or own row for row (aligned on dim 0), else None."""
    lookup = table_lookup(ref)
    if lookup is None:
        return None
    ids, _, pad = lookup
    if mode == "broadcast":
        flat_ids = ids.reshape(1, -1).expand(call.n, -1)
    elif mode == "aligned" and call.dim_of(t) == 0 and ids.dim() > 0 and ids.shape[0] == call.rows:
        flat_ids = to_samples(ids, Layout(0, call.lay.outer, call.lay.inner), call.n).reshape(call.n, -1)
    else:
        return None
    return flat_ids if pad is None else torch.where(flat_ids == pad, torch.full_like(flat_ids, -1), flat_ids)


def _check_rows(out, call: _Call, what: str) -> None:
    for o in out if isinstance(out, (list, tuple)) else (out,):
        if not (isinstance(o, torch.Tensor) and o.requires_grad):
            continue
        d = call.dim_of(o)
        if d < 0 or o.shape[d] != call.rows:
            raise UnsupportedUseError(
                f"{what} turns per-sample data with {call.rows} rows into an output of shape "
                f"{tuple(o.shape)}, which has no sample dimension"
            )


def _generic(cap, uses: _Uses, func, flat, spec, refs, modes, call: _Call, what: str):
    """Any other call: per-row vjp by vmap over the sample dimension, checked against the
    real output."""
    args, kwargs = tree_unflatten(list(flat), spec)
    out = func(*args, **kwargs)
    _check_rows(out, call, what)
    outs = out if isinstance(out, (list, tuple)) else (out,)
    live = [j for j, o in enumerate(outs) if isinstance(o, torch.Tensor) and o.requires_grad]
    if not live:
        return out
    fixed = [t.detach() if isinstance(t, torch.Tensor) else t for t in flat]
    data_pos = [i for i, t in enumerate(flat) if i not in refs and isinstance(t, torch.Tensor)
                and t.dim() > 0 and cap.tracker.kind(t) == "data"]
    data_dims = [_data_dim(cap, flat[i], call, what) for i in data_pos]
    shared_pos = [i for i in refs if modes[i] == "broadcast"]
    row_pos = [i for i in refs if modes[i] != "broadcast"]
    row_dims = [call.dim_of(flat[i]) for i in row_pos]
    out_dims = [call.dim_of(outs[j]) for j in live]

    def one(xs, es, deltas):
        def call_one(*prims):
            vals = list(fixed)
            for i, x, d in zip(data_pos, xs, data_dims):
                vals[i] = x.unsqueeze(d)
            for k, (i, v) in enumerate(zip(shared_pos + row_pos, prims)):
                vals[i] = v if i in shared_pos else v.unsqueeze(row_dims[k - len(shared_pos)])
            a, kw = tree_unflatten(vals, spec)
            o = func(*a, **kw)
            o = o if isinstance(o, (list, tuple)) else (o,)
            return tuple(o[j].squeeze(d) for j, d in zip(live, out_dims))

        res, pull = vjp(call_one, *[fixed[i] for i in shared_pos], *es)
        return pull(deltas), res

    def on_grads(grads: List[torch.Tensor]) -> None:
        grads = [g if g is not None else torch.zeros_like(outs[j]) for j, g in zip(live, grads)]
        with cap.suspend(), torch.enable_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            cots, redone = vmap(one, in_dims=(data_dims, row_dims, tuple(out_dims)), out_dims=(0, tuple(out_dims)))(
                [fixed[i] for i in data_pos], [fixed[i] for i in row_pos], tuple(grads))
        for j, again in zip(live, redone):
            real = outs[j].detach()
            tol = 1e-4 * float(real.abs().max()) if real.numel() else 0.0
            if again.shape != real.shape or not torch.allclose(again.to(real.dtype), real, rtol=1e-4, atol=1e-6 + tol):
                raise SampleMixingError(
                    f"{what} does not act on each sample's rows separately (its output "
                    "recomputed row by row differs), so per-sample gradients cannot be "
                    "measured there; register a rule for the module that makes this call"
                )
        for k, (i, g) in enumerate(zip(shared_pos + row_pos, cots)):
            if i in shared_pos:
                uses.give_shared(i, g)
            else:
                d = row_dims[k - len(shared_pos)]
                uses.give_rows(i, g.movedim(0, d), d)

    return _tap_outputs(out, live, on_grads)


def _data_dim(cap, t: torch.Tensor, call: _Call, what: str) -> int:
    """The sample dimension of a data argument of a generic call (same rows as the first)."""
    lay, _ = cap.layout(t, what)
    if t.shape[lay.dim] != call.rows or (lay.outer, lay.inner) != (call.lay.outer, call.lay.inner):
        raise UnsupportedUseError(f"{what} meets data whose samples are laid out differently in its arguments")
    return lay.dim


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
