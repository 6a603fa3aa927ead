"""The pieces every study trains with: batches without replacement, plain SGD steps,
the full-data loss and the exact full-data noise."""
from __future__ import annotations

import math
from typing import Dict, Iterator, Tuple

import torch
from torch import nn

from ..capture import capture
from .task import Task


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless index batches ``[batch_size]``: each epoch is a fresh permutation of
    ``range(n)`` cut into batches, the last partial one dropped (so every batch is drawn
    without replacement and has exactly ``batch_size`` samples)."""
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch size must be between 1 and the data set size {n}, got {batch_size}")
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i:i + batch_size]


@torch.no_grad()
def full_loss(model: nn.Module, task: Task, chunk: int = 2048) -> float:
    """The loss on the whole data set, ``(1/N) Σ l_i`` (``loss_fn`` is a batch mean, so
    chunks are weighted by their size). NaN/inf pass through."""
    x, total = task.x, 0.0
    for i in range(0, len(x), chunk):
        xb, yb = x[i:i + chunk], task.y[i:i + chunk]
        total += float(task.loss_fn(model(xb), yb)) * len(xb)
    return total / len(x)


def sgd_step(model: nn.Module, opt: torch.optim.Optimizer, task: Task, idx: torch.Tensor,
             monitor=None) -> float:
    """One optimizer step on the samples ``idx``; returns the batch loss. With a
    ``monitor`` (:class:`gradnoise.NoiseMonitor`), ``monitor.step()`` runs between the
    backward pass and the update."""
    opt.zero_grad(set_to_none=True)
    loss = task.loss_fn(model(task.x[idx]), task.y[idx])
    loss.backward()
    if monitor is not None:
        monitor.step()
    opt.step()
    return float(loss.detach())


def flat_grad(model: nn.Module) -> torch.Tensor:
    """All parameter gradients as one vector (zeros where a parameter got none)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in model.parameters() if p.requires_grad])


def full_noise(model: nn.Module, task: Task) -> Dict[str, float]:
    """Exact full-data quantities at the current parameters, from the per-sample engine.

    With per-sample gradients ``g_i`` of all ``N`` samples and ``∇J = (1/N) Σ g_i``:
    ``trace_cov = (1/N) Σ ||g_i||² − ||∇J||²`` (the population variance),
    ``grad_sq_norm = ||∇J||²``, ``b_simple`` their ratio, and ``loss = J``. Leaves
    ``p.grad`` holding ``∇J`` (see :func:`flat_grad`).
    """
    x = task.x
    model.zero_grad(set_to_none=True)
    with capture(model, reduction="mean") as cap:
        loss = task.loss_fn(model(x), task.y)
        loss.backward()
    mean_sq = sum(float(v.double().sum()) for v in cap.per_sample_sq_norms.values()) / len(x)
    g2 = float(flat_grad(model).double().square().sum())
    trace = mean_sq - g2
    return {"loss": float(loss.detach()), "trace_cov": trace, "grad_sq_norm": g2,
            "b_simple": trace / g2 if g2 > 0 else math.nan}


def diverged(loss: float, initial: float, factor: float = 3.0) -> bool:
    """A loss that is not finite or has grown past ``factor`` times the initial loss."""
    return not math.isfinite(loss) or loss > factor * initial


def train_sgd(model: nn.Module, task: Task, batch_size: int, lr: float, steps: int,
              generator: torch.Generator, initial: float, momentum: float = 0.0) -> Tuple[float, bool]:
    """``steps`` SGD steps; returns ``(full-data loss at the end, diverged)``. Stops
    early as soon as a batch loss diverges (:func:`diverged`)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    it = batches(task.size, batch_size, generator)
    for _ in range(steps):
        if diverged(sgd_step(model, opt, task, next(it)), initial):
            return math.nan, True
    final = full_loss(model, task)
    return final, diverged(final, initial)
