"""Small ``nn.Linear`` layers (and Hugging Face ``Conv1D``), ``nn.LayerNorm`` and
``nn.GroupNorm`` measured by two module hooks instead of the router.

Where a step is launch-bound (small tensors: on a GPU, most small and medium models), the
Python a layer's rule runs per call costs more than the layer itself. Such a layer — its
class's own ``forward``; its input per-sample data with the samples sample-major on dim 0
(``[n·k, …]``); outside autocast; for a Linear, a weight gradient of at most
``LEAN_MACS`` multiply-adds — is measured without the router:

* a forward pre-hook lets the layer run past the router (when it is the module's last
  pre-hook, so the input it checks is the one the layer gets);
* a forward hook registers the uses of its parameters with the store (a Linear's input as
  its weight's forward factor, so any other use of the same parameter gets its exact cross
  terms) and a tensor hook on the output;
* in the backward pass that hook hands over the per-sample forms — ``G_n = Σ_t δ_nt a_ntᵀ``
  and ``Σ_t δ_nt`` for a Linear, ``Σ δ_n ⊙ x̂_n`` and ``Σ δ_n`` for a norm (``x̂``
  recomputed) — while the gradients themselves are autograd's. The store norms the small
  forms of single-use parameters together, one batch per shape, at the end of the pass.

Anything else (a larger layer, moved samples, a parameter expression as input, autocast,
a module rule covering the layer, a pre-hook after ours) goes through the router as before.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import amp
from .forms import Dense, Factored, ForwardFactor
from .layout import default_layout
from .norm import affine_forms
from .site import take
from .tracking import DATA

if TYPE_CHECKING:  # pragma: no cover
    from .context import Capture

LEAN_MACS = 1 << 21  # multiply-adds of the layer's weight gradient (about 2M: microseconds)


class _Lean:
    """The two hooks of one layer: the router stands aside while the layer runs when
    :meth:`_fits` accepts its input; :meth:`_register` then registers the uses."""

    __slots__ = ("cap", "module", "weight", "bias", "_pre_id", "_active")

    def __init__(self, cap: "Capture", module: nn.Module):
        self.cap, self.module = cap, module
        names = cap.store.names
        w, b = getattr(module, "weight", None), getattr(module, "bias", None)
        self.weight = w if w is not None and id(w) in names else None
        self.bias = b if b is not None and id(b) in names else None
        self._active = False

    def attach(self) -> List:
        pre = self.module.register_forward_pre_hook(self._pre)
        self._pre_id = pre.id
        return [pre, self.module.register_forward_hook(self._post, always_call=True)]

    def _pre(self, module: nn.Module, args) -> None:
        with torch._C.DisableTorchFunction():  # its own tensor calls pass the router by
            self._active = self._enter(module, args)
            if self._active:
                self.cap.suspended = True

    def _enter(self, module: nn.Module, args) -> bool:
        cap = self.cap
        if cap.suspended or not cap.routing or not torch.is_grad_enabled() or len(args) != 1:
            return False
        if next(reversed(module._forward_pre_hooks)) != self._pre_id:
            return False  # a pre-hook after ours may change the input
        x, n = args[0], cap.tracker.n
        if n is None or not isinstance(x, torch.Tensor) or x.dim() < 2:
            return False
        if any(p is not None and cap.ref(p) is None for p in (self.weight, self.bias)):
            return False  # a module rule covers it now
        if cap.ref(x) is not None or cap.tracker.kind(x) != DATA or cap.tracker.recorded(x) is not None:
            return False  # not per-sample data on dim 0
        if default_layout(x.shape, n) is None or amp.autocast_dtype(x.device.type) is not None:
            return False
        return self._fits(x)

    def _fits(self, x: torch.Tensor) -> bool:
        return True

    def _post(self, module: nn.Module, args, y) -> None:
        if not self._active:
            return
        self._active = False
        self.cap.suspended = False
        if isinstance(y, torch.Tensor) and y.requires_grad:
            with torch._C.DisableTorchFunction():
                self._register(args[0].detach(), y)

    def _register(self, x: torch.Tensor, y: torch.Tensor) -> None:
        raise NotImplementedError

    def _dense_uses(self):
        store = self.cap.store
        return [(p, store.add_use(p, None, (0, p.shape[0]))) for p in (self.weight, self.bias) if p is not None]


class LeanLinear(_Lean):
    """``nn.Linear``, or a Hugging Face ``Conv1D`` (``transposed``: ``y = x W + b`` with
    ``W`` ``[d_in, d_out]``), of at most ``LEAN_MACS`` weight-gradient multiply-adds."""

    __slots__ = ("transposed",)

    def __init__(self, cap: "Capture", module: nn.Module, transposed: bool = False):
        super().__init__(cap, module)
        self.transposed = transposed

    def _fits(self, x: torch.Tensor) -> bool:
        w = self.module.weight
        return self.weight is not None and x.numel() // x.shape[-1] * w.shape[0] * w.shape[1] <= LEAN_MACS

    def _register(self, x: torch.Tensor, y: torch.Tensor) -> None:
        n = self.cap.tracker.n
        a = x.reshape(n, -1, x.shape[-1])  # [n, T, d_in]
        store, w, b = self.cap.store, self.weight, self.bias
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


class LeanNorm(_Lean):
    """``nn.LayerNorm`` (normalising the last dims, never the sample's) or ``nn.GroupNorm``
    (``channel``): the forms of :func:`~gradnoise.capture.norm.affine_forms` from ``x̂``
    recomputed in the backward hook."""

    __slots__ = ("channel",)

    def __init__(self, cap: "Capture", module: nn.Module):
        super().__init__(cap, module)
        self.channel = isinstance(module, nn.GroupNorm)

    def _fits(self, x: torch.Tensor) -> bool:
        if self.weight is None and self.bias is None:
            return False
        return self.channel or x.dim() > len(self.module.normalized_shape)

    def _register(self, x: torch.Tensor, y: torch.Tensor) -> None:
        uses = self._dense_uses()
        box = [x]
        y.register_hook(lambda d: self._backward(take(box), d, uses))

    def _backward(self, x: torch.Tensor, d: torch.Tensor, uses) -> None:
        m, n = self.module, self.cap.tracker.n if self.cap.tracker.n is not None else x.shape[0]
        with torch.no_grad():
            if self.channel:
                xhat = F.group_norm(x, m.num_groups, eps=m.eps)
            else:
                xhat = F.layer_norm(x, m.normalized_shape, eps=m.eps)
            k = x.shape[0] // n
            forms = affine_forms(xhat.reshape(n, k, *x.shape[1:]), d.reshape(n, k, *d.shape[1:]),
                                 None if self.weight is None else m.weight.shape,
                                 None if self.bias is None else m.bias.shape, self.channel)
        for p, use in uses:
            self.cap.store.give(p, use, forms["weight" if p is self.weight else "bias"], policy=self.cap.policy)


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
        elif type(m).forward in (nn.LayerNorm.forward, nn.GroupNorm.forward) and isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            lean = LeanNorm(cap, m)
        else:
            continue
        if lean.weight is not None or lean.bias is not None:
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
