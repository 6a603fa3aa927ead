"""Parameter expressions: tensors computed from parameters and constants alone.

``wpe(position_ids)`` with ids ``[1, T]``, Swin's ``table[index].view(…).permute(…)``,
``w.exp()``, ``scale * w`` with a constant: no sample has a part in them, so they have no
per-sample gradient of their own. Each sample's gradient enters where such a tensor
``e = f(θ)`` meets per-sample data; there a rule measures the per-sample gradient of
``e`` itself, ``c_i = ∂l_i/∂e`` ``[N, *e.shape]``, and maps it back to the parameters
through the expression's vector–Jacobian product::

    g_i^θ = (∂f/∂θ)ᵀ c_i          (vmap over samples of one vjp of f)

:class:`Expr` records the call that made ``e`` (its arguments: parameters, views of them,
other expressions, constants); :class:`ExprRef` is the handle rules receive instead of a
:class:`~gradnoise.capture.site.ParamRef`.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.func import vjp, vmap
from torch.utils._pytree import tree_unflatten

from .site import ParamRef


class Expr:
    """One recorded call ``func(*args, **kwargs)`` of a parameter expression.

    Each tensor argument is kept as a *slot*: ``("param", p, view)`` (``view`` None for
    the whole parameter), ``("expr", Expr, index)`` or ``("const", tensor)``.
    """

    def __init__(self, func: Callable, flat: list, spec, slots: Dict[int, tuple]):
        self.func, self.spec = func, spec
        self.flat = [slots.get(i, ("value", v)) for i, v in enumerate(flat)]
        seen: Dict[int, torch.Tensor] = {}
        for s in self.flat:
            if s[0] == "param":
                seen.setdefault(id(s[1]), s[1])
            elif s[0] == "expr":
                for p in s[1].params:
                    seen.setdefault(id(p), p)
        self.params: List[torch.Tensor] = list(seen.values())

    def outputs(self, values: Dict[int, torch.Tensor], memo: Dict[int, list]) -> list:
        """The call's flat outputs with parameters replaced by ``values[id(p)]``."""
        key = id(self)
        if key in memo:
            return memo[key]
        vals = []
        for s in self.flat:
            if s[0] == "param":
                p, view = s[1], s[2]
                v = values[id(p)]
                if view is not None:
                    v = v.as_strided(view.shape, view.stride(), view.storage_offset() - p.storage_offset())
                vals.append(v)
            elif s[0] == "expr":
                vals.append(s[1].outputs(values, memo)[s[2]])
            else:
                vals.append(s[1])
        args, kwargs = tree_unflatten(vals, self.spec)
        out = self.func(*args, **kwargs)
        flat_out = out if isinstance(out, (list, tuple)) else [out]
        memo[key] = list(flat_out)
        return memo[key]


class ExprRef:
    """A parameter expression as a rule's argument: output ``index`` of ``expr``, with an
    optional ``post`` map (e.g. ``t[:1]`` for the first row of an expanded expression)."""

    def __init__(self, expr: Expr, index: int, tensor: torch.Tensor, suspend: Callable,
                 post: Optional[Callable] = None):
        self.expr, self.index, self.tensor, self.suspend, self.post = expr, index, tensor, suspend, post

    @property
    def params(self) -> List[torch.Tensor]:
        return self.expr.params

    def then(self, fn: Callable) -> "ExprRef":
        """The expression followed by ``fn`` (a view such as ``t.t()`` or ``t[:1]``)."""
        post = self.post
        return ExprRef(self.expr, self.index, fn(self.tensor), self.suspend,
                       (lambda t: fn(post(t) if post else t)))

    def param_grads(self, cot: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """``[(p, g [c, *p.shape])]`` from per-sample cotangents ``cot`` ``[c, *e.shape]``."""
        params = self.params
        primals = tuple(p.detach() for p in params)

        def f(*ps):
            out = self.expr.outputs({id(p): v for p, v in zip(params, ps)}, {})[self.index]
            return self.post(out) if self.post is not None else out

        with self.suspend(), torch.enable_grad():
            _, pull = vjp(f, *primals)
            grads = vmap(pull)(cot.to(self.tensor.dtype))
        return list(zip(params, grads))


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
