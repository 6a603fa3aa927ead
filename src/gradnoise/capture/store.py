"""Where one capture's per-sample results accumulate.

Rules hand their raw results to :class:`SampleStore` in the loss's own units (under
``reduction="mean"`` every output gradient carries a 1/B). The store keeps them raw and
scales once, at the end, to ``g_i = ∇l_i`` (norms by B², gradients by B). It combines
the uses of each parameter:

* a parameter used once, as a whole, receives per-sample squared norms ``[N]``;
* a parameter used several times, or through views (slices), needs the cross terms
  ``||Σ_k g_i⁽ᵏ⁾||² ≠ Σ_k ||g_i⁽ᵏ⁾||²``, so its uses hand over per-sample gradients
  ``[N, *shape]`` that are summed (each view into its own positions) before the norm.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..errors import CaptureStateError


class SampleStore:
    """Per-sample squared norms and gradients of the parameters of one capture.

    A capture may see several forward/backward *passes* (gradient accumulation over
    micro-batches); each pass's samples are appended. Under ``reduction="mean"`` each
    micro-batch loss is taken to be scaled by its share ``b_j/B`` of the step, so that
    the accumulated gradient is the mean over all ``B`` samples (the usual convention),
    and every raw result is scaled by the total ``B``.

    Args:
        names: ``id(parameter) -> name`` of the parameters being measured.
        mean_reduction: True when the loss is a mean over samples (``reduction="mean"``).
        on_first_touch: called with a parameter the first time a result for it arrives,
            before autograd accumulates its gradient (the capture notes ``p.grad`` then).
    """

    def __init__(self, names: Dict[int, str], mean_reduction: bool, on_first_touch: Optional[Callable] = None):
        self.names = names
        self.mean_reduction = mean_reduction
        self.on_first_touch = on_first_touch
        self._touched: set = set()
        self._passes: List[Tuple[int, Dict[str, torch.Tensor]]] = []
        self._index_cache: Dict[tuple, torch.Tensor] = {}
        self._new_pass()

    def _new_pass(self) -> None:
        self.uses: Counter = Counter()
        self._filled: Counter = Counter()
        self._pass_n: Optional[int] = None
        self._in_backward = False
        self._sq_norms: Dict[str, torch.Tensor] = {}
        self._grads: Dict[str, torch.Tensor] = {}

    def _close_pass(self) -> None:
        if self._pass_n is not None:
            norms = dict(self._sq_norms)
            for name, g in self._grads.items():
                val = torch.linalg.vector_norm(g, dim=1).square()
                norms[name] = val if name not in norms else norms[name] + val
            self._passes.append((self._pass_n, norms))
        self._new_pass()

    @property
    def batch_size(self) -> Optional[int]:
        """Samples seen so far, over all passes (None before the first result)."""
        sizes = self.pass_sizes
        return sum(sizes) if sizes else None

    @property
    def pass_sizes(self) -> List[int]:
        """Samples of each pass (micro-batch), in order."""
        return [n for n, _ in self._passes] + ([self._pass_n] if self._pass_n is not None else [])

    # ---- forward side -------------------------------------------------------------
    def add_use(self, param: torch.Tensor) -> None:
        """Count one use of ``param`` in the forward pass (a forward after a backward
        starts a new pass)."""
        if self._in_backward:
            self._close_pass()
        self.uses[id(param)] += 1

    def wants_grads(self, param: torch.Tensor, view: Optional[torch.Tensor]) -> bool:
        """True when the rule must hand over per-sample gradients, not just norms: the
        parameter has several uses, or a use of part of it (a view that is a mere
        permutation of all its elements, such as ``w.t()``, has the same norms)."""
        return (view is not None and not is_permutation(view, param)) or self.uses[id(param)] > 1

    # ---- backward side ------------------------------------------------------------
    def _check_batch(self, param: torch.Tensor, n: int, c: int) -> None:
        """``c`` more samples of a batch of ``n`` for ``param``: every use hands over each
        sample exactly once, so more than ``uses × n`` means a second backward."""
        self._in_backward = True
        key = id(param)
        if key not in self._touched:
            self._touched.add(key)
            if self.on_first_touch is not None:
                self.on_first_touch(param)
        if self._pass_n is None:
            self._pass_n = n
        elif n != self._pass_n:
            raise CaptureStateError(
                f"one forward/backward pass saw batches of {self._pass_n} and {n} samples; "
                "run one backward per forward (micro-batch)"
            )
        self._filled[key] += c
        if self._filled[key] > n * max(1, self.uses[key]):
            raise CaptureStateError(
                f"parameter '{self.names[key]}' received per-sample results twice: a second "
                "backward through the same graph inside one capture is not supported; "
                "open one capture per backward pass"
            )

    def add_sq_norms(self, param: torch.Tensor, sq_norms: torch.Tensor, n: int, start: int = 0) -> None:
        """Add raw squared norms ``[c]`` of samples ``start, …`` of a batch of ``n`` for a
        single whole-parameter use."""
        self._check_batch(param, n, sq_norms.shape[0])
        name = self.names[id(param)]
        value = _acc(sq_norms)
        buf = self._sq_norms.get(name)
        if buf is None and start == 0 and value.shape[0] == n:
            self._sq_norms[name] = value
            return
        if buf is None:
            buf = self._sq_norms[name] = value.new_zeros(n)
        buf[start : start + value.shape[0]] += value

    def add_grads(
        self, param: torch.Tensor, grads: torch.Tensor, view: Optional[torch.Tensor], n: int, start: int = 0
    ) -> None:
        """Add raw per-sample gradients ``[c, *view.shape]`` (or ``[c, *param.shape]``)
        of samples ``start, …, start + c − 1`` of a batch of ``n``."""
        c = grads.shape[0]
        self._check_batch(param, n, c)
        name = self.names[id(param)]
        flat = _acc(grads.reshape(c, -1))
        buf = self._grads.get(name)
        if buf is None:
            buf = self._grads[name] = flat.new_zeros(n, param.numel())
        rows = buf[start : start + c]
        if view is None:
            rows += flat
        else:
            rows.index_add_(1, self._positions(param, view), flat)

    def add(
        self,
        param: torch.Tensor,
        view: Optional[torch.Tensor],
        sq_norms: Callable[[], torch.Tensor],
        grads: Callable[[], torch.Tensor],
        n: int,
        start: int = 0,
    ) -> None:
        """Hand over one use (or a chunk of samples of it): ``sq_norms()`` ``[c]`` when
        that suffices, else ``grads()`` ``[c, *shape]``."""
        if self.wants_grads(param, view):
            self.add_grads(param, grads(), view, n, start)
        else:
            self.add_sq_norms(param, sq_norms(), n, start)

    def _positions(self, param: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        """Flat indices into ``param`` of the elements of ``view`` (a view of it)."""
        key = (id(param), tuple(view.shape), view.stride(), view.storage_offset())
        idx = self._index_cache.get(key)
        if idx is None:
            offset = view.storage_offset() - param.storage_offset()
            base = torch.arange(param.numel(), device=param.device).view(param.shape)
            idx = base.as_strided(view.shape, view.stride(), offset).reshape(-1)
            self._index_cache[key] = idx
        return idx

    # ---- results ------------------------------------------------------------------
    def sq_norms(self) -> Tuple[List[str], Optional[torch.Tensor]]:
        """Parameter names and their per-sample squared norms of ``g_i = ∇l_i`` as the
        rows of one ``[P, B]`` tensor, passes side by side (None when nothing arrived).
        A parameter a pass did not reach has zero gradient for that pass's samples."""
        self._close_pass()
        if not self._passes:
            return [], None
        names: Dict[str, None] = {}
        for _, norms in self._passes:
            names.update(dict.fromkeys(norms))
        dtype = torch.float64 if any(v.dtype == torch.float64 for _, p in self._passes for v in p.values()) \
            else torch.float32
        if len(self._passes) == 1:
            rows = torch.stack([self._passes[0][1][k].to(dtype) for k in names])
        else:
            device = next(iter(self._passes[0][1].values())).device
            rows = torch.cat([
                torch.stack([p[k].to(dtype) if k in p else torch.zeros(n, dtype=dtype, device=device) for k in names])
                for n, p in self._passes
            ], dim=1)
        if self.mean_reduction:
            rows.mul_(float(self.batch_size) ** 2)
        return list(names), rows


def is_permutation(view: torch.Tensor, param: torch.Tensor) -> bool:
    """True when ``view`` holds every element of the contiguous ``param`` exactly once."""
    if view.numel() != param.numel() or view.storage_offset() != param.storage_offset() \
            or not param.is_contiguous():
        return False
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(view.stride(), view.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _acc(t: torch.Tensor) -> torch.Tensor:
    """``t`` in its accumulation dtype: float64 stays, anything else becomes float32."""
    if t.dtype == torch.float64 or t.dtype == torch.float32:
        return t
    return t.float()
