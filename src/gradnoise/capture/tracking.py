"""What each tensor a torch call receives *is*, while a capture is open.

The router classifies every tensor argument before deciding what a call needs:

* ``PARAM``  — a measured parameter, or a view of one (a slice, ``.t()``, ``expand``);
* ``EXPR``   — a *parameter expression*: computed from parameters and constants alone
  (``wpe(position_ids)`` with ids ``[1, T]``, ``table[index]``, ``w.exp()``), recorded so
  that its per-sample gradient, measured where it meets per-sample data, can be mapped
  back to the parameters (:mod:`gradnoise.capture.expression`);
* ``DATA``   — per-sample data: the model's inputs, what is computed from them, and every
  tensor that requires grad without being one of the above;
* ``POOLED`` — a reduction over the sample dimension of data that requires grad (a sum
  over the batch): it may only be scaled or added to another pooled value (a loss);
  combined with per-sample data again, samples would mix;
* ``CONST``  — anything else (buffers, ``torch.arange``, masks built from shapes).

The samples of a forward pass are the rows of the leading dimension of the model's first
tensor input (``n``); other inputs with ``n`` rows are per-sample data too, inputs of
another leading size are constants. Data carries the samples on the dimension its
:class:`~gradnoise.capture.layout.Layout` names: followed from the inputs through every
call that moves dimensions (:mod:`~gradnoise.capture.follow`) and recorded where it is not
the default (dim 0, sample-major: ``[n·k, …]`` is ``k`` rows per sample).
"""
from __future__ import annotations

import weakref
from typing import Dict, Iterable, Optional, Tuple, Union

import torch

from ..errors import UnsupportedUseError
from .layout import Layout, check, default_layout

PARAM, EXPR, DATA, POOLED, CONST = "param", "expr", "data", "pooled", "const"


class _Info:
    """What the tracker knows of one tensor (held by identity, not kept alive)."""

    __slots__ = ("ref", "expr", "pooled", "data", "layout")

    def __init__(self, t: torch.Tensor):
        self.ref = weakref.ref(t)
        self.expr, self.pooled, self.data, self.layout = None, False, False, None


class Tracker:
    """The per-capture record of data, pooled values, parameter expressions and the
    sample layouts of data: one entry per tensor, found by identity."""

    def __init__(self):
        self.n: Optional[int] = None  # samples of the current forward pass
        self._items: Dict[int, _Info] = {}

    def _get(self, t: torch.Tensor) -> Optional[_Info]:
        info = self._items.get(id(t))
        return info if info is not None and info.ref() is t else None

    def _set(self, t: torch.Tensor) -> _Info:
        info = self._get(t)
        if info is None:
            info = self._items[id(t)] = _Info(t)
        return info

    def expr(self, t: torch.Tensor):
        """``(Expr, output index)`` when ``t`` is a recorded parameter expression."""
        info = self._get(t)
        return None if info is None else info.expr

    def note_expr(self, t: torch.Tensor, value) -> None:
        self._set(t).expr = value

    def note_pooled(self, t: torch.Tensor) -> None:
        self._set(t).pooled = True

    def note_data(self, t: torch.Tensor) -> None:
        self._set(t).data = True

    def marked(self, t: torch.Tensor) -> bool:
        """True for a tensor that requires grad and is not plain data on dim 0: an
        expression, a pooled value or data whose samples moved."""
        info = self._get(t)
        return info is not None and (info.expr is not None or info.pooled or info.layout is not None)

    def start_forward(self, inputs: Iterable) -> None:
        """The model's forward begins: the first tensor input with a leading dimension
        gives the number of samples; tensor inputs with that many rows are data."""
        tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
        first = next((t for t in tensors if t.dim() > 0), None)
        if first is None:
            return
        self.n = int(first.shape[0])
        for t in tensors:
            if t.dim() > 0 and t.shape[0] == self.n:
                info = self._set(t)
                info.data, info.layout = True, None

    def kind(self, t: torch.Tensor) -> str:
        """``DATA``, ``POOLED``, ``EXPR`` or ``CONST`` of a tensor that is no parameter."""
        info = self._get(t)
        if info is not None:
            if info.expr is not None:
                return EXPR
            if info.pooled:
                return POOLED
            if info.data:
                return DATA
        if t.requires_grad:
            return DATA
        if self.n is None and t.dim() > 0:  # no model forward seen: rows are samples
            return DATA
        return CONST

    def recorded(self, t: torch.Tensor) -> Union[Layout, str, None]:
        """The recorded layout of ``t`` (or the name of the call that lost its samples);
        None for the default."""
        info = self._get(t)
        return None if info is None else info.layout

    def record(self, t: torch.Tensor, lay: Optional[Layout], call: str) -> None:
        """Note the layout of data ``t`` made by ``call`` (None: the samples were lost
        there); kept only where it is not the default."""
        n = self.n
        if n is None:
            return
        if lay is not None and check(lay, t.shape, n):
            if lay == default_layout(t.shape, n):
                info = self._get(t)
                if info is not None:
                    info.layout = None
                return
            self._set(t).layout = lay
        else:
            self._set(t).layout = call

    def copy_layout(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """``dst`` holds the samples as ``src`` does (an identity that copies)."""
        rec = self.recorded(src)
        if rec is not None:
            self._set(dst).layout = rec

    def layout(self, t: torch.Tensor, what: str) -> Tuple[Layout, int]:
        """``(layout, n)`` of data ``t`` for a rule (``what`` names it in errors)."""
        n = self.n
        rec = self.recorded(t)
        if n is None:
            return Layout(0), int(t.shape[0])
        if isinstance(rec, Layout):
            return rec, n
        if rec is None:
            lay = default_layout(t.shape, n)
            if lay is not None:
                return lay, n
            cause = (f"its leading dimension {t.shape[0] if t.dim() else '(none)'} is neither the "
                     f"batch size {n} nor a multiple of it")
        else:
            cause = f"{rec} moved them where gradnoise cannot follow"
        raise UnsupportedUseError(
            f"{what} meets data of shape {tuple(t.shape)} whose samples gradnoise cannot "
            f"locate: {cause} (samples start on dim 0 of the model's inputs and are followed "
            "through views, reshapes, transposes, permutes, indexing, joins and matrix products)"
        )

    def clear(self) -> None:
        self._items.clear()
