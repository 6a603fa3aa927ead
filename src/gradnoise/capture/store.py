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

    Args:
        names: ``id(parameter) -> name`` of the parameters being measured.
        mean_reduction: True when the loss is a mean over samples (``reduction="mean"``).
    """

    def __init__(self, names: Dict[int, str], mean_reduction: bool):
        self.names = names
        self.mean_reduction = mean_reduction
        self.uses: Counter = Counter()
        self._filled: Counter = Counter()
        self.batch_size: Optional[int] = None
        self._sq_norms: Dict[str, torch.Tensor] = {}
        self._grads: Dict[str, torch.Tensor] = {}
        self._index_cache: Dict[tuple, torch.Tensor] = {}

    # ---- forward side -------------------------------------------------------------
    def add_use(self, param: torch.Tensor) -> None:
        """Count one use of ``param`` in the forward pass."""
        self.uses[id(param)] += 1

    def wants_grads(self, param: torch.Tensor, view: Optional[torch.Tensor]) -> bool:
        """True when the rule must hand over per-sample gradients, not just norms."""
        return view is not None or self.uses[id(param)] > 1

    # ---- backward side ------------------------------------------------------------
    def _check_batch(self, param: torch.Tensor, n: int, c: int) -> None:
        """``c`` more samples of a batch of ``n`` for ``param``: every use hands over each
        sample exactly once, so more than ``uses × n`` means a second backward."""
        if self.batch_size is None:
            self.batch_size = n
        elif n != self.batch_size:
            raise CaptureStateError(
                f"one capture saw batches of {self.batch_size} and {n} samples; "
                "open one capture per forward/backward pass of one batch"
            )
        key = id(param)
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
        if view is not None or self.uses[id(param)] > 1:
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
        rows of one ``[P, N]`` tensor (None when nothing was handed over)."""
        out = dict(self._sq_norms)
        for name, g in self._grads.items():
            val = torch.linalg.vector_norm(g, dim=1).square()
            out[name] = val if name not in out else out[name] + val
        if not out:
            return [], None
        dtype = torch.float64 if any(v.dtype == torch.float64 for v in out.values()) else torch.float32
        rows = torch.stack([v.to(dtype) for v in out.values()])
        if self.mean_reduction:
            rows.mul_(float(self.batch_size) ** 2)
        return list(out), rows


def _acc(t: torch.Tensor) -> torch.Tensor:
    """``t`` in its accumulation dtype: float64 stays, anything else becomes float32."""
    if t.dtype == torch.float64 or t.dtype == torch.float32:
        return t
    return t.float()
