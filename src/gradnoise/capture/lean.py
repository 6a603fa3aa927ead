"""Small ``nn.Linear`` layers (and Hugging Face ``Conv1D``) measured by two module hooks
instead of the router.

Where a step is launch-bound (small tensors: on a GPU, most small and medium models), the
Python a layer's rule runs per call costs more than the layer itself. An ``nn.Linear``
(its own ``forward``) whose weight gradient is small, ``n·T·d_in·d_out ≤ LEAN_MACS``, and
whose input is per-sample data with its samples sample-major on dim 0 (``[n·k, …, d_in]``),
outside autocast, is measured without the router:

* a forward pre-hook lets the layer's ``F.linear`` run past the router (when it is the
  module's last pre-hook, so the input it checks is the one the layer gets);
* a forward hook registers the uses of the weight and bias with the store (with the input
  as the weight's forward factor, so any other use of the same parameter gets its exact
  cross terms) and a tensor hook on the output;
* in the backward pass the hook hands over ``G_n = Σ_t δ_nt a_ntᵀ`` and ``Σ_t δ_nt``.
  The weight gradient itself is autograd's; the store materialises ``G_n`` (small by the
  condition above) and, for a single-use weight, norms it together with every layer of the
  same shape at the end of the pass.

Anything else (a larger layer, moved samples, a parameter expression as input, autocast,
a module rule covering the layer, a pre-hook after ours) goes through the router as before.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, List, Optional

import torch
from torch import nn

from . import amp
from .forms import Dense, Factored, ForwardFactor
from .layout import default_layout
from .site import take
from .tracking import DATA

if TYPE_CHECKING:  # pragma: no cover
    from .context import Capture

LEAN_MACS = 1 << 21  # multiply-adds of the layer's weight gradient (about 2M: microseconds)


class LeanLinear:
    """The hooks of one ``nn.Linear`` of a capture."""

    __slots__ = ("cap", "module", "weight", "bias", "transposed", "_pre_id", "_active")

    def __init__(self, cap: "Capture", module: nn.Module, transposed: bool = False):
        """``transposed``: a Hugging Face ``Conv1D``, ``y = x W + b`` with ``W`` ``[d_in, d_out]``."""
        self.cap, self.module, self.transposed = cap, module, transposed
        names = cap.store.names
        self.weight = module.weight if id(module.weight) in names else None
        self.bias = module.bias if module.bias is not None and id(module.bias) in names else None
        self._active = False

    def attach(self) -> List:
        pre = self.module.register_forward_pre_hook(self._pre)
        self._pre_id = pre.id
        return [pre, self.module.register_forward_hook(self._post, always_call=True)]

    def _pre(self, module: nn.Linear, args) -> None:
        with torch._C.DisableTorchFunction():  # its own tensor calls pass the router by
            self._enter(module, args)

    def _enter(self, module: nn.Linear, args) -> None:
        self._active = False
        cap = self.cap
        if cap.suspended or not cap.routing or not torch.is_grad_enabled() or len(args) != 1:
            return
        if next(reversed(module._forward_pre_hooks)) != self._pre_id:
            return
        if not self._fits(args[0]):
            return
        cap.suspended = self._active = True

    def _fits(self, x) -> bool:
        """The input is per-sample data, sample-major on dim 0, and the layer is small."""
        cap, w = self.cap, self.module.weight
        n = cap.tracker.n
        if n is None or self.weight is None or not isinstance(x, torch.Tensor) or x.dim() < 2:
            return False
        if cap.ref(w) is None or (self.bias is not None and cap.ref(self.bias) is None):
            return False  # a module rule covers it now
        if cap.ref(x) is not None or cap.tracker.kind(x) != DATA or cap.tracker.recorded(x) is not None:
            return False
        if default_layout(x.shape, n) is None or amp.autocast_dtype(x.device.type) is not None:
            return False
        return x.numel() // x.shape[-1] * w.shape[0] * w.shape[1] <= LEAN_MACS

    def _post(self, module: nn.Linear, args, y) -> None:
        if not self._active:
            return
        self._active = False
        with torch._C.DisableTorchFunction():
            self._register(args, y)

    def _register(self, args, y) -> None:
        cap = self.cap
        cap.suspended = False
        if not isinstance(y, torch.Tensor) or not y.requires_grad:
            return
        x = args[0]
        n = cap.tracker.n
        a = x.detach().reshape(n, -1, x.shape[-1])  # [n, T, d_in]
        store, w, b = cap.store, self.weight, self.bias
        side = "rows" if self.transposed else "cols"  # where the input sits in the weight's gradient
        uw = store.add_use(w, lambda: ForwardFactor(side, a), (0, w.shape[0]))
        ub = store.add_use(b, None, (0, b.shape[0])) if b is not None else None
        box = [a]
        y.register_hook(lambda d: self._backward(take(box), d, uw, ub))

    def _backward(self, a: torch.Tensor, d: torch.Tensor, uw: int, ub: Optional[int]) -> None:
        n = a.shape[0]
        d = d.reshape(n, -1, d.shape[-1])  # [n, T, d_out]
        store, policy = self.cap.store, self.cap.policy
        if ub is not None:
            store.give(self.bias, ub, Dense(d.sum(1) if d.shape[1] > 1 else d[:, 0]), policy=policy)
        form = Factored(d, a, d.shape[-1])
        store.give(self.weight, uw, form.swapped() if self.transposed else form, policy=policy)


def attach(cap: "Capture", modules) -> List:
    """Lean hooks on every ``nn.Linear`` (and Hugging Face ``Conv1D``) of ``modules``
    (``named_modules()``) that runs its class's standard forward; returns their handles."""
    conv1d = _hf_conv1d()
    handles = []
    for _, m in modules:
        if type(m).forward is nn.Linear.forward and isinstance(m, nn.Linear):
            lean = LeanLinear(cap, m)
        elif conv1d is not None and type(m).forward is conv1d.forward and isinstance(m, conv1d):
            lean = LeanLinear(cap, m, transposed=True)
        else:
            continue
        if lean.weight is not None:
            handles += lean.attach()
    return handles


def _hf_conv1d():
    """Hugging Face's ``Conv1D`` class where transformers is already imported (else None)."""
    if "transformers" not in sys.modules:
        return None
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - a transformers without it
        return None
    return Conv1D
