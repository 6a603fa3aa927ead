"""Module rules: per-sample gradients computed for a whole module at once.

A module rule handles a module type whose parameters are not used through a
functional rule: a user's own layer (``capture(model, rules={MyLayer: rule})``) or a
recurrent layer (GRU, LSTM, RNN: fused kernels on flat weights), which the torch.func
fallback handles (:mod:`gradnoise.capture.fallback`). The protocol::

    rule(module, args, kwargs, output, grad_output) -> {local_name: Tensor[N, *p.shape] or a form}

``args``/``kwargs`` are the call's inputs, ``output`` its output, ``grad_output`` the
gradient of the loss with respect to ``output`` (same structure; ``None`` where an output
takes no gradient), in the loss's own units: under ``reduction="mean"`` it carries the
1/B, which gradnoise multiplies back. The samples are on dim 0 of the inputs (gradnoise
checks where it followed them); the rule returns the gradients of the module's *own*
trainable parameters (``module.named_parameters(recurse=False)``) per row of that
dimension, ``N`` rows — one per sample, or ``k`` per sample for folded data such as
``[B·T, d]``, whose rows gradnoise sums per sample — as a tensor, or as one of the forms of
:mod:`gradnoise.capture.forms`: ``Factored(rows=δ, cols=a)`` for a weight used as
``Σ_t δ_t a_tᵀ`` (norms by the cheaper route, exact cross terms when the weight is also
used elsewhere, no ``[N, *shape]`` tensor), ``Lookup`` for a table, ``Dense`` for the rest.

A forward hook taps the module's differentiable outputs with an identity
``autograd.Function`` whose backward calls the rule once all output gradients exist.
Each call of the module is one use of its parameters.
"""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import MICROBATCH_RECIPE, FallbackError, SampleMixingError
from . import fallback
from .direct import Tap
from .forms import Dense, Factored, Lookup
from .layout import Layout, to_samples
from .site import ParamRef

if TYPE_CHECKING:  # pragma: no cover
    from .context import Capture


def attach(cap: "Capture", modules: Sequence[Tuple[str, nn.Module]], rules: Mapping[type, Callable]) -> List:
    """Register the hooks a capture needs on the model's ``named_modules()``; returns their
    handles."""
    handles = []
    try:
        for name, m in modules:
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                handles.append(m.register_forward_pre_hook(partial(_refuse_batch_stats, name)))
            own = {k: p for k, p in m._parameters.items() if p is not None and id(p) in cap.store.names}
            if not own:
                continue
            rule = _user_rule(rules, m)
            if rule is None:
                if not isinstance(m, nn.RNNBase):
                    continue
                rule = fallback.per_sample_grads
            handles += ModuleSite(cap, name, m, own, rule).attach()
    except BaseException:
        for h in handles:
            h.remove()
        raise
    return handles


def _user_rule(rules: Mapping[type, Callable], m: nn.Module) -> Optional[Callable]:
    for cls in type(m).__mro__:
        if cls in rules:
            return rules[cls]
    return None


def _refuse_batch_stats(name: str, module: nn.Module, args) -> None:
    uses_batch_stats = module.training or module.running_mean is None
    if uses_batch_stats and torch.is_grad_enabled():
        raise SampleMixingError(
            f"module '{name or '<model>'}' ({type(module).__name__}) normalises with the "
            "statistics of the whole batch, so each sample's loss depends on the other "
            "samples and per-sample gradients do not exist. Put it in eval mode, replace "
            f"it with GroupNorm/LayerNorm, or {MICROBATCH_RECIPE}."
        )


class ModuleSite:
    """The hooks and call records of one module handled by a module rule."""

    def __init__(self, cap: "Capture", name: str, module: nn.Module, params: Dict[str, nn.Parameter], rule: Callable):
        self.cap, self.name, self.module, self.params, self.rule = cap, name, module, params, rule
        self._calls: List[bool] = []

    def attach(self) -> List:
        m = self.module
        return [
            m.register_forward_pre_hook(self._pre, with_kwargs=True),
            m.register_forward_hook(self._post, with_kwargs=True),
        ]

    def _pre(self, module, args, kwargs):
        live = torch.is_grad_enabled() and not self.cap.suspended
        self._calls.append(live)
        if live:
            for p in self.params.values():
                self.cap.active[id(p)] += 1

    def _post(self, module, args, kwargs, output):
        if not self._calls.pop():
            return None
        cap = self.cap
        for p in self.params.values():
            cap.active[id(p)] -= 1
        lay, n = self._samples(args, kwargs)
        site = cap.site({k: ParamRef(p) for k, p in self.params.items()}, n)
        for k in self.params:
            site.use(k)
        flat, spec = tree_flatten(output)
        idx = [i for i, t in enumerate(flat) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not idx:
            return None
        record = (args, kwargs, output, spec, len(flat), idx)
        tapped = Tap.apply(lambda grads: self.run(site, lay, record, grads), *[flat[i] for i in idx])
        for i, t in zip(idx, tapped):
            cap.tracker.copy_layout(flat[i], t)
            flat[i] = t
        if isinstance(self.module, nn.RNNBase):
            self._rnn_layouts(flat, lay)
        return tree_unflatten(flat, spec)

    def _samples(self, args, kwargs) -> Tuple[Layout, int]:
        """The layout of the call's per-sample inputs (all alike): on dim 0 for a user's
        rule, on the batch dimension of a recurrent layer."""
        cap, where = self.cap, f"module '{self.name or '<model>'}' ({type(self.module).__name__})"
        data = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.dim() > 0
                and cap.tracker.kind(t) == "data"]
        if not data:
            raise FallbackError(f"{where} was called without a batched tensor input")
        lay, n = cap.layout(data[0], where)
        want = (0 if self.module.batch_first else 1) if isinstance(self.module, nn.RNNBase) else 0
        if lay.dim != want:
            raise FallbackError(
                f"{where} receives its samples on dim {lay.dim}; its rule needs them on dim {want} "
                "of its input")
        return lay, n

    def _rnn_layouts(self, flat: list, lay: Layout) -> None:
        """A recurrent layer's output has the input's layout; its hidden states carry the
        batch on dim 1."""
        tr = self.cap.tracker
        for j, t in enumerate(flat):
            if isinstance(t, torch.Tensor):
                tr.record(t, lay if j == 0 else Layout(1, lay.outer, lay.inner), type(self.module).__name__)

    def run(self, site, lay: Layout, record, grads) -> None:
        """Call the rule for one recorded call and hand its results to the store."""
        args, kwargs, output, spec, n_flat, idx = record
        flat_grads: List[Optional[torch.Tensor]] = [None] * n_flat
        for i, g in zip(idx, grads):
            flat_grads[i] = g
        grad_output = tree_unflatten(flat_grads, spec)
        cap = self.cap
        prev, cap.suspended = cap.suspended, True
        try:
            with torch.enable_grad():
                per = self.rule(self.module, args, kwargs, output, grad_output)
        finally:
            cap.suspended = prev
        self._hand_over(site, lay, per)

    def _hand_over(self, site, lay: Layout, per: Mapping[str, object]) -> None:
        """The rule's per-row results -> per-sample forms (a sample's rows summed)."""
        where = f"the rule for module '{self.name or '<model>'}' ({type(self.module).__name__})"
        unknown = set(per) - set(self.params)
        if unknown:
            raise FallbackError(f"{where} returned gradients of unknown parameters {sorted(unknown)}")
        rows = lay.outer * site.n * lay.inner
        for local, g in per.items():
            p = self.params[local]
            form = g if isinstance(g, (Dense, Factored, Lookup)) else Dense(g)
            if form.n != rows or (isinstance(form, Dense) and tuple(form.grads.shape[1:]) != tuple(p.shape)):
                shape = tuple(form.grads.shape) if isinstance(form, Dense) else f"a form of {form.n} rows"
                raise FallbackError(
                    f"{where} returned {shape} for '{local}', expected "
                    f"[{rows}, {', '.join(map(str, p.shape))}] (one row per input row)"
                )
            site.give(local, form if rows == site.n else per_sample(form, lay, site.n))


def per_sample(form, lay: Layout, n: int):
    """A form over the rows of folded data (``k`` rows per sample) as one over its samples:
    dense gradients summed per sample, factors laid side by side."""
    rows = Layout(0, lay.outer, lay.inner)
    if isinstance(form, Dense):
        return Dense(to_samples(form.grads, rows, n).sum(1))
    fold = lambda t: to_samples(t, rows, n).flatten(1, 2)  # noqa: E731  [n, k·T, …]
    if isinstance(form, Lookup):
        return form._replace(ids=fold(form.ids), cols=fold(form.cols))
    return form._replace(rows=fold(form.rows), cols=fold(form.cols))
