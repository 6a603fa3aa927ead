"""Calling a closure at other weights: the shared machinery of the variance-reduced
optimizers, whose updates need the gradient of the *same* batch at two points (the
current iterate and the previous one, or a snapshot)."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch.optim import Optimizer

Closure = Callable[[], torch.Tensor]


def call_closure(optimizer: Optimizer, closure: Closure):
    """Zero ``optimizer``'s gradients in place, then run ``closure`` with grad enabled.

    Zeroing in place (``set_to_none=False``) keeps existing ``.grad`` tensors, which
    gradient-bucket views (DDP) rely on, and makes the closure's ``backward`` write the
    gradient of this call alone even if the closure does not zero gradients itself.
    """
    optimizer.zero_grad(set_to_none=False)
    with torch.enable_grad():
        return closure()


def gradients_at(
    optimizer: Optimizer, closure: Closure, at: Dict[torch.Tensor, torch.Tensor]
) -> Tuple[object, Dict[torch.Tensor, torch.Tensor]]:
    """The closure's loss and gradients with parameters temporarily set to other values.

    Every ``p`` in ``at`` is overwritten in place with ``at[p]`` (same shape), the closure
    is called once, and ``p`` is restored, even if the closure raises. The torch CPU
    generator and the CUDA generators of the parameters' devices are restored after the
    call too, so the next closure call of the step draws the same random numbers (the
    same dropout masks, the same batch if the closure samples it with ``torch``).

    Returns:
        ``(loss, grads)``: the closure's return value and, for every ``p`` in ``at``, a
        copy of ``p.grad`` after the call (zeros where it stayed ``None``).
    """
    params = list(at)
    cuda = sorted({p.device.index for p in params if p.device.type == "cuda"})
    with torch.no_grad():
        current = [p.detach().clone() for p in params]
    with torch.random.fork_rng(devices=cuda):
        try:
            with torch.no_grad():
                for p in params:
                    p.copy_(at[p])
            loss = call_closure(optimizer, closure)
        finally:
            with torch.no_grad():
                for p, value in zip(params, current):
                    p.copy_(value)
    grads = {p: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params}
    return loss, grads


def need_closure(name: str, closure: Optional[Closure], what: str) -> None:
    """Raise the one-line error for a step that needs a closure and got none."""
    if closure is None:
        raise ValueError(
            f"{name}.step needs a closure that recomputes the loss on this step's batch and "
            f"calls backward() ({what}); call step(closure)"
        )
