"""Per-step bookkeeping of the Hugging Face Trainer callback
(:mod:`gradnoise.integrations.transformers`): the calls of the watched model in one
optimizer step, with the scale the Trainer gave each loss, and the gradient norms before
the Trainer's clipping. No transformers import: plain PyTorch hooks."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ..capture.loss import loss_reduction
from ..monitor.sources import sq_norm

__all__ = ["ForwardLog", "PreClipNorms", "StepCalls"]


@dataclass
class StepCalls:
    """What the grad-enabled calls of the watched model showed during one optimizer step.

    Attributes:
        sizes: samples ``b_j`` of each call (dim 0 of its first tensor input), one per
            micro-batch.
        scales: call index -> ``s_j``, the gradient the backward pass sent into the loss
            the call returned, for calls whose loss is a plain mean over the micro-batch
            (read from its autograd node); the Trainer's backward loss is ``s_j·loss_j``.
        losses: the loss each call returned (detached; calls without one are left out)
            and whether it was given ``num_items_in_batch`` (then it is the call's summed
            loss over the step's item count, and the step's loss is their sum).
    """

    sizes: List[Optional[int]] = field(default_factory=list)
    scales: Dict[int, torch.Tensor] = field(default_factory=dict)
    losses: List[Tuple[torch.Tensor, bool]] = field(default_factory=list)

    def loss(self) -> Optional[torch.Tensor]:
        """The step's loss as the Trainer forms it (a 0-d tensor, not read here): the sum
        of losses normalised by ``num_items_in_batch``, the mean of plain mean losses;
        None when no call returned one."""
        if not self.losses:
            return None
        k = len(self.losses)
        return torch.stack([v.float() if by_items else v.float() / k for v, by_items in self.losses]).sum()

    def mean_loss_scales(self) -> Optional[List[float]]:
        """``[s_j]`` when every call returned a plain mean loss that reached the backward
        pass; None otherwise (a loss normalised by ``num_items_in_batch``, say)."""
        if not self.sizes or len(self.scales) != len(self.sizes):
            return None
        return [float(self.scales[j]) for j in range(len(self.sizes))]


class ForwardLog:
    """Forward hooks on the watched model filling one :class:`StepCalls` per step."""

    def __init__(self, model: nn.Module):
        self.calls = StepCalls()
        self._handles = [
            model.register_forward_pre_hook(self._pre, with_kwargs=True),
            model.register_forward_hook(self._post, with_kwargs=True),
        ]

    def _pre(self, module, args, kwargs) -> None:
        if torch.is_grad_enabled():
            first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() > 0), None)
            self.calls.sizes.append(None if first is None else int(first.shape[0]))

    def _post(self, module, args, kwargs, output) -> None:
        loss = output.get("loss") if isinstance(output, Mapping) else None
        if not (torch.is_grad_enabled() and isinstance(loss, torch.Tensor) and loss.requires_grad):
            return
        if loss.numel() == 1:
            self.calls.losses.append((loss.detach().reshape(()), kwargs.get("num_items_in_batch") is not None))
        if loss_reduction(loss) == "mean":
            calls, j = self.calls, len(self.calls.sizes) - 1

            def note(grad: torch.Tensor) -> None:
                calls.scales[j] = grad.detach()

            loss.register_hook(note)

    def take(self) -> StepCalls:
        """This step's calls; the next step starts afresh."""
        calls, self.calls = self.calls, StepCalls()
        return calls

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class PreClipNorms:
    """Each parameter's squared gradient norm after the step's latest backward pass
    (post-accumulate-grad hooks), to undo a rescaling such as gradient clipping that
    happens between the last backward pass and ``on_pre_optimizer_step``.

    Args:
        params: ``{name: parameter}``, the trainable parameters.
    """

    def __init__(self, params: Mapping[str, nn.Parameter]):
        self.params = dict(params)
        self.live = False  # record in this step
        self.sq: Dict[str, torch.Tensor] = {}
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(n)) for n, p in self.params.items()]

    def _hook(self, name: str):
        def hook(p: torch.Tensor) -> None:
            if self.live and p.grad is not None:
                self.sq[name] = sq_norm(p.grad.detach())

        return hook

    @contextlib.contextmanager
    def restored(self):
        """Inside the block, every gradient whose norm changed since its last backward
        pass is scaled back to that norm, ``g ← g·sqrt(pre/post)`` (exact for a uniform
        rescaling such as clipping, up to rounding); afterwards the gradients are, bit for
        bit, what they were."""
        sq, self.sq = self.sq, {}
        names = [n for n in sq if self.params[n].grad is not None]
        saved = []
        if names:
            grads = [self.params[n].grad for n in names]
            pre, post = _as_floats([sq[n] for n in names]), _as_floats([sq_norm(g.detach()) for g in grads])
            for g, a, b in zip(grads, pre, post):
                if a != b and b > 0 and math.isfinite(a) and math.isfinite(b):
                    saved.append((g, g.detach().clone()))
                    g.detach().mul_(math.sqrt(a / b))
        try:
            yield
        finally:
            for g, copy in saved:
                g.detach().copy_(copy)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.sq = {}


def _as_floats(values: List[torch.Tensor]) -> List[float]:
    """0-d tensors (any dtypes and devices) as Python floats, with one synchronisation."""
    first = values[0].device
    return torch.stack([v.to(first, torch.float64) for v in values]).tolist()
