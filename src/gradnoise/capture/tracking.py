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
tensor input (``n``). A data tensor whose leading dimension is ``k·n`` holds ``k`` rows per
sample, sample-major (rows ``i·k … i·k + k − 1`` belong to sample ``i``), as
``x.view(n·k, …)`` of an ``[n, k, …]`` tensor gives: Hugging Face's ``Conv1D`` input
``[B·T, d]``, Swin's windows ``[B·nW, N, C]``.
"""
from __future__ import annotations

import weakref
from typing import Dict, Iterable, Optional

import torch

from ..errors import UnsupportedUseError

PARAM, EXPR, DATA, POOLED, CONST = "param", "expr", "data", "pooled", "const"


class TensorSet:
    """Tensors by identity, without keeping them alive, with a value per tensor."""

    def __init__(self):
        self._items: Dict[int, tuple] = {}

    def add(self, t: torch.Tensor, value=True) -> None:
        self._items[id(t)] = (weakref.ref(t), value)

    def get(self, t: torch.Tensor):
        item = self._items.get(id(t))
        if item is not None and item[0]() is t:
            return item[1]
        return None

    def clear(self) -> None:
        self._items.clear()


class Tracker:
    """The per-capture record of data, pooled values and parameter expressions."""

    def __init__(self):
        self.n: Optional[int] = None  # samples of the current forward pass
        self.exprs = TensorSet()
        self.data = TensorSet()
        self.pooled = TensorSet()

    def start_forward(self, inputs: Iterable) -> None:
        """The model's forward begins: its tensor inputs are data; the first one with a
        leading dimension gives the number of samples."""
        first = None
        for t in inputs:
            if isinstance(t, torch.Tensor):
                self.data.add(t)
                if first is None and t.dim() > 0:
                    first = int(t.shape[0])
        if first is not None:
            self.n = first

    def kind(self, t: torch.Tensor) -> str:
        """``DATA``, ``POOLED``, ``EXPR`` or ``CONST`` of a tensor that is no parameter."""
        if self.exprs.get(t) is not None:
            return EXPR
        if self.pooled.get(t) is not None:
            return POOLED
        if self.data.get(t) is not None or t.requires_grad:
            return DATA
        if self.n is None and t.dim() > 0:  # no model forward seen: rows are samples
            return DATA
        return CONST

    def samples(self, rows: int, what: str) -> int:
        """The number of samples ``n`` for data with ``rows`` leading rows, checking
        that ``rows`` is ``n`` or a multiple of it."""
        n = self.n
        if n is None:
            return rows
        if rows < n or rows % n:
            raise UnsupportedUseError(
                f"{what} meets data whose leading dimension {rows} is neither the batch "
                f"size {n} nor a multiple of it, so gradnoise cannot tell which sample "
                "each row belongs to (samples must lie on dim 0, sample-major when folded)"
            )
        return n

    def clear(self) -> None:
        self.exprs.clear()
        self.data.clear()
        self.pooled.clear()
