"""Module rules: per-sample gradients computed for a whole module at once.

A module rule handles a module type whose parameters are not used through a
functional rule: a user's own layer (``capture(model, rules={MyLayer: rule})``) or,
for anything else that owns parameters, the torch.func fallback
(:mod:`gradnoise.capture.fallback`). The protocol::

    rule(module, args, kwargs, output, grad_output) -> {local_name: Tensor[N, *p.shape]}

``args``/``kwargs`` are the call's inputs, ``output`` its output, ``grad_output`` the
gradient of the loss with respect to ``output`` (same structure; ``None`` where an output
takes no gradient), in the loss's own units: under ``reduction="mean"`` it carries the
1/B, which gradnoise multiplies back. The rule returns the per-sample gradients of the
module's *own* trainable parameters (``module.named_parameters(recurse=False)``).

A forward hook taps the module's differentiable outputs with an identity
``autograd.Function`` whose backward calls the rule once all output gradients exist.
Each call of the module is one use of its parameters.
"""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Callable, Dict, List, Mapping, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import FallbackError, SampleMixingError
from . import fallback
from .direct import Tap
from .rules import needs_module_rule
from .site import sq_norms

if TYPE_CHECKING:  # pragma: no cover
    from .context import Capture


def attach(cap: "Capture", model: nn.Module, rules: Mapping[type, Callable]) -> List:
    """Register the hooks a capture needs on ``model``; returns their handles."""
    handles = []
    try:
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                handles.append(m.register_forward_pre_hook(partial(_refuse_batch_stats, name)))
            own = {k: p for k, p in m._parameters.items() if p is not None and id(p) in cap.store.names}
            if not own:
                continue
            rule = _user_rule(rules, m)
            if rule is None:
                if not needs_module_rule(m):
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
            "it with GroupNorm/LayerNorm, or measure with the micro-batch source "
            "(gradnoise.NoiseMonitor(model, source='microbatch'))."
        )


class ModuleSite:
    """The hooks and call records of one module handled by a module rule."""

    def __init__(self, cap: "Capture", name: str, module: nn.Module, params: Dict[str, nn.Parameter], rule: Callable):
        self.cap, self.name, self.module, self.params, self.rule = cap, name, module, params, rule
        self._calls: List[Optional[tuple]] = []

    def attach(self) -> List:
        m = self.module
        return [
            m.register_forward_pre_hook(self._pre, with_kwargs=True),
            m.register_forward_hook(self._post, with_kwargs=True),
        ]

    def _pre(self, module, args, kwargs):
        live = torch.is_grad_enabled() and not self.cap.suspended
        self._calls.append((args, kwargs) if live else None)
        if live:
            for p in self.params.values():
                self.cap.active[id(p)] += 1
                self.cap.store.add_use(p)

    def _post(self, module, args, kwargs, output):
        call = self._calls.pop()
        if call is None:
            return None
        for p in self.params.values():
            self.cap.active[id(p)] -= 1
        flat, spec = tree_flatten(output)
        idx = [i for i, t in enumerate(flat) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not idx:
            return None
        record = (self, args, kwargs, output, spec, len(flat), idx)
        tapped = Tap.apply(lambda grads: self.run(record, grads), *[flat[i] for i in idx])
        for i, t in zip(idx, tapped):
            flat[i] = t
        return tree_unflatten(flat, spec)

    def run(self, record, grads) -> None:
        """Call the rule for one recorded call and hand its results to the store."""
        _, args, kwargs, output, spec, n_flat, idx = record
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
        self._hand_over(per)

    def _hand_over(self, per: Mapping[str, torch.Tensor]) -> None:
        where = f"the rule for module '{self.name or '<model>'}' ({type(self.module).__name__})"
        unknown = set(per) - set(self.params)
        if unknown:
            raise FallbackError(f"{where} returned gradients of unknown parameters {sorted(unknown)}")
        sizes = {g.shape[0] for g in per.values()}
        if len(sizes) > 1:
            raise FallbackError(f"{where} returned different sample counts {sorted(sizes)}")
        for local, g in per.items():
            p = self.params[local]
            if tuple(g.shape[1:]) != tuple(p.shape):
                raise FallbackError(
                    f"{where} returned shape {tuple(g.shape)} for '{local}', expected "
                    f"[N, {', '.join(map(str, p.shape))}]"
                )
            n = g.shape[0]
            self.cap.store.add(p, None, lambda g=g: sq_norms(g.reshape(n, -1)), lambda g=g: g, n)
