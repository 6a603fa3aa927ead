"""A *site*: one call of a rule, and the one adapter between rules and the store.

A rule's front end resolves each measured tensor argument of its call to a reference —
:class:`ParamRef` (a parameter, or a view of one: ``w.t()``, a slice ``w[e:2e]``) or an
:class:`~gradnoise.capture.expression.ExprRef` (a parameter expression) — and opens a
:class:`Site` with them by role (``"weight"``, ``"bias"``), the number of samples and its
memory budget. The site registers one use of every parameter involved, with the forward
factor the rule declares (:meth:`Site.use`). In the backward pass the rule's kernel
returns per-sample forms (:mod:`~gradnoise.capture.forms`) in the coordinates of the
tensor the call used; :meth:`Site.give` places them in the parameter's coordinates
(transposes and row spans stay factored; any other view is scattered densely),
maps an expression's per-sample gradients back to its parameters, and hands them to the
store, which chooses the route and the chunks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from ..errors import CaptureStateError
from .forms import Dense, Factored, Form, ForwardFactor
from .store import BUDGET_FLOOR, SampleStore


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


@dataclass(frozen=True)
class Policy:
    """How rules may compute: ``route`` forces the own-norm route of factored uses
    (``"gram"`` or ``"materialise"``; None: the cheaper, :func:`~gradnoise.capture.store.route`)
    and ``max_chunk`` caps the samples per chunk (None: by memory budget). For tests and
    benchmarks; the defaults are what users want."""

    route: Optional[str] = None
    max_chunk: Optional[int] = None


def view_kind(param: torch.Tensor, view: Optional[torch.Tensor]) -> Tuple[str, int]:
    """How a call's view relates to its parameter: ``("whole", 0)``, ``("t", 0)`` (the
    transpose of a 2-D parameter), ``("rows", start)`` (rows ``start…`` of a contiguous
    2-D parameter) or ``("other", 0)``."""
    if view is None:
        return "whole", 0
    if param.dim() == 2 and view.dim() == 2 and view.storage_offset() == param.storage_offset() \
            and tuple(view.shape) == tuple(param.shape)[::-1] and view.stride() == param.stride()[::-1]:
        return "t", 0
    offset = view.storage_offset() - param.storage_offset()
    if param.dim() == 2 and param.is_contiguous() and view.dim() == 2 and view.shape[1] == param.shape[1] \
            and view.stride() == param.stride() and offset % param.shape[1] == 0:
        return "rows", offset // param.shape[1]
    return "other", 0


def positions(param: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """Flat indices into ``param`` of the elements of ``view`` (a view of it)."""
    offset = view.storage_offset() - param.storage_offset()
    base = torch.arange(param.numel(), device=param.device).view(param.shape)
    return base.as_strided(view.shape, view.stride(), offset).reshape(-1)


def place(form: Form, param: torch.Tensor, view: Optional[torch.Tensor], kind_start=None) -> Form:
    """``form`` (gradients of ``view``) as gradients of the whole ``param``
    (``kind_start``: :func:`view_kind` of them, when known)."""
    kind, start = kind_start or view_kind(param, view)
    if kind == "whole":
        return form
    if isinstance(form, Factored) and kind == "t":
        return form.swapped()
    if isinstance(form, Factored) and kind == "rows":
        return form._replace(start=start, num_rows=param.shape[0])
    g = form.materialise()
    full = g.new_zeros(g.shape[0], param.numel())
    full.index_add_(1, positions(param, view), g.reshape(g.shape[0], -1))
    return Dense(full.view(g.shape[0], *param.shape))


class Site:
    """The measured tensors of one call by role, with one registered use of each of
    their parameters. ``n`` samples; the rule's temporaries stay within ``budget``
    elements (at least :data:`~gradnoise.capture.store.BUDGET_FLOOR`)."""

    def __init__(self, store: SampleStore, refs: Dict[str, object], n: int, budget: int = 0,
                 policy: Policy = Policy()):
        self.store, self.n, self.policy = store, n, policy
        self.budget = max(budget, BUDGET_FLOOR)
        self.refs = {k: r for k, r in refs.items() if r is not None}
        self._uses: Dict[str, list] = {}

    def __contains__(self, role: str) -> bool:
        return role in self.refs

    def use(self, role: str, side: Optional[str] = None, factor: Optional[Callable[[], torch.Tensor]] = None) -> None:
        """Register the use of ``role``. A factored use names the side of its factor known
        in the forward pass — ``"cols"`` (a Linear's input), ``"rows"`` or ``"ids"`` (a
        table's ids) — and ``factor()`` gives it, samples first, in the call's
        coordinates; without them the use is dense."""
        ref = self.refs.get(role)
        if ref is None:
            return
        if not isinstance(ref, ParamRef):  # an expression: dense uses of its parameters
            self._uses[role] = [(p, self.store.add_use(p)) for p in ref.params]
            return
        kind, start = view_kind(ref.param, ref.view)
        placed = None
        if side is not None and (kind == "whole" or (kind == "rows" and side == "cols")):
            placed = "rows" if side == "ids" else side
        elif side in ("rows", "cols") and kind == "t":
            placed = "rows" if side == "cols" else "cols"
        fwd = None if placed is None else _lazy(lambda: ForwardFactor(placed, factor()))
        rows = ref.param.shape[0] if ref.param.dim() else 1
        span = (start, ref.tensor.shape[0]) if kind == "rows" else (0, rows)
        self._uses[role] = [(ref.param, self.store.add_use(ref.param, fwd, span))]

    def give(self, role: str, form: Form, want_sum: bool = False) -> Optional[torch.Tensor]:
        """Hand over the per-sample gradients of ``role`` (in the call's coordinates).
        Returns ``Σ_n G_n`` of the tensor the call used when ``want_sum``."""
        ref = self.refs.get(role)
        if ref is None:
            return form.total() if want_sum else None
        uses = self._uses.pop(role, None)
        if uses is None:
            take([])  # a second backward through the same graph
        if not isinstance(ref, ParamRef):
            g = form.materialise()
            for (p, use), (_, gp) in zip(uses, ref.param_grads(g)):
                self.store.give(p, use, Dense(gp), budget=self.budget, policy=self.policy)
            return g.sum(0) if want_sum else None
        (p, use), = uses
        kind_start = view_kind(p, ref.view)
        kind = kind_start[0]
        placed = place(form, p, ref.view, kind_start)
        total = self.store.give(p, use, placed, want_sum=want_sum and kind != "other",
                                budget=self.budget, policy=self.policy)
        if want_sum and kind == "t":  # the sum over the whole parameter, transposed back
            total = total.t()
        elif want_sum and kind == "other":
            total = form.total()
        return total


def _lazy(make: Callable[[], ForwardFactor]) -> Callable[[], ForwardFactor]:
    """``make()`` computed once, on first call."""
    cache: list = []

    def get() -> ForwardFactor:
        if not cache:
            cache.append(make())
        return cache[0]
    return get

