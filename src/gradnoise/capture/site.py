"""A *site*: one use of trainable parameters by one call of a rule.

The router resolves each tensor argument of a call to ``(parameter, view)``: the
tracked parameter it is, or is a view (slice) of, and the view itself (``None`` for the
whole parameter). A site carries these to the rule's backward, where the per-sample
results are handed to the capture's :class:`~gradnoise.capture.store.SampleStore`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..errors import CaptureStateError
from .store import SampleStore


def sq_norms(t: torch.Tensor, dims=1) -> torch.Tensor:
    """``Σ t²`` over ``dims`` (one fused reduction; faster than ``t.square().sum``)."""
    low = t.dtype in (torch.float16, torch.bfloat16)
    return torch.linalg.vector_norm(t, dim=dims, dtype=torch.float32 if low else None).square()


def take(box: list):
    """The one item of a one-shot box, for a gradient hook that must not keep it alive
    after it ran; a second call means a second backward through the same graph."""
    if not box:
        raise CaptureStateError(
            "a second backward through the same graph inside one capture: per-sample "
            "results would count twice; open one capture per backward pass"
        )
    return box.pop()


@dataclass(frozen=True)
class ParamRef:
    """A tracked parameter and the view of it a call used (``None``: all of it)."""

    param: torch.Tensor
    view: Optional[torch.Tensor] = None

    @property
    def params(self):
        return [self.param]

    @property
    def tensor(self) -> torch.Tensor:
        return self.param if self.view is None else self.view

    def then(self, fn) -> "ParamRef":
        """The view ``fn(tensor)`` of the same parameter (``fn`` must return a view)."""
        v, p = fn(self.tensor), self.param
        same = v.shape == p.shape and v.stride() == p.stride() and v.storage_offset() == p.storage_offset()
        return ParamRef(p, None if same else v)

    def first_row(self) -> "ParamRef":
        """The view restricted to ``[:1]`` of its leading dimension."""
        return self.then(lambda t: t[:1])


@dataclass(frozen=True)
class Policy:
    """How rules may compute: ``route`` forces the Linear/sequence route (``"gram"`` or
    ``"materialise"``; None: the cheaper by measured cost) and ``max_chunk`` caps the
    samples per chunk of materialised per-sample gradients (None: by memory budget).
    For tests and benchmarks; the defaults are what users want."""

    route: Optional[str] = None
    max_chunk: Optional[int] = None

    def chunk(self, step: int) -> int:
        return step if self.max_chunk is None else max(1, min(step, self.max_chunk))


@dataclass(frozen=True)
class Site:
    """The store and the parameters (``None`` when not measured) of one call."""

    store: SampleStore
    weight: Optional["Ref"] = None
    bias: Optional["Ref"] = None
    policy: Policy = Policy()

    def wants_grads(self, ref: Optional["Ref"]) -> bool:
        if ref is None:
            return False
        return not isinstance(ref, ParamRef) or self.store.wants_grads(ref.param, ref.view)

    def give(
        self,
        ref: Optional["Ref"],
        sq_norms: Callable[[], torch.Tensor],
        grads: Callable[[], torch.Tensor],
        n: int,
        start: int = 0,
    ) -> None:
        """Hand one parameter's per-sample results for samples ``start, …`` of a batch
        of ``n`` to the store (no-op for ``None``). ``grads()`` are per-sample gradients
        of the tensor the call used; for a parameter expression they are mapped back to
        its parameters."""
        give(self.store, ref, sq_norms, grads, n, start)


def give(store: SampleStore, ref, norms: Callable[[], torch.Tensor], grads: Callable[[], torch.Tensor],
         n: int, start: int = 0) -> None:
    """Hand one use's per-sample results to ``store`` (see :meth:`Site.give`)."""
    if ref is None:
        return
    if isinstance(ref, ParamRef):
        store.add(ref.param, ref.view, norms, grads, n, start)
        return
    g = grads()
    c = g.shape[0]
    for p, gp in ref.param_grads(g):
        store.add(p, None, lambda gp=gp: sq_norms(gp.reshape(c, -1)), lambda gp=gp: gp, n, start)


Ref = object  # ParamRef or gradnoise.capture.expression.ExprRef
