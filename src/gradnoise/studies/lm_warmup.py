"""The ``lm`` study's second part: a batch-size warm-up driven by the measured noise
against fixed batches, each to a target held-out loss.

From the same initial weights and AdamW at the same rate ``adam_lr``:

* ``fixed small`` — batch ``base_batch`` throughout;
* ``fixed large`` — batch ``large_batch`` throughout;
* ``noise-driven warm-up`` — :class:`gradnoise.control.AdaptiveBatchSampler` starting
  at ``base_batch`` and moving every ``adjust_every`` steps to the measured
  ``B_simple`` (rule ``c*b_simple``, ``c = 1``, within ``[base_batch, max_batch]``),
  the rate left alone (as in the warm-ups of Merrill et al. 2025). It pays for its
  own measurement: the monitor's cost is inside its time.

Each run stops when the held-out loss, taken every ``eval_every_examples`` sequences,
is at or below ``target_loss`` (or after ``max_examples``). Steps, tokens (sequences ×
``T``) and seconds (training only, the evaluations left out) are means with 95 %
t-intervals over the seeds that reached the target; a miss is counted, not averaged.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, List

import torch
from torch.utils.data import DataLoader, TensorDataset

from ..control import AdaptiveBatchSampler
from ..monitor import NoiseMonitor
from ..stats.intervals import mean_interval
from .output import num
from .task import Task
from .training import ToTarget, batches

METHODS = ("fixed small", "fixed large", "noise-driven warm-up")


def _timed_step(model, opt, task: Task, parts) -> float:
    """One AdamW step on ``parts`` (``[(indices, weight)]``); returns its seconds."""
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    for idx, weight in parts:
        (task.loss_fn(model(task.x[idx]), task.y[idx]) * weight).backward()
    return time.perf_counter() - t0


def _fixed(task: Task, cfg, b: int, train, seed: int, run: ToTarget, model) -> Dict[str, Any]:
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.adam_lr)
    it = batches(len(train), b, torch.Generator().manual_seed(seed))
    while True:
        seconds = _timed_step(model, opt, task, [(train[next(it)], 1.0)])
        t0 = time.perf_counter()
        opt.step()
        if run.after_step(b, seconds + time.perf_counter() - t0):
            return {"final_batch": b}


def _warm(task: Task, cfg, train, seed: int, run: ToTarget, model) -> Dict[str, Any]:
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.adam_lr)
    sizes: List[int] = []
    with NoiseMonitor(model, source="per_sample", every=cfg.every, beta=cfg.beta) as monitor:
        sampler = AdaptiveBatchSampler(len(train), monitor=monitor, base_batch_size=cfg.base_batch,
                                       rule="c*b_simple", min_batch=cfg.base_batch, max_batch=cfg.max_batch,
                                       adjust_every=cfg.adjust_every, seed=seed, drop_last=True)
        loader = DataLoader(TensorDataset(torch.arange(len(train))), batch_sampler=sampler)
        for epoch in range(10 ** 6):
            sampler.set_epoch(epoch)
            for step in sampler.steps(loader):
                parts = [(train[idx], weight) for (idx,), weight in step]
                seconds = _timed_step(model, opt, task, parts)
                t0 = time.perf_counter()
                monitor.step()
                opt.step()
                n = sum(len(idx) for idx, _ in parts)
                sizes.append(n)
                if run.after_step(n, seconds + time.perf_counter() - t0):
                    return {"final_batch": n, "batch_sizes": sizes[:: max(1, len(sizes) // 200)]}
    raise AssertionError("unreachable")


def warmup(task: Task, cfg, train, test, seed: int, w, progress, evaluate: Callable) -> Dict[str, Any]:
    """Run every method over ``cfg.seeds`` seeds; writes a ``run`` line per run; returns
    ``{method: {reached, runs, steps, tokens, seconds}}`` (module docstring)."""
    tokens_per = int(task.y[0].numel())
    rows: Dict[str, List[Dict[str, Any]]] = {m: [] for m in cfg.methods}
    for r in range(cfg.seeds):
        for method in cfg.methods:
            torch.manual_seed(seed + r)
            model = task.fresh_model()
            run = ToTarget(lambda: evaluate(model), cfg.target_loss, cfg.eval_every_examples, cfg.max_examples)
            if method == "noise-driven warm-up":
                extra = _warm(task, cfg, train, seed + r, run, model)
            else:
                b = cfg.base_batch if method == "fixed small" else cfg.large_batch
                extra = _fixed(task, cfg, b, train, seed + r, run, model)
            row = {"method": method, "seed": seed + r, "reached": run.reached, "steps": run.steps,
                   "examples": run.examples, "tokens": run.examples * tokens_per, "seconds": run.seconds,
                   "final_loss": num(run.loss), **extra}
            w.write("run", **row)
            rows[method].append(row)
            progress.update(1)
    out = {}
    for method, runs in rows.items():
        ok = [r for r in runs if r["reached"]]
        out[method] = {"reached": len(ok), "runs": len(runs),
                       **{k: mean_interval([float(r[k]) for r in ok], lower=0.0)
                          for k in ("steps", "tokens", "seconds")}}
    return out
