"""A check on the loss handed to ``backward()`` inside a capture: its reduction must be
the one the capture was told, or every statistic would be off by a factor of B².

The reduction is read from the loss's last autograd node where it says: built-in loss
functions record it (``_saved_reduction``: 1 mean, 2 sum), and ``.mean()``/``.sum()``
are recognised. Anything else (a division by B, a sum of several terms) is trusted.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import ReductionError
from .args import bind

_SAVED = {1: "mean", 2: "sum"}


def loss_reduction(loss: torch.Tensor) -> Optional[str]:
    """``"mean"``, ``"sum"`` or None (unknown) for a scalar loss tensor."""
    fn = loss.grad_fn
    if fn is None or loss.numel() != 1:
        return None
    name = type(fn).__name__
    if name.startswith("MeanBackward"):
        return "mean"
    if name.startswith("SumBackward"):
        return "sum"
    return _SAVED.get(getattr(fn, "_saved_reduction", None))


def handle_backward(cap, func, args, kwargs):
    """Rule-table entry for ``Tensor.backward``: check the reduction, then run it."""
    (loss,) = bind(args, kwargs, ("self",))
    found = loss_reduction(loss) if isinstance(loss, torch.Tensor) else None
    if found is not None and found != cap.reduction:
        raise ReductionError(
            f"the loss was reduced with '{found}' ({type(loss.grad_fn).__name__}) but the "
            f"capture was opened with reduction='{cap.reduction}'; pass "
            f"reduction='{found}' to gradnoise.capture"
        )
    return func(*args, **kwargs)
