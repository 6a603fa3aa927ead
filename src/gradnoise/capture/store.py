"""Where one capture's per-sample results accumulate, use by use.

Rules hand over each *use* of a parameter in one of the forms of
:mod:`~gradnoise.capture.forms`, in the loss's own units (under ``reduction="mean"``
every output gradient carries a 1/B); the store scales once, at the end, to
``g_i = ∇l_i`` (squared norms by B²). A parameter's per-sample squared norm is

    ||Σ_k G⁽ᵏ⁾_n||² = Σ_k ||G⁽ᵏ⁾_n||² + 2 Σ_{k<l} ⟨G⁽ᵏ⁾_n, G⁽ˡ⁾_n⟩

Each use's own norm takes the cheaper route (:func:`route`). Cross terms come from the
factors: every use registers its forward factor in the forward pass; when a use's
gradients arrive, they are projected on the forward factor of each use still to come
(or, where that is smaller, kept as they are), and a use that arrives takes
``Σ_t y_t·Q_t`` with its own factor ``y``. Only uses with no factored form (dense
per-sample gradients of a module rule or a parameter expression) make the store hold
``[n, numel]``: the running sum of the uses before them.

A capture may see several forward/backward *passes* (gradient accumulation); each pass's
samples are appended. Under ``reduction="mean"`` each micro-batch loss is taken to be
scaled by its share ``b_j/B`` of the step, and every raw result is scaled by the total B.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..errors import CaptureStateError
from .forms import ONE_PASS, Dense, Factored, Form, ForwardFactor, Lookup, acc, as_matrix, cross, inner, project, sq_norms

# A rule's temporaries stay within max(the size of its layer's input, this many elements).
BUDGET_FLOOR = 1 << 18  # 1 MiB of float32
# Per-sample gradients of single-use parameters (rows up to ONE_PASS elements) held for one
# batched norm per shape at the end of the pass, up to the budget floor in all (1 MiB: the
# many small norms of a launch-bound step batch, a large model's memory does not grow).
DEFER_ELEMENTS = BUDGET_FLOOR


def chunk_size(n: int, per_sample: int, budget: int) -> int:
    """Samples per chunk so that ``[c, per_sample]`` stays within ``max(budget,
    BUDGET_FLOOR, per_sample)`` elements."""
    return max(1, min(n, max(budget, BUDGET_FLOOR) // max(per_sample, 1)))


def route(form: Form, want_sum: bool, budget: int, forced: Optional[str], max_chunk: Optional[int]) -> Tuple[str, int]:
    """``("gram" | "materialise", samples per chunk)`` for one use's own norm.

    Factored ``[T, R] × [T, C]`` per sample: the Gram route costs ``T²(R + C)``,
    materialising ``T·R·C`` (the weight gradient's own cost: free when the caller wants
    ``Σ_n G_n`` from it) and ``R·C`` memory per sample. Without the sum the cheaper by
    these counts; with it, the Gram route while ``T(R + C) < θ·R·C``, ``θ`` the form's
    measured ``gram_below`` (Linear: 1 when chunks would hold fewer than 8 samples, else 0;
    convolutions: 0.5). Lookups and dense forms have one route.
    """
    n = form.n
    cap = (lambda c: c) if max_chunk is None else (lambda c: max(1, min(c, max_chunk)))
    if isinstance(form, (Dense, Lookup)):  # one route, and memory of the form's own size
        return "gram", n
    t, r, c = form.factor_dims()
    theta = form.gram_below(chunk_size(n, _cost(form, "materialise"), budget)) if want_sum else 1.0
    choice = forced or ("gram" if t * (r + c) < theta * r * c else "materialise")
    if not getattr(form, "has_gram", True):
        choice = "materialise"
    step = chunk_size(n, _cost(form, choice), budget)
    if hasattr(form, "max_chunk"):
        step = min(step, form.max_chunk(choice))
    return choice, cap(step)


def _cost(form, choice: str) -> int:
    """Elements one sample needs on route ``choice``."""
    if hasattr(form, "chunk_cost"):
        return form.chunk_cost(choice)
    t, r, c = form.factor_dims()
    return r * c if choice == "materialise" else 2 * t * t


class _Use:
    """One use of a parameter in a pass: its forward factor (None: a dense use), the rows
    ``(start, R)`` its row factor covers, and what arrived uses left for it."""

    __slots__ = ("fwd", "span", "done", "q", "kept")

    def __init__(self, fwd: Optional[Callable[[], ForwardFactor]], span: Tuple[int, int]):
        self.fwd, self.span, self.done, self.q, self.kept = fwd, span, False, None, []


class _Param:
    """A parameter's uses in a pass, its accumulated squared norms, and the running sum
    ``[n, R, C]`` of its arrived uses while a dense use is to come."""

    __slots__ = ("uses", "sq", "dense")

    def __init__(self):
        self.uses: List[_Use] = []
        self.sq: Optional[torch.Tensor] = None
        self.dense: Optional[torch.Tensor] = None


class SampleStore:
    """Per-sample squared norms of the parameters of one capture, combined over uses.

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
        self._new_pass()

    def _new_pass(self) -> None:
        self._params: Dict[int, _Param] = {}
        self._held: List[Tuple[_Param, torch.Tensor]] = []  # per-sample gradients awaiting their norms
        self._held_size = 0
        self._pass_n: Optional[int] = None
        self._in_backward = False

    def _close_pass(self) -> None:
        self._norm_held()
        if self._pass_n is not None:
            norms = {self.names[k]: st.sq for k, st in self._params.items() if st.sq is not None}
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
    def add_use(self, param: torch.Tensor, fwd: Optional[Callable[[], ForwardFactor]] = None,
                span: Tuple[int, int] = (0, 0)) -> int:
        """Register one use of ``param`` in the forward pass (a forward after a backward
        starts a new pass); ``fwd`` gives its forward factor, samples first (None: the use
        hands over dense gradients). Returns the use's index for :meth:`give`."""
        if self._in_backward:
            self._close_pass()
        st = self._params.setdefault(id(param), _Param())
        st.uses.append(_Use(fwd, span))
        return len(st.uses) - 1

    def uses(self, param: torch.Tensor) -> int:
        st = self._params.get(id(param))
        return 0 if st is None else len(st.uses)

    # ---- backward side ------------------------------------------------------------
    def _start(self, param: torch.Tensor, use: int, n: int) -> Tuple[_Param, _Use]:
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
        st = self._params.get(key)
        if st is None or use >= len(st.uses) or st.uses[use].done:
            raise CaptureStateError(
                f"parameter '{self.names[key]}' received per-sample results twice: a second "
                "backward through the same graph inside one capture is not supported; "
                "open one capture per backward pass"
            )
        return st, st.uses[use]

    def give(self, param: torch.Tensor, use: int, form: Form, *, want_sum: bool = False, budget: int = 0,
             policy=None) -> Optional[torch.Tensor]:
        """Hand over use ``use`` of ``param`` (a form over the whole parameter). Returns
        ``Σ_n G_n`` when ``want_sum`` (from the materialised gradients where they were
        computed, else from the form)."""
        st, u = self._start(param, use, form.n)
        forced = getattr(policy, "route", None)
        max_chunk = getattr(policy, "max_chunk", None)
        hold = (lambda g: self._hold(st, g)) if len(st.uses) == 1 else None
        if hold is not None and not want_sum and forced is None and _holdable(form):
            hold(form)  # a small factored use: normed with its peers at the end of the pass
            u.done, u.fwd = True, None
            return None
        sq, total = self._own(form, want_sum, budget, forced, max_chunk, hold)
        if len(st.uses) > 1:
            sq = sq + 2 * self._cross(st, u, form)
            self._leave(param, st, u, form)
        u.done, u.fwd, u.q, u.kept = True, None, None, []  # let its tensors go
        if sq is not None:  # None: held for a batched norm
            st.sq = sq if st.sq is None else st.sq + sq
        return total

    def _own(self, form: Form, want_sum: bool, budget: int, forced, max_chunk, hold=None):
        """Own squared norms ``[n]`` of one use and, if wanted, ``Σ_n G_n``. With ``hold``, a
        use whose per-sample gradients exist whole (dense, or materialised in one chunk) with
        rows of at most ``ONE_PASS`` elements hands them to ``hold`` and returns None."""
        choice, step = route(form, want_sum, budget, forced, max_chunk)
        n = form.n
        parts, total = [], None
        for lo in range(0, n, step):
            part = form if step >= n else form.slice(lo, lo + step)
            if choice == "materialise":
                g = part.materialise()
                if hold is not None and step >= n and g[0].numel() <= ONE_PASS:
                    hold(g)
                else:
                    parts.append(sq_norms(g))
                if want_sum:
                    s = g.sum(0)
                    total = s if total is None else total.add_(s)
                del g
            elif hold is not None and isinstance(part, Dense) and part.sq is None and part.grads[0].numel() <= ONE_PASS:
                hold(part.grads)
            else:
                parts.append(part.gram_sq_norms())
        if want_sum and total is None:
            total = form.total()
        if not parts:
            return None, total
        return (parts[0] if len(parts) == 1 else torch.cat(parts)), total

    def _hold(self, st: _Param, g) -> None:
        """Keep the per-sample gradients of a single-use parameter — ``g`` ``[n, …]``, or a
        small :class:`Factored` form — for a batched norm (:meth:`_norm_held`), within
        ``DEFER_ELEMENTS`` held and computed."""
        size = _held_size(g)
        if self._held_size + size > DEFER_ELEMENTS:
            self._norm_held()
        self._held.append((st, g if isinstance(g, Factored) else g.reshape(g.shape[0], -1)))
        self._held_size += size

    def _norm_held(self) -> None:
        """Squared norms of the held gradients, one batch per shape and dtype: a stacked norm
        of dense gradients (three kernels for every layer of that shape, where one norm per
        layer takes two); factored forms stacked and taken by the cheaper route."""
        groups: Dict[tuple, list] = {}
        for st, g in self._held:
            key = (g.rows.shape, g.cols.shape) if isinstance(g, Factored) else (g.shape,)
            groups.setdefault(key + (_dtype(g), _where(g)), []).append((st, g))
        for items in groups.values():
            forms = [g for _, g in items]
            if isinstance(forms[0], Factored):
                joined = forms[0] if len(forms) == 1 else Factored(
                    torch.cat([f.rows for f in forms]), torch.cat([f.cols for f in forms]))
                choice, _ = route(joined, False, DEFER_ELEMENTS, None, None)  # whole, within the limit
                sq = joined.gram_sq_norms() if choice == "gram" else sq_norms(joined.materialise())
            else:
                sq = sq_norms(forms[0] if len(forms) == 1 else torch.stack(forms).flatten(0, 1))
            for (st, _), row in zip(items, sq.view(len(items), -1).unbind(0)):
                st.sq = row if st.sq is None else st.sq + row
        self._held, self._held_size = [], 0

    def _cross(self, st: _Param, u: _Use, form: Form) -> torch.Tensor:
        """``Σ_{arrived k} ⟨G_n, G⁽ᵏ⁾_n⟩`` of an arriving use."""
        if u.fwd is None:  # dense: against the running sum of the arrived uses
            if st.dense is None:
                return torch.zeros(form.n, dtype=_acc_dtype(form), device=_device(form))
            g = as_matrix(form, st.dense.shape[1], st.dense.shape[2])
            return (g * st.dense).sum((1, 2))
        _, y = form.backward_factor()
        total = torch.zeros(form.n, dtype=acc(y).dtype, device=y.device)
        if u.q is not None:
            total = total + cross(u.q, y)
        for k in u.kept:
            total = total + inner(k, u.fwd(), u.span, y)
        return total

    def _leave(self, param: torch.Tensor, st: _Param, u: _Use, form: Form) -> None:
        """What the uses still to come need of this one: its projection on their forward
        factors (or the form itself, when smaller), and the running dense sum."""
        pending = [v for v in st.uses if not v.done and v is not u]
        if any(v.fwd is None for v in pending):
            g = as_matrix(form, *_param_matrix(param))
            st.dense = g if st.dense is None else st.dense + g
        for v in pending:
            if v.fwd is None:
                continue
            f = v.fwd()
            q_size = f.x.shape[1] * (v.span[1] if f.side == "cols" else _param_matrix(param)[1])
            if form.elements() <= q_size and not isinstance(form, Dense):
                v.kept.append(form)
            else:
                p = project(form, f, v.span)
                v.q = p if v.q is None else v.q + p

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


def _holdable(form: Form) -> bool:
    """A factored form over a whole parameter, norm not yet known, small enough to hold."""
    return isinstance(form, Factored) and form.sq is None and form.start == 0 and form.num_rows in (None, form.rows.shape[-1]) \
        and form.rows.shape[-1] * form.cols.shape[-1] <= ONE_PASS and _held_size(form) <= DEFER_ELEMENTS


def _held_size(g) -> int:
    """Elements a held item keeps, or needs when normed (whichever is larger)."""
    if not isinstance(g, Factored):
        return g.numel()
    n, t, r, c = g.n, g.positions, g.rows.shape[-1], g.cols.shape[-1]
    return n * max(t * (r + c), min(r * c, 2 * t * t))


def _dtype(g) -> torch.dtype:
    return (g.cols if isinstance(g, Factored) else g).dtype


def _where(g) -> torch.device:
    return (g.cols if isinstance(g, Factored) else g).device


def _param_matrix(param: torch.Tensor) -> Tuple[int, int]:
    rows = param.shape[0] if param.dim() else 1
    return rows, max(1, param.numel() // max(rows, 1))


def _acc_dtype(form: Form) -> torch.dtype:
    t = form.grads if isinstance(form, Dense) else form.cols
    return acc(t).dtype


def _device(form: Form) -> torch.device:
    return (form.grads if isinstance(form, Dense) else form.cols).device
