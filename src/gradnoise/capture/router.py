"""The torch-function mode that routes parameter uses to rules.

While a capture's model runs, every torch call made in Python passes through
:class:`Router`, which classifies its tensor arguments (:mod:`~gradnoise.capture.tracking`)
and then:

* no measured tensor: runs the call, noting data, pooled values (a reduction over the
  sample dimension) and samples mixing (a pooled value combined with per-sample data,
  or transformed non-linearly);
* measured tensors and constants only: runs the call and records its output as a
  parameter expression (views of a parameter stay views);
* measured tensors meeting per-sample data: the call's rule from the table (Linear,
  Conv, Embedding, norms, attention, …), or the direct-use rule
  (:mod:`~gradnoise.capture.direct`).

Wherever per-sample data goes through a call that moves dimensions, or data whose samples
are not on dim 0 goes through any call, the samples are followed to the outputs
(:mod:`~gradnoise.capture.follow`); rules record their outputs' layouts themselves.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, List, Tuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..errors import SampleMixingError, UnsupportedUseError
from .direct import describe, func_name, handle_direct
from .follow import LAYOUT_FUNCS, follow, stays
from .layout import default_layout
from .rules import ALWAYS, FUNCTION_RULES
from .tracking import CONST, DATA, POOLED

if TYPE_CHECKING:  # pragma: no cover
    from .context import Capture

_T = torch.Tensor
# Calls that use a tensor argument only for its dtype, device or shape.
METADATA = {_T.type_as, _T.to, _T.expand_as, _T.view_as, _T.reshape_as, _T.new_zeros,
            _T.new_ones, _T.new_empty, _T.new_full, _T.new_tensor}
# Reductions: over the sample dimension of data that requires grad, they pool samples.
REDUCTIONS = {torch.sum, torch.mean, torch.std, torch.var, torch.amax, torch.amin, torch.logsumexp,
              torch.norm, torch.prod, _T.sum, _T.mean, _T.std, _T.var, _T.amax, _T.amin,
              _T.logsumexp, _T.norm, _T.prod}
# What a pooled value (a loss) may go through: scaling, sums, reshapes.
POOLED_OK = {torch.add, torch.sub, torch.mul, torch.div, torch.neg, _T.add, _T.sub, _T.mul, _T.div,
             _T.neg, _T.__add__, _T.__radd__, _T.__sub__, _T.__rsub__, _T.__mul__, _T.__rmul__,
             _T.__truediv__, _T.__neg__, _T.__iadd__, _T.__imul__, _T.__itruediv__, _T.add_,
             _T.mul_, _T.div_, torch.sum, torch.mean, _T.sum, _T.mean, _T.view, _T.reshape,
             _T.squeeze, _T.unsqueeze, _T.clone, _T.to, _T.float, _T.double, _T.contiguous,
             _T.detach, torch.stack, torch.cat, _T.expand, _T.__getitem__}


class Router(TorchFunctionMode):
    """Sends each torch call to its rule (the read-only ``rules.FUNCTION_RULES``) or through."""

    def __init__(self, capture: "Capture"):
        super().__init__()
        self.capture = capture

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        cap = self.capture
        if cap.suspended:
            return func(*args, **kwargs)
        if func in ALWAYS:
            return FUNCTION_RULES[func](cap, func, args, kwargs)
        if not torch.is_grad_enabled():
            return func(*args, **kwargs)
        tensors, deep = _tensors(args, kwargs)
        moves = func in LAYOUT_FUNCS
        if func not in REDUCTIONS and not deep and not any(map(cap.notable, tensors)):
            out = func(*args, **kwargs)  # data on dim 0 that requires grad, and constants
            if moves and not (len(tensors) == 1 and stays(func, tensors[0], out, args, kwargs, cap.tracker.n)):
                self._follow(func, args, kwargs, out, tensors, True)  # where the samples went
            return out
        if deep:  # containers in containers: every tensor, wherever it sits
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        measured, kinds = False, set()
        for t in tensors:
            if cap.ref(t) is not None:
                measured = True
            else:
                k = cap.tracker.kind(t)
                kinds.add("data_nograd" if k == DATA and not t.requires_grad else k)
        if not measured:
            out = self._untracked(func, args, kwargs, kinds)
            self._follow(func, args, kwargs, out, tensors, moves)
            return out
        if POOLED in kinds:
            raise UnsupportedUseError(
                f"{describe(cap, func, self._flat_refs(args, kwargs)[2])} combines a parameter with a value summed over the "
                "batch (a penalty added to the loss?): it has no per-sample part. Add it "
                "outside the capture, or use the optimizer's weight_decay"
            )
        rule = FUNCTION_RULES.get(func)
        if rule is not None and func not in METADATA and kinds & {DATA, "data_nograd"}:
            return rule(cap, func, args, kwargs)
        flat, spec, refs = self._flat_refs(args, kwargs)
        if func in METADATA or not (kinds & {DATA, "data_nograd"}):
            out = func(*args, **kwargs)
            cap.record_expr(func, flat, spec, refs, out)
            return out
        out = handle_direct(cap, func, flat, spec, refs, describe(cap, func, refs))
        self._follow(func, args, kwargs, out, [t for t in tensors if cap.ref(t) is None], moves)
        return out

    def _flat_refs(self, args, kwargs):
        """``(flat, spec, refs)``: the call as a flat list (to be replayed) and the references
        of its measured tensors by position in it."""
        flat, spec = tree_flatten((args, kwargs))
        refs = {}
        for i, t in enumerate(flat):
            r = self.capture.ref(t) if isinstance(t, torch.Tensor) else None
            if r is not None:
                refs[i] = r
        return flat, spec, refs

    def _follow(self, func, args, kwargs, out, tensors, moves: bool) -> None:
        """Record the sample layout of the outputs of a call on data, where it moves."""
        tr = self.capture.tracker
        if tr.n is None or not tensors:
            return
        data, moved = [], moves
        for i, t in enumerate(tensors):
            if not t.requires_grad and tr.kind(t) != DATA:
                continue
            rec = tr.recorded(t)
            if rec is None:
                rec = default_layout(t.shape, tr.n) or "a call before this one"
            else:
                moved = True
            if isinstance(rec, str):
                for o in outputs_of(out):
                    tr.record(o, None, rec)
                return
            data.append((i, t, rec))
        if moved and data:
            follow(func, args, kwargs, out, data, tr.n, tr.record)

    def _untracked(self, func, args, kwargs, kinds):
        out = func(*args, **kwargs)
        if kinds <= {CONST}:
            return out
        cap = self.capture
        grads = list(outputs_requiring_grad(out))
        if POOLED in kinds and grads:
            if DATA in kinds or "data_nograd" in kinds or func not in POOLED_OK:
                raise SampleMixingError(
                    f"{func_name(func)} uses a value summed over the batch dimension together "
                    "with per-sample data (or transforms it non-linearly), so each sample's "
                    "loss depends on the other samples and per-sample gradients do not exist. "
                    "Keep the batch dimension until the loss, or measure with the micro-batch "
                    "source (gradnoise.NoiseMonitor(model, source='microbatch'))"
                )
            for o in grads:
                cap.tracker.note_pooled(o)
        elif func in REDUCTIONS and DATA in kinds and _pools_samples(args, kwargs):
            for o in grads:
                cap.tracker.note_pooled(o)
        elif "data_nograd" in kinds:
            for o in tree_flatten(out)[0]:
                if isinstance(o, torch.Tensor):
                    cap.tracker.note_data(o)
        return out


def _tensors(args, kwargs) -> Tuple[List[torch.Tensor], bool]:
    """Tensor arguments, one level into lists and tuples (where rules' tensors are), and
    whether a container holds containers (or a dict: then only a full flatten finds them)."""
    out, deep = [], False
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, torch.Tensor):
                    out.append(b)
                elif isinstance(b, (list, tuple, dict)):
                    deep = True
        elif isinstance(a, dict):
            deep = True
    return out, deep


def _pools_samples(args, kwargs) -> bool:
    """True when a reduction's ``dim`` covers dim 0 of its input (or all dims)."""
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or not x.requires_grad:
        return False
    dim = args[1] if len(args) > 1 and not isinstance(args[1], (bool, torch.dtype)) else kwargs.get("dim")
    if dim is None:
        return True
    dims = dim if isinstance(dim, (list, tuple)) else (dim,)
    return any(isinstance(d, int) and d % x.dim() == 0 for d in dims)




def outputs_of(out: Any) -> Iterator[torch.Tensor]:
    """Tensor outputs of a call."""
    for t in out if isinstance(out, (list, tuple)) else (out,):
        if isinstance(t, torch.Tensor):
            yield t


def outputs_requiring_grad(out: Any) -> Iterator[torch.Tensor]:
    """Tensor outputs that are part of the autograd graph."""
    items = out if isinstance(out, (list, tuple)) else (out,)
    for t in items:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            yield t
