"""The torch-function mode that routes parameter uses to rules.

While a capture is open, every torch call made in Python passes through
:class:`Router`. A call in the rule table whose parameters are measured goes to its
rule; any other call that makes a measured parameter part of the graph (and is not
inside the module that owns it under a module rule) is an unsupported use and raises,
because its per-sample gradient would otherwise be silently missing.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

if TYPE_CHECKING:  # pragma: no cover
    from .context import Capture


class Router(TorchFunctionMode):
    """Sends each torch call to its rule (see ``rules.FUNCTION_RULES``) or through."""

    def __init__(self, capture: "Capture", table: dict):
        super().__init__()
        self.capture = capture
        self.table = table

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        cap = self.capture
        if cap.suspended:
            return func(*args, **kwargs)
        rule = self.table.get(func)
        if rule is not None:
            return rule(cap, func, args, kwargs)
        out = func(*args, **kwargs)
        if torch.is_grad_enabled():
            cap.check_use(func, _tensors(args, kwargs), out)
        return out


def _tensors(args, kwargs) -> Iterator[torch.Tensor]:
    """Tensor arguments, one level into lists and tuples."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, torch.Tensor):
                    yield b


def outputs_requiring_grad(out: Any) -> Iterator[torch.Tensor]:
    """Tensor outputs that are part of the autograd graph."""
    items = out if isinstance(out, (list, tuple)) else (out,)
    for t in items:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            yield t
