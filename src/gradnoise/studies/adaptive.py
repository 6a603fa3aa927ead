"""Study ``adaptive``: what letting the measured noise drive training buys, to a target
loss.

From the same weights, each method trains until the full-data loss reaches
``target_loss`` (or gives up after ``max_examples`` samples), over several seeds (the
order of the batches):

* ``fixed small`` — SGD at the base batch ``B₀`` and its learning rate ``ε₀``;
* ``fixed large`` — SGD at ``large_batch``, the same ``ε₀`` (no scaling: what a large
  batch buys without a rule);
* ``AdaScale`` — SGD at ``large_batch`` with :class:`gradnoise.control.AdaScale`: the
  rate ``ε₀·r`` with the gain ``r = (trΣ/B₀ + |G|²)/(trΣ/B + |G|²)`` from the monitor;
* ``adaptive batch`` — :class:`gradnoise.control.AdaptiveBatchSampler` starting at ``B₀``,
  the batch following ``B_simple`` (``c = 1``), the rate by the AdaScale rule;
* ``Adam fixed large`` and ``Adam + AdaScale (√ gain)`` — the same two under Adam, the
  second with AdaScale's preconditioned, square-root variant (an approximation).

For each: optimizer steps, examples (samples drawn) and wall time to the target, mean
with a 95 % t-interval over seeds; a method that misses the target in a seed is counted
as not reaching it (its numbers are left out, the count said). Published anchors: batch
warm-up from the measured critical batch size saved 43 % of the steps on OLMo 1B
(Merrill et al. 2025); a GNS-guided batch schedule 18 % of the training time (Gray et al.
2024). A tiny digits model is not such a run: the study reports what it sees here.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch.utils.data import DataLoader, TensorDataset

from ..control import AdaptiveBatchSampler, AdaScale
from ..monitor import NoiseMonitor
from ..stats.intervals import mean_interval
from .output import StudyWriter, num
from .progress import bar
from .task import Task
from .training import ToTarget, batches, full_loss

METHODS = ("fixed small", "fixed large", "AdaScale", "adaptive batch", "Adam fixed large", "Adam + AdaScale (√ gain)")


@dataclass
class AdaptiveConfig:
    methods: List[str] = field(default_factory=lambda: list(METHODS))
    base_batch: int = 16
    large_batch: int = 256
    max_batch: int = 512
    base_lr: float = 0.2          # SGD at the base batch
    adam_lr: float = 1e-3
    target_loss: float = 0.3
    max_examples: int = 200_000
    eval_every_examples: int = 160
    every: int = 2                # the monitor measures every k-th step
    adjust_every: int = 10        # the adaptive sampler's adjustment points (steps)
    seeds: int = 3

    @classmethod
    def for_size(cls, size: str) -> "AdaptiveConfig":
        if size == "tiny":
            return cls(large_batch=64, max_batch=128, target_loss=1.8, max_examples=8000, seeds=2)
        return cls()


def _to_target(task: Task, model, cfg: AdaptiveConfig) -> ToTarget:
    return ToTarget(lambda: full_loss(model, task), cfg.target_loss, cfg.eval_every_examples, cfg.max_examples)


def _backward(model, task: Task, idx, weight: float = 1.0) -> None:
    (task.loss_fn(model(task.x[idx]), task.y[idx]) * weight).backward()


def _fixed(task: Task, cfg: AdaptiveConfig, b: int, seed: int, adam: bool, scale: bool) -> ToTarget:
    """SGD or Adam at a fixed batch ``b``, with or without AdaScale."""
    model = task.fresh_model()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.adam_lr) if adam else \
        torch.optim.SGD(model.parameters(), lr=cfg.base_lr)
    monitor = NoiseMonitor(model, source="per_sample", every=cfg.every) if scale else None
    ada = AdaScale(opt, monitor, base_batch_size=cfg.base_batch, batch_size=b,
                   mode="adam-sqrt" if adam else "sgd") if scale else None
    run = _to_target(task, model, cfg)
    it = batches(task.size, b, torch.Generator().manual_seed(seed))
    try:
        while True:
            opt.zero_grad(set_to_none=True)
            _backward(model, task, next(it))
            if ada is not None:
                monitor.step()
                ada.step()
            else:
                opt.step()
            if run.after_step(b):
                break
    finally:
        if monitor is not None:
            monitor.close()
    run.extra = {"progress": ada.progress if ada is not None else None}
    return run


def _adaptive(task: Task, cfg: AdaptiveConfig, seed: int) -> ToTarget:
    """SGD with the noise-driven batch size and the AdaScale learning-rate rule."""
    model = task.fresh_model()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.base_lr)
    monitor = NoiseMonitor(model, source="per_sample", every=cfg.every)
    sampler = AdaptiveBatchSampler(task.size, monitor=monitor, base_batch_size=cfg.base_batch, rule="c*b_simple",
                                   min_batch=cfg.base_batch, max_batch=min(cfg.max_batch, task.size // 2),
                                   adjust_every=cfg.adjust_every, optimizer=opt, lr_rule="adascale", seed=seed,
                                   drop_last=True)
    loader = DataLoader(TensorDataset(torch.arange(task.size)), batch_sampler=sampler)
    run, sizes = _to_target(task, model, cfg), []
    try:
        for epoch in range(10 ** 6):
            sampler.set_epoch(epoch)
            done = False
            for step in sampler.steps(loader):
                opt.zero_grad(set_to_none=True)
                n = 0
                for (idx,), weight in step:
                    _backward(model, task, idx, weight)
                    n += len(idx)
                monitor.step()
                opt.step()
                sizes.append(n)
                if run.after_step(n):
                    done = True
                    break
            if done:
                break
    finally:
        monitor.close()
    run.extra = {"batch_sizes": sizes[:: max(1, len(sizes) // 200)], "final_batch": sizes[-1] if sizes else None}
    return run


def _one(method: str, task: Task, cfg: AdaptiveConfig, seed: int) -> ToTarget:
    large = min(cfg.large_batch, task.size // 2)
    if method == "fixed small":
        return _fixed(task, cfg, cfg.base_batch, seed, adam=False, scale=False)
    if method == "fixed large":
        return _fixed(task, cfg, large, seed, adam=False, scale=False)
    if method == "AdaScale":
        return _fixed(task, cfg, large, seed, adam=False, scale=True)
    if method == "adaptive batch":
        return _adaptive(task, cfg, seed)
    if method == "Adam fixed large":
        return _fixed(task, cfg, large, seed, adam=True, scale=False)
    return _fixed(task, cfg, large, seed, adam=True, scale=True)


def run(task: Task, out, seed: int = 0, size: str = "default", quiet: bool = False,
        config: AdaptiveConfig = None) -> dict:
    """Run the study; writes ``adaptive-<task>.jsonl``; returns the summary."""
    cfg = config or AdaptiveConfig.for_size(size)
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if cfg.base_batch > task.size // 2:
        raise ValueError(f"the base batch {cfg.base_batch} is more than half the task's {task.size} samples")
    initial = full_loss(task.fresh_model(), task)
    if not initial > cfg.target_loss:
        raise ValueError(f"the initial loss {initial:.4g} is already at or below the target {cfg.target_loss:g}")
    rows: Dict[str, List[Dict[str, Any]]] = {m: [] for m in cfg.methods}
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # pay torch's one-off optimizer import untimed
    with StudyWriter(out, "adaptive", task.name, seed, size, asdict(cfg)) as w, \
            bar(len(cfg.methods) * cfg.seeds, f"adaptive {task.name}", quiet) as progress:
        for r in range(cfg.seeds):
            for method in cfg.methods:
                t0 = time.perf_counter()
                res = _one(method, task, cfg, seed + r)
                row = {"method": method, "seed": seed + r, "reached": res.reached, "steps": res.steps,
                       "examples": res.examples, "seconds": time.perf_counter() - t0,
                       "final_loss": num(res.loss), **res.extra}
                w.write("run", **row)
                rows[method].append(row)
                progress.update(1)
        summary = _summary(rows, cfg)
        w.write("summary", **summary)
    return summary


def _summary(rows: Dict[str, List[Dict[str, Any]]], cfg: AdaptiveConfig) -> dict:
    methods = {}
    for m, runs in rows.items():
        ok = [r for r in runs if r["reached"]]
        methods[m] = {"reached": len(ok), "runs": len(runs),
                      **{k: mean_interval([float(r[k]) for r in ok], lower=0.0)
                         for k in ("steps", "examples", "seconds")}}
    base: Optional[Dict[str, Any]] = methods.get("fixed small")
    for m, s in methods.items():  # steps saved against the fixed small batch
        a, b = (s["steps"]["mean"], base["steps"]["mean"]) if base else (None, None)
        s["steps_vs_small"] = a / b if a is not None and b else None
    return {"target_loss": cfg.target_loss, "base_batch": cfg.base_batch, "large_batch": cfg.large_batch,
            "methods": methods}
