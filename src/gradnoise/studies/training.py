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
        monitor.step(loss=loss)
    opt.step()
    return float(loss.detach())


def flat_grad(model: nn.Module) -> torch.Tensor:
    """All parameter gradients as one vector (zeros where a parameter got none)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in model.parameters() if p.requires_grad])


def full_noise(model: nn.Module, task: Task, chunk: int = 1024) -> Dict[str, float]:
    """Exact full-data quantities at the current parameters, from the per-sample engine.

    With per-sample gradients ``g_i`` of all ``N`` samples and ``∇J = (1/N) Σ g_i``:
    ``trace_cov = (1/N) Σ ||g_i||² − ||∇J||²`` (the population variance),
    ``grad_sq_norm = ||∇J||²``, ``b_simple`` their ratio, and ``loss = J``. The data
    pass through one capture in chunks of ``chunk`` samples, each chunk's mean loss
    scaled by its share ``n_c/N`` (gradient accumulation), so memory stays that of one
    chunk. Leaves ``p.grad`` holding ``∇J`` (see :func:`flat_grad`).
    """
    n, total = task.size, 0.0
    model.zero_grad(set_to_none=True)
    with capture(model, reduction="mean") as cap:
        for i in range(0, n, chunk):
            xb, yb = task.x[i:i + chunk], task.y[i:i + chunk]
            loss = task.loss_fn(model(xb), yb) * (len(xb) / n)
            loss.backward()
            total += float(loss.detach())
    mean_sq = sum(float(v.double().sum()) for v in cap.per_sample_sq_norms.values()) / n
    g2 = float(flat_grad(model).double().square().sum())
    trace = mean_sq - g2
    return {"loss": total, "trace_cov": trace, "grad_sq_norm": g2,
            "b_simple": trace / g2 if g2 > 0 else math.nan}


BLOW_UP = 100.0   # a batch loss this many times the initial loss ends a run at once
DIVERGED = 3.0    # a full-data loss this many times the initial loss counts as diverged


def above(loss: float, initial: float, factor: float) -> bool:
    """``loss`` is NaN/inf or above ``initial + (factor − 1)·|initial|`` (``factor``
    times the initial loss when it is positive; sensible for negative losses too)."""
    return not math.isfinite(loss) or loss > initial + (factor - 1.0) * abs(initial)


def diverged(loss: float, initial: float) -> bool:
    """A full-data loss that is not finite or has grown past :data:`DIVERGED` times the
    initial loss."""
    return above(loss, initial, DIVERGED)


def train_sgd(model: nn.Module, task: Task, batch_size: int, lr: float, steps: int,
              generator: torch.Generator, initial: float) -> Tuple[float, bool]:
    """``steps`` SGD steps; returns ``(full-data loss at the end, diverged)``.

    One batch's loss is a noisy measure (heavy-tailed losses make single batches large
    at any rate), so a run stops early only when a batch loss blows up (NaN/inf or
    :data:`BLOW_UP` times the initial loss); otherwise divergence is judged on the
    full-data loss at the end (:func:`diverged`)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    it = batches(task.size, batch_size, generator)
    for _ in range(steps):
        if above(sgd_step(model, opt, task, next(it)), initial, BLOW_UP):
            return math.nan, True
    final = full_loss(model, task)
    return final, diverged(final, initial)


class ToTarget:
    """Counts one run's optimizer steps and examples and checks a target loss.

    Every ``eval_every`` examples the loss ``evaluate()`` (e.g. the full-data loss) is
    taken; the run is done when it is at or below ``target`` (or not finite), or after
    ``max_examples`` examples. ``seconds`` adds up only what the caller times as
    training (:meth:`after_step`'s ``seconds``), not the evaluations.
    """

    def __init__(self, evaluate, target: float, eval_every: int, max_examples: int):
        self.evaluate, self.target = evaluate, target
        self.eval_every, self.max_examples = eval_every, max_examples
        self.steps = self.examples = 0
        self.seconds = 0.0
        self.next_eval = eval_every
        self.loss = math.nan

    def after_step(self, n: int, seconds: float = 0.0) -> bool:
        """Count a step of ``n`` samples (``seconds`` of training); True when training
        should stop."""
        self.steps += 1
        self.examples += n
        self.seconds += seconds
        if self.examples >= self.next_eval:
            self.next_eval += self.eval_every
            self.loss = self.evaluate()
            if self.loss <= self.target or not math.isfinite(self.loss):
                return True
        return self.examples >= self.max_examples

    @property
    def reached(self) -> bool:
        return math.isfinite(self.loss) and self.loss <= self.target
