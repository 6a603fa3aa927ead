"""Pieces of the ``online`` study (:mod:`gradnoise.studies.online`, whose docstring
describes them): the drifting stream, the methods and the draws that measure the noise
of their next update, and the test accuracy per class group."""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, List, Optional, Tuple

import numpy as np
import torch

from .optimizers import noise_to_signal
from .task import Task

if TYPE_CHECKING:  # the config lives with the study, which imports this module
    from .online import OnlineConfig


# ------------------------------------------------------------------------------ data
def split(y: torch.Tensor, classes: List[int], fraction: float, gen: torch.Generator
          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(train, test)`` index tensors, ``fraction`` of each class (at least one, never
    all) held out for the test."""
    train, test = [], []
    for c in classes:
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = min(max(1, round(fraction * len(idx))), len(idx) - 1)
        test.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train), torch.cat(test)


def groups_of(classes: List[int], phases: int) -> List[List[int]]:
    """The classes cut into ``phases`` groups of consecutive classes (sizes differ by ≤ 1)."""
    return [list(map(int, g)) for g in np.array_split(np.array(classes), phases)]


def stream(y: torch.Tensor, train: torch.Tensor, classes: List[int], groups: List[List[int]],
           cfg: OnlineConfig, gen: torch.Generator) -> torch.Tensor:
    """``[P·phase_samples]`` sample indices of the drifting stream (module docstring)."""
    pools = {c: train[y[train] == c] for c in classes}
    out = []
    for g in groups:
        inside = torch.tensor([c in g for c in classes])
        probs = torch.where(inside, cfg.focus / len(g), (1 - cfg.focus) / max(1, len(classes) - len(g)))
        drawn = torch.multinomial(probs, cfg.phase_samples, replacement=True, generator=gen)
        for k in drawn.tolist():
            pool = pools[classes[k]]
            out.append(int(pool[torch.randint(len(pool), (1,), generator=gen)]))
    return torch.tensor(out)


# --------------------------------------------------------------------------- methods
def lr_of(key: str, cfg: OnlineConfig) -> float:
    """The learning rate of method ``key``."""
    if key == "sgdb":
        return cfg.minibatch_lr if cfg.minibatch_lr is not None else cfg.minibatch * cfg.sgd_lr
    return cfg.adam_lr if key == "adam" else cfg.sgd_lr


class Method:
    """One method's optimizer and the weights it is evaluated at."""

    def __init__(self, key: str, task: Task, cfg: OnlineConfig):
        self.key = key
        self.model = task.fresh_model()
        self.batch = cfg.minibatch if key == "sgdb" else 1
        self.lr = lr_of(key, cfg)
        params = self.model.parameters()
        self.make = (lambda p: torch.optim.Adam(p, lr=self.lr)) if key == "adam" else \
            (lambda p: torch.optim.SGD(p, lr=self.lr))
        self.opt = self.make(params)
        self.average = copy.deepcopy(self.model) if key == "avg" else None
        self.averaged = 0
        self.steps = 0

    @property
    def evaluated(self):
        return self.average if self.average is not None else self.model

    def update(self, task: Task, idx: torch.Tensor, x=None, y=None) -> None:
        """One step on the samples ``idx`` of ``x``, ``y`` (default: the task's)."""
        x, y = (task.x, task.y) if x is None else (x, y)
        self.opt.zero_grad(set_to_none=True)
        task.loss_fn(self.model(x[idx]), y[idx]).backward()
        self.opt.step()
        self.steps += 1
        if self.average is not None:  # θ̄_n = θ̄_{n−1} + (θ_n − θ̄_{n−1})/n
            self.averaged += 1
            with torch.no_grad():
                torch._foreach_lerp_(list(self.average.parameters()), list(self.model.parameters()),
                                     1.0 / self.averaged)


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def _saved(m: Method) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``(tensor, copy)`` of every tensor a step of ``m`` changes in place: the iterate,
    every tensor of the optimizer's per-parameter state, and the average's weights."""
    live = list(m.model.parameters())
    live += [v for st in m.opt.state.values() for v in st.values() if torch.is_tensor(v)]
    if m.average is not None:
        live += list(m.average.parameters())
    return [(t, t.detach().clone()) for t in live]


def _restore(m: Method, saved, state_keys, steps: int, averaged: int) -> None:
    """Put back what :func:`_saved` copied, the counters, and the optimizer's state
    entries as they were (a step from an empty state creates new ones)."""
    with torch.no_grad():
        for t, t0 in saved:
            t.copy_(t0)
    for p in list(m.opt.state):
        if p not in state_keys:
            del m.opt.state[p]
        else:
            for k in [k for k in m.opt.state[p] if k not in state_keys[p]]:
                del m.opt.state[p][k]
    m.steps, m.averaged = steps, averaged


def update_draws(m: Method, task: Task, xs: torch.Tensor, ys: torch.Tensor) -> Tuple[float, float]:
    """``(noise, signal)`` of the update ``u`` of the evaluated weights over one B = 1 step
    of ``m`` (its own optimizer, its own average) from the current state, once for each
    window sample ``(xs[i], ys[i])``: ``noise = tr Cov(u)`` (unbiased over the ``n ≥ 2``
    draws), ``signal = |ū|² − noise/n``. Everything a step changes (weights, optimizer
    state, the average and its count) is put back after each draw, so every draw starts
    from the same state, and ``.grad`` is put back at the end: the run goes on exactly as
    without the draws."""
    if len(ys) < 2:
        raise ValueError(f"the update noise needs at least 2 window samples, got {len(ys)}")
    saved, steps, averaged = _saved(m), m.steps, m.averaged
    state_keys = {p: set(st) for p, st in m.opt.state.items()}
    grads = [p.grad for p in m.model.parameters()]
    before = _flat(m.evaluated)
    u = []
    try:
        for i in range(len(ys)):
            try:
                m.update(task, torch.tensor([i]), xs, ys)
                u.append((_flat(m.evaluated) - before).numpy())
            finally:
                _restore(m, saved, state_keys, steps, averaged)
    finally:
        for p, g in zip(m.model.parameters(), grads):
            p.grad = g
    noise, signal, _ = noise_to_signal(np.stack(u))
    return noise, signal


@torch.no_grad()
def accuracies(model, task: Task, test: torch.Tensor, groups: List[List[int]]) -> List[Optional[float]]:
    """Test accuracy on each group's classes (None for a group without test samples),
    the model in eval mode (then put back in the mode it was in)."""
    y = task.y[test]
    was_training = model.training
    model.eval()
    try:
        right = model(task.x[test]).argmax(1) == y
    finally:
        model.train(was_training)
    out = []
    for g in groups:
        mask = torch.isin(y, torch.tensor(g, dtype=y.dtype))
        out.append(float(right[mask].double().mean()) if mask.any() else None)
    return out


__all__ = ["Method", "accuracies", "groups_of", "lr_of", "split", "stream", "update_draws"]
