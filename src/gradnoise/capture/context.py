"""``gradnoise.capture``: per-sample gradient norms from one forward/backward pass.

The capture context owns everything it adds: a torch-function mode (the
:class:`~gradnoise.capture.router.Router`) that sends functional calls of known layers
to their rules, forward hooks on modules handled by module rules (user rules and the
torch.func fallback), and the :class:`~gradnoise.capture.store.SampleStore` that
collects results. Nothing is stored on modules or parameters; hooks and the mode are
removed on exit, also when the block raises.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections import Counter
from typing import Callable, Dict, Mapping, Optional

import torch
from torch import nn

from torch.utils._pytree import tree_flatten

from .. import stats as _stats
from ..errors import CaptureStateError, UnsupportedUseError
from . import lean
from . import modules as _modules
from .compiled import eager, refuse_compiled_region, require_stances, unwrap
from .direct import describe, handle_direct
from .fsdp import fsdp_params, local_shard, whole_norms
from .expression import Expr, ExprRef
from .router import Router
from .layout import Layout
from .site import ParamRef, Policy, Site
from .store import SampleStore
from .tracking import Tracker

_REDUCTIONS = ("mean", "sum")



class Capture:
    """Context manager measuring per-sample gradient norms of ``model``.

    Use :func:`capture` to make one. Inside the block run one forward and one backward
    pass of one batch, exactly as without gradnoise. Afterwards:

    * ``per_sample_sq_norms``: parameter name -> ``[B]`` tensor of ``||∇_θ l_i||²``
      restricted to that parameter (never scaled by 1/B);
    * ``stats()``: :class:`gradnoise.stats.NoiseStats` of the whole model, with
      ``by_param``.

    Every ``p.grad`` is what plain autograd would have produced. Under FSDP2's
    ``fully_shard`` (1-D mesh) the rules follow the unsharded parameters; the per-sample
    norms are this rank's samples, ``mean_sq_norms`` that of the whole reduced ``p.grad``
    (an all-reduce of the shards' squared norms), as under DDP: the monitor combines ranks.
    """

    def __init__(
        self,
        model: nn.Module,
        reduction: str = "mean",
        rules: Optional[Mapping[type, Callable]] = None,
        scope: str = "block",
        policy: Optional[Policy] = None,
    ):
        if scope not in ("block", "forward"):
            raise ValueError(f"scope must be 'block' or 'forward', got {scope!r}")
        if policy is not None and policy.route not in (None, "gram", "materialise"):
            raise ValueError(f"policy.route must be None, 'gram' or 'materialise', got {policy.route!r}")
        self.scope = scope
        self.policy = policy or Policy()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"capture needs an nn.Module, got {type(model).__name__}")
        self.model = unwrap(model)
        self._given = model  # a torch.compile wrapper, or the model
        self.reduction = reduction
        self.rules = dict(rules or {})
        self.suspended = False
        self._state = "new"
        self._hooks: list = []
        self._norms: Dict[str, torch.Tensor] = {}
        self._mean_sq: Dict[str, float] = {}
        self._sums: Dict[str, float] = {}

    # ---- context ------------------------------------------------------------------
    def __enter__(self) -> "Capture":
        refuse_compiled_region("a capture opened")
        if self._state != "new":
            raise CaptureStateError("a capture can be entered only once; make a new one")
        if _open_capture(self.model) is not None:
            raise CaptureStateError(
                f"a capture of this {type(self.model).__name__} is already open; "
                "close it before opening another"
            )
        modules = list(self.model.named_modules())  # one walk of the module tree
        named = _trainable(modules)
        self._fsdp = fsdp_params(self.model, named, modules)  # FSDP2: the sharded parameters stand
        named = [(n, self._fsdp[n].sharded_param if n in self._fsdp else p) for n, p in named]
        self._params: Dict[str, nn.Parameter] = dict(named)
        self._by_id = {id(p): p for _, p in named}
        self.store = SampleStore({id(p): n for n, p in named}, self.reduction == "mean", self._note_grad)
        self._ids: Dict[int, tuple] = {}  # FSDP2: id of either alias -> both ids
        self._unaliased = set(self._fsdp)
        self._alias()
        self.active: Counter = Counter()
        self.tracker = Tracker()
        self._router_on = False
        self._before: Dict[str, torch.Tensor] = {}
        # which .grad each parameter holds now, and its version: untouched ones keep both
        self._grad_at_enter = {n: (p.grad, local_shard(p.grad)._version) for n, p in named if p.grad is not None}
        self._router = Router(self)
        require_stances(self._given)
        self._eager = eager()  # compiled code runs eagerly while the capture is open
        try:
            self._hooks = _modules.attach(self, modules, self.rules)
            if not self._fsdp:  # FSDP2 swaps the parameters a layer holds: the router follows it
                self._hooks += lean.attach(self, modules)
            if self._fsdp:
                self._hooks += [m.register_forward_pre_hook(self._alias) for _, m in modules
                                if hasattr(m, "_get_fsdp_state")]
            self._hooks.append(self.model.register_forward_pre_hook(self.forward_starts, with_kwargs=True))
            if self.scope == "forward":
                self._hooks.append(self.model.register_forward_hook(
                    self._forward_ends, with_kwargs=True, always_call=True))
            else:
                self._push_router()
        except BaseException:
            self._remove_hooks()
            self._eager.__exit__(None, None, None)
            raise
        self._state = "open"
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            self._pop_router()
        finally:
            self._remove_hooks()
            self.tracker.clear()
            self._eager.__exit__(None, None, None)
        self._state = "failed"
        if exc_type is None:
            self._finish()  # raises on a failure: the capture stays "failed"
            self._state = "closed"
        return False

    # ---- the router's lifetime -------------------------------------------------------
    @property
    def routing(self) -> bool:
        """True while the router is on the torch-function mode stack."""
        return self._router_on

    def _push_router(self) -> None:
        if not self._router_on:
            self._router.__enter__()
            self._router_on = True

    def _pop_router(self) -> None:
        if self._router_on:
            self._router_on = False
            self._router.__exit__(None, None, None)

    def forward_starts(self, module, args, kwargs):
        """The model's forward begins: its inputs are this pass's samples. With
        ``scope="forward"`` the router is on only while the model's forward runs, so an
        exception before the backward leaves nothing of gradnoise active."""
        if self.suspended or not torch.is_grad_enabled():
            return None
        self.tracker.start_forward(tree_flatten((args, kwargs))[0])
        if self.scope == "forward":
            self._push_router()
        return None

    def _forward_ends(self, module, args, kwargs, output):
        self._pop_router()
        return None

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _note_grad(self, param: torch.Tensor) -> None:
        """Keep ``p.grad`` as it was before this capture's first contribution to it, so
        the batch gradient is what the capture's passes add (gradients left from an
        earlier step, or accumulated on purpose, are not mistaken for this batch's)."""
        name = self.store.names[id(param)]
        grad = self._params[name].grad  # FSDP2: the sharded parameter's, not the alias's
        if grad is not None:
            self._before[name] = local_shard(grad.detach()).clone()

    def _alias(self, *_) -> None:
        """FSDP2 computes with unsharded copies of its parameters, made at the first all-gather
        and reused: they stand for their names too (a forward pre-hook of FSDP2 modules)."""
        for name in [n for n in self._unaliased if hasattr(self._fsdp[n], "_unsharded_param")]:
            u, s = self._fsdp[name]._unsharded_param, self._params[name]
            self._by_id[id(u)], self.store.names[id(u)] = u, name
            self._ids[id(u)] = self._ids[id(s)] = (id(s), id(u))
            self._unaliased.discard(name)

    # ---- used by rules --------------------------------------------------------------
    def ref(self, t: Optional[torch.Tensor]):
        """The measured tensor ``t`` is: a :class:`ParamRef` (a parameter or a view of
        one, unless a module rule covers it now), an :class:`ExprRef` (a parameter
        expression), or None."""
        ref = self._lookup(t)
        if ref is not None:
            ids = self._ids.get(id(ref.param), (id(ref.param),))
            return None if any(self.active[i] for i in ids) else ref
        if isinstance(t, torch.Tensor):
            found = self.tracker.expr(t)
            if found is not None:
                return ExprRef(found[0], found[1], t, self.suspend)
        return None

    def notable(self, t: torch.Tensor) -> bool:
        """False for what needs no bookkeeping: data that requires grad with its samples
        on dim 0, and constants."""
        if self._lookup(t) is not None:
            return True
        tr = self.tracker
        if t.requires_grad:
            return tr.marked(t)
        return tr.kind(t) != "const"

    def site(self, refs: Dict[object, object], n: int, budget: int = 0) -> Site:
        """A site for one call of a rule: ``refs`` by role (None: not measured), ``n``
        samples, temporaries within ``budget`` elements."""
        return Site(self.store, refs, n, budget, self.policy)

    def layout(self, t: torch.Tensor, what: str):
        """``(Layout, n)`` of data ``t`` that ``what`` computes with."""
        return self.tracker.layout(t, what)

    def record_layout(self, out, lay: Layout) -> None:
        """A rule's outputs carry its input's samples as ``lay`` (nothing to record for
        the default: dim 0, sample-major)."""
        n = self.tracker.n
        for o in out if isinstance(out, (list, tuple)) else (out,):
            if isinstance(o, torch.Tensor) and not (lay.dim == 0 and lay.outer == 1 and n is not None
                                                    and o.dim() and o.shape[0] == lay.inner * n):
                self.tracker.record(o, lay, "a rule")

    def direct(self, func, args, kwargs):
        """Send a call to the direct-use rule (a rule's form it does not handle)."""
        flat, spec = tree_flatten((args, kwargs))
        refs = {}
        for i, t in enumerate(flat):
            r = self.ref(t) if isinstance(t, torch.Tensor) else None
            if r is not None:
                refs[i] = r
        return handle_direct(self, func, flat, spec, refs, describe(self, func, refs))

    def record_expr(self, func, flat: list, spec, refs: dict, out) -> None:
        """Note the outputs of ``func`` (measured tensors and constants only) as
        parameter expressions; views of a parameter stay parameter references."""
        outs = out if isinstance(out, (list, tuple)) else (out,)
        live = [(j, o) for j, o in enumerate(outs) if isinstance(o, torch.Tensor) and o.requires_grad
                and self._lookup(o) is None]
        if not live:
            return
        slots = {}
        for i, r in refs.items():
            slots[i] = ("param", r.param, r.view) if isinstance(r, ParamRef) else ("expr", r.expr, r.index)
        expr = Expr(func, flat, spec, slots)
        for j, o in live:
            self.tracker.note_expr(o, (expr, j))

    @contextlib.contextmanager
    def suspend(self):
        """Run torch calls past the router (a rule's own recomputations)."""
        prev, self.suspended = self.suspended, True
        try:
            yield
        finally:
            self.suspended = prev

    def name_of(self, param: torch.Tensor) -> str:
        return self.store.names[id(param)]

    def _lookup(self, t) -> Optional[ParamRef]:
        if not isinstance(t, torch.Tensor):
            return None
        if self._by_id.get(id(t)) is t:
            return ParamRef(t)
        base = t._base
        if base is not None and self._by_id.get(id(base)) is base:
            return ParamRef(base, t)
        return None

    # ---- results ------------------------------------------------------------------
    def _finish(self) -> None:
        names, rows = self.store.sq_norms()
        n = self.store.batch_size
        index = {name: i for i, name in enumerate(names)}
        kept, deltas = [], []
        for name, p in self._params.items():
            if p.grad is None or self._untouched(name, p):
                continue
            if name not in index:
                raise UnsupportedUseError(
                    f"parameter '{name}' received a gradient but no per-sample gradient "
                    "was computed: its gradient reached the loss without meeting per-sample "
                    "data, or it was used by code gradnoise cannot see (a custom "
                    "autograd.Function, TorchScript, a C++ extension, a backward outside the "
                    "capture block); give its module a rule: capture(model, rules={Layer: rule}), "
                    "see examples/own_rule.py"
                )
            g = local_shard(p.grad.detach())
            kept.append(name)
            deltas.append(g - self._before[name] if name in self._before else g)
        if not kept:
            return
        order = [index[k] for k in kept]
        if order != list(range(len(names))):
            rows = rows[order]
        self._norms = dict(zip(kept, rows.unbind(0)))
        scale = 1.0 if self.reduction == "mean" else 1.0 / n
        grad_norms = torch.stack(torch._foreach_norm(deltas)).to(rows.dtype)
        if self._fsdp:  # this rank holds shards of the FSDP2 gradients
            grad_norms = whole_norms(grad_norms, kept, self._fsdp)
        values = torch.cat([rows.sum(1), grad_norms]).tolist()
        self._sums = dict(zip(kept, values[: len(kept)]))
        self._mean_sq = {k: v * v * scale**2 for k, v in zip(kept, values[len(kept):])}
        if not all(map(math.isfinite, self._sums.values())):
            warnings.warn(
                "gradnoise: this batch has NaN or inf gradients; its statistics are "
                "flagged 'non_finite'",
                RuntimeWarning,
                stacklevel=3,
            )

    def _untouched(self, name: str, p: torch.Tensor) -> bool:
        """True when no gradient reached ``p`` in this capture (its ``.grad`` is the
        same tensor, unmodified, as when the capture opened)."""
        if name in self._before:
            return False
        held = self._grad_at_enter.get(name)
        return held is not None and held[0] is p.grad and held[1] == local_shard(p.grad)._version

    def _need_closed(self) -> None:
        if self._state != "closed":
            raise CaptureStateError(
                "results exist once the with-block has finished without error "
                f"(this capture is {self._state})"
            )

    @property
    def per_sample_sq_norms(self) -> Dict[str, torch.Tensor]:
        """Parameter name -> ``[B]`` per-sample squared gradient norms ``||g_i||²``."""
        self._need_closed()
        return dict(self._norms)

    @property
    def sq_norm_sums(self) -> Dict[str, float]:
        """Parameter name -> ``Σ_i ||g_i||²`` over the batch (``B·A``)."""
        self._need_closed()
        return dict(self._sums)

    @property
    def mean_sq_norms(self) -> Dict[str, float]:
        """Parameter name -> ``||ḡ||²`` of the batch-mean gradient (the moment ``C``)."""
        self._need_closed()
        return dict(self._mean_sq)

    @property
    def batch_size(self) -> Optional[int]:
        """Number of samples ``B`` the capture saw (None if no backward ran)."""
        return self.store.batch_size

    def stats(self, population: Optional[int] = None) -> _stats.NoiseStats:
        """Noise statistics of the whole model, ``by_param`` for each parameter.

        Args:
            population: ``N`` when the batch was drawn without replacement from a set
                of ``N`` samples (finite-population correction, DESIGN.md §1).
        """
        self._need_closed()
        if not self._norms:
            raise CaptureStateError(
                "no parameter received a gradient inside the capture; "
                "call loss.backward() inside the with-block"
            )
        n = self.store.batch_size
        parts = {
            name: _stats.from_moments(self._sums[name] / n, self._mean_sq[name], n, n, population)
            for name in self._norms
        }
        return _stats.total(parts)


def capture(
    model: nn.Module, reduction: str = "mean", rules: Optional[Mapping[type, Callable]] = None
) -> Capture:
    """Measure per-sample gradient norms of ``model`` for one forward/backward pass.

    Args:
        model: any ``nn.Module`` (not replaced or modified).
        reduction: ``"mean"`` when the loss is the mean of the per-sample losses
            (then autograd's gradients carry a 1/B that is multiplied back), ``"sum"``
            when it is their sum.
        rules: optional ``{ModuleType: rule}`` for layer types of your own; see
            :mod:`gradnoise.capture.modules` for the rule protocol.

    Example::

        with gradnoise.capture(model) as cap:
            loss_fn(model(x), y).backward()
        cap.per_sample_sq_norms["fc.weight"]   # [B]
        cap.stats().b_simple
    """
    return Capture(model, reduction, rules)


def _trainable(modules) -> list:
    """``(name, parameter)`` of the parameters that require grad, as ``named_parameters()``
    lists them (each tensor once, under its first name), from ``named_modules()``."""
    seen, out = set(), []
    for prefix, m in modules:
        for k, p in m._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            if p.requires_grad:
                out.append((f"{prefix}.{k}" if prefix else k, p))
    return out


def _open_capture(model: nn.Module) -> Optional[Capture]:
    """The open capture of ``model``, found by the forward pre-hook every capture puts on
    its model (whatever its scope, with or without its router on the stack)."""
    for hook in unwrap(model)._forward_pre_hooks.values():
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, Capture) and owner._state == "open":
            return owner
    return None
