"""Following the samples through torch calls: the layout of each call's outputs.

:func:`follow` is called by the router after a call whose inputs hold per-sample data
with a recorded layout, or whose function moves dimensions (the table :data:`MOVERS`:
views, reshapes, transposes, permutes, indexing, joins and splits, contractions). Other
calls keep the samples where they were as long as the output keeps the input's size on
that dimension (elementwise maths, activations, convolutions, pooling over other dims);
otherwise the output's samples are marked unknown, with the call's name, and a rule
that needs them raises. Only layouts that differ from the default (dim 0,
sample-major) are recorded.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import layout as L
from .layout import Layout

_T = torch.Tensor


def _arg(args, kwargs, i: int, name: str, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _dims_arg(args, kwargs, i: int, name: str):
    v = _arg(args, kwargs, i, name)
    if v is None or isinstance(v, (list, tuple)) or not (len(args) > i + 1):
        return v
    return tuple(args[i:])  # x.permute(0, 2, 1) / x.view(a, b) with unpacked ints


# Each handler: (layout, input shape, n, args, kwargs, output) -> layout of the output
# (or a list, one per output) or None when the samples cannot be followed.
def _reshape(lay, shape, n, args, kw, out):
    return L.reshaped(lay, shape, out.shape, n)


def _permute(lay, shape, n, args, kw, out):
    order = _dims_arg(args, kw, 1, "dims")
    return L.permuted(lay, L.normalise_dims(order, len(shape)))


def _transpose(lay, shape, n, args, kw, out):
    a, b = L.normalise_dims((_arg(args, kw, 1, "dim0"), _arg(args, kw, 2, "dim1")), len(shape))
    return L.transposed(lay, a, b)


def _t(lay, shape, n, args, kw, out):
    return L.transposed(lay, 0, 1) if len(shape) == 2 else lay


def _mt(lay, shape, n, args, kw, out):
    return L.transposed(lay, len(shape) - 2, len(shape) - 1)


def _reverse(lay, shape, n, args, kw, out):
    return lay.moved(len(shape) - 1 - lay.dim)


def _movedim(lay, shape, n, args, kw, out):
    src = L.normalise_dims(_arg(args, kw, 1, "source"), len(shape))
    dst = L.normalise_dims(_arg(args, kw, 2, "destination"), len(shape))
    order = [d for d in range(len(shape)) if d not in src]
    for s, d in sorted(zip(dst, src)):
        order.insert(s, d)
    return L.permuted(lay, order)


def _unsqueeze(lay, shape, n, args, kw, out):
    at = int(_arg(args, kw, 1, "dim")) % (len(shape) + 1)
    return L.unsqueezed(lay, at)


def _squeeze(lay, shape, n, args, kw, out):
    dim = _arg(args, kw, 1, "dim")
    dims = range(len(shape)) if dim is None else L.normalise_dims(dim, len(shape))
    return L.squeezed(lay, shape, list(dims))


def _expand(lay, shape, n, args, kw, out):
    return L.broadcast(lay, len(shape), out.dim())


def _repeat(lay, shape, n, args, kw, out):
    reps = _dims_arg(args, kw, 1, "repeats")
    lay = L.broadcast(lay, len(shape), len(reps))
    r = reps[lay.dim]
    return lay if r == 1 else L.Layout(lay.dim, lay.outer * r, lay.inner)


def _narrow(lay, shape, n, args, kw, out):
    dim = int(_arg(args, kw, 1, "dim")) % len(shape)
    start = int(_arg(args, kw, 2, "start")) % max(shape[dim], 1)
    return L.narrowed(lay, dim, start, out.shape[dim], shape[dim], n)


def _select(lay, shape, n, args, kw, out):
    dim = int(_arg(args, kw, 1, "dim")) % len(shape)
    return None if dim == lay.dim else lay.moved(lay.dim - (dim < lay.dim))


def _unbind(lay, shape, n, args, kw, out):
    dim = int(_arg(args, kw, 1, "dim", 0)) % len(shape)
    one = None if dim == lay.dim else lay.moved(lay.dim - (dim < lay.dim))
    return [one] * len(out)


def _split(lay, shape, n, args, kw, out):
    dim = int(_arg(args, kw, 2, "dim", 0)) % len(shape)
    res, start = [], 0
    for piece in out:
        size = piece.shape[dim]
        res.append(L.narrowed(lay, dim, start, size, shape[dim], n))
        start += size
    return res


def _flip(lay, shape, n, args, kw, out):
    dims = L.normalise_dims(_dims_arg(args, kw, 1, "dims"), len(shape))
    return None if lay.dim in dims else lay


def _roll(lay, shape, n, args, kw, out):
    dims = _arg(args, kw, 2, "dims")
    if dims is None:
        return None
    return None if lay.dim in L.normalise_dims(dims, len(shape)) else lay


def _getitem(lay, shape, n, args, kw, out):
    return _index(lay, shape, n, args[1])


def _index(lay: Layout, shape, n: int, idx) -> Optional[Layout]:
    """Layout after basic indexing ``x[idx]``; advanced (tensor) indices only after the
    sample dimension."""
    items = list(idx) if isinstance(idx, tuple) else [idx]
    basic = (int, slice, type(None), type(Ellipsis))
    used = sum(1 for i in items if i is not None and i is not Ellipsis)
    src = dst = 0
    for item in items:
        if item is Ellipsis:
            skip = len(shape) - used
            if src <= lay.dim < src + skip:
                return lay.moved(dst + lay.dim - src)
            src, dst = src + skip, dst + skip
        elif item is None:
            dst += 1
        elif src == lay.dim:
            if isinstance(item, slice):
                start, stop, step = item.indices(shape[src])
                if step != 1:
                    return None
                res = L.narrowed(lay, src, start, max(0, stop - start), shape[src], n)
                return None if res is None else res.moved(dst)
            return None  # one sample picked, or samples gathered by a tensor
        elif not isinstance(item, basic):
            return None  # an advanced index before the samples: torch may move dims
        else:
            src += 1
            dst += not isinstance(item, int)
    return lay.moved(dst + lay.dim - src)


def _cat(lay, shape, n, args, kw, out):
    tensors = _arg(args, kw, 0, "tensors")
    dim = int(_arg(args, kw, 1, "dim", 0)) % len(shape)
    if dim != lay.dim:
        return lay
    if any(t.shape != tensors[0].shape for t in tensors):
        return None
    return L.joined(lay, dim, len(tensors))


def _stack(lay, shape, n, args, kw, out):
    dim = int(_arg(args, kw, 1, "dim", 0)) % (len(shape) + 1)
    return L.unsqueezed(lay, dim)


def _reduce(lay, shape, n, args, kw, out):
    dim = _arg(args, kw, 1, "dim")
    if isinstance(dim, (torch.dtype, bool)):
        dim = None
    keep = bool(_arg(args, kw, 2, "keepdim", False))
    return L.reduced(lay, len(shape), None if dim is None else L.normalise_dims(dim, len(shape)), keep)


MOVERS: Dict[Callable, Callable] = {
    **dict.fromkeys([_T.view, _T.reshape, torch.reshape, _T.flatten, torch.flatten, _T.unflatten,
                     torch.unflatten, _T.view_as, _T.reshape_as], _reshape),
    **dict.fromkeys([_T.permute, torch.permute], _permute),
    **dict.fromkeys([_T.transpose, torch.transpose, _T.swapaxes, torch.swapaxes, _T.swapdims,
                     torch.swapdims], _transpose),
    **dict.fromkeys([_T.t, torch.t], _t),
    **dict.fromkeys([_T.mT.__get__, _T.mH.__get__], _mt),
    _T.T.__get__: _reverse,
    **dict.fromkeys([_T.movedim, torch.movedim, _T.moveaxis, torch.moveaxis], _movedim),
    **dict.fromkeys([_T.unsqueeze, torch.unsqueeze], _unsqueeze),
    **dict.fromkeys([_T.squeeze, torch.squeeze], _squeeze),
    **dict.fromkeys([_T.expand, _T.expand_as, torch.broadcast_to], _expand),
    _T.repeat: _repeat,
    **dict.fromkeys([_T.narrow, torch.narrow], _narrow),
    **dict.fromkeys([_T.select, torch.select], _select),
    **dict.fromkeys([_T.unbind, torch.unbind], _unbind),
    **dict.fromkeys([_T.split, torch.split, _T.chunk, torch.chunk, _T.tensor_split, torch.tensor_split], _split),
    **dict.fromkeys([_T.flip, torch.flip], _flip),
    **dict.fromkeys([_T.roll, torch.roll], _roll),
    _T.__getitem__: _getitem,
    **dict.fromkeys([torch.cat, torch.concat, torch.concatenate], _cat),
    torch.stack: _stack,
    **dict.fromkeys([torch.sum, torch.mean, torch.amax, torch.amin, torch.logsumexp, torch.prod, torch.std,
                     torch.var, torch.norm, _T.sum, _T.mean, _T.amax, _T.amin, _T.logsumexp, _T.prod,
                     _T.std, _T.var, _T.norm], _reduce),
}
CONTRACTIONS = {torch.matmul, _T.matmul, _T.__matmul__, _T.__rmatmul__, torch.bmm, _T.bmm, torch.mm, _T.mm,
                torch.einsum}
LAYOUT_FUNCS = frozenset(MOVERS) | CONTRACTIONS


def _outputs(out) -> List[torch.Tensor]:
    items = out if isinstance(out, (list, tuple)) else (out,)
    return [t for t in items if isinstance(t, torch.Tensor)]


def _contraction(func, data: list, args, kwargs, out) -> Optional[Layout]:
    """Layout of a matrix product's output, from every data operand (they must agree)."""
    res = None
    for pos, t, lay in data:
        if func is torch.einsum:
            eq = args[0] if args else kwargs.get("equation")
            one = L.einsum_out(lay, eq, pos)
        else:
            operands = [a for a in args if isinstance(a, torch.Tensor)]
            if func is _T.__rmatmul__:
                operands = operands[::-1]
                pos = 1 - pos
            other = operands[1 - pos] if len(operands) > 1 else t
            one = L.matmul_out(lay, t.dim(), other.dim(), out.dim(), first=(pos == 0))
        if one is None or (res is not None and one != res):
            return None
        res = one
    return res


def _generic(data: list, out: torch.Tensor) -> Optional[Layout]:
    """Any other call: each data input's layout, broadcast to the output's dims, where
    the output keeps that input's size on the sample dimension; all must agree."""
    res = None
    for _, t, lay in data:
        one = L.broadcast(lay, t.dim(), out.dim())
        if not (0 <= one.dim < out.dim()) or out.shape[one.dim] != t.shape[lay.dim]:
            return None
        if res is not None and one != res:
            return None
        res = one
    return res


_SAME_ROWS = {_reshape, _expand, _narrow, _squeeze, _unsqueeze, _reduce}


def stays(func, x: torch.Tensor, out, args, kwargs, n: Optional[int] = None) -> bool:
    """True where ``out`` is known at a glance to keep the samples of ``x`` (on dim 0,
    sample-major) on dim 0: a reshape, expansion, narrowing, squeeze or reduction whose
    output keeps the input's leading size, a transpose or permute that leaves dim 0 in
    place, an index that starts with a whole slice; given ``n``, also a reshape that folds
    or unfolds rows sample-major (``[B, T, d] ↔ [B·T, d]``). Then nothing needs recording."""
    if not isinstance(out, torch.Tensor) or out.dim() == 0 or x.dim() == 0:
        return False
    handler = MOVERS.get(func)
    if out.shape[0] != x.shape[0]:
        return handler is _reshape and n is not None and _sample_major(tuple(x.shape), tuple(out.shape), n)
    if handler in _SAME_ROWS:
        return handler is not _unsqueeze or int(_arg(args, kwargs, 1, "dim")) % (x.dim() + 1) != 0
    if handler is _transpose:
        return 0 not in L.normalise_dims((_arg(args, kwargs, 1, "dim0"), _arg(args, kwargs, 2, "dim1")), x.dim())
    if handler is _permute:
        return L.normalise_dims(_dims_arg(args, kwargs, 1, "dims"), x.dim())[0] == 0
    if handler is _getitem:
        first = args[1][0] if isinstance(args[1], tuple) and args[1] else args[1]
        return isinstance(first, slice) and first == slice(None) or first is Ellipsis
    return False


def _sample_major(shape: tuple, new: tuple, n: int) -> bool:
    """A reshape from ``shape`` to ``new``, both ``n``·k rows on dim 0 and samples sample-major
    on dim 0 of ``shape``, that leaves them sample-major on dim 0 of ``new``."""
    if shape[0] % n or new[0] % n:
        return False
    return L.reshaped(Layout(0, 1, shape[0] // n), shape, new, n) == Layout(0, 1, new[0] // n)


def follow(func, args: Sequence, kwargs: dict, out, data: list, n: int, record: Callable) -> None:
    """Record the layouts of ``out``'s tensors. ``data``: ``(position among the tensor
    arguments, tensor, layout)`` of every per-sample argument; ``record(t, layout, call)``
    (layout None: the samples were lost in ``call``)."""
    outs = _outputs(out)
    if not outs or not data:
        return
    if len(data) == 1 and len(outs) == 1 and data[0][2].dim == 0 and data[0][2].outer == 1 \
            and stays(func, data[0][1], outs[0], args, kwargs):
        return
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
    handler = MOVERS.get(func)
    if handler is not None:
        _, t, lay = data[0]
        try:
            res = handler(lay, tuple(t.shape), n, args, kwargs, outs[0] if len(outs) == 1 else outs)
        except (TypeError, ValueError, IndexError, ZeroDivisionError):
            res = None
    elif func in CONTRACTIONS:
        res = _contraction(func, data, args, kwargs, outs[0])
    else:
        res = [_generic(data, o) for o in outs]
    results = res if isinstance(res, list) else [res] * len(outs)
    call = name.replace("TensorBase.", "Tensor.")
    for o, lay in zip(outs, results):
        record(o, lay, call)
