"""``gradnoise.probe``: the critical batch size measured on the user's model by branching,
and the noise scale it is usually estimated by, calibrated against it.

From the current weights *and optimizer state*, short branches of training run at several
batch sizes around the current one (``base_batch`` × ½ … 16 by default), each with the
learning-rate rule of its optimizer — the square root of the batch ratio for Adam-type
optimizers, linear for SGD — on fresh batches, ``seeds`` times each; every branch may use
the same ``budget`` of samples (at least ``MIN_STEPS`` steps). Their held-out loss curves
give two readings (:mod:`gradnoise.stats.branches`): McCandlish's ``B_noise`` from the
steps to a common target, and Merrill's largest batch whose loss after the budget stays
within a tolerance of the best. At the same weights, the noise scale ``B_simple`` (raw and,
for Adam-type optimizers, of the update direction, :mod:`gradnoise.monitor.precond`) is
measured exactly on ``proxy_batches`` batches of ``base_batch`` and related to the
branch-measured value, each with its interval.

Under ``torch.distributed`` every rank runs its share of the branches (``i mod world``) on
its own device and all ranks get every result (``all_gather_object``); on one process
they run one after another with a progress bar. The result is the ``gradnoise-probe``
document (:mod:`gradnoise.formats`), the parent model, optimizer and random generators
left as they were.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy.stats import t as student_t
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..capture import Capture
from ..formats import PROBE_FORMAT, PROBE_VERSION
from ..monitor import precond
from ..stats import branches as fits
from ..stats.smoothing import fieller
from .branch import BranchSpec, Data, LossFn, held_out_loss, run_branch

FACTORS = (0.5, 1, 2, 4, 8, 16)   # default batch sizes, times the base batch
MIN_STEPS = 4
DEFAULT_BUDGET_STEPS = 64         # the default budget: this many steps of the base batch


def lr_rule_for(optimizer, lr_rule: str = "auto") -> str:
    """The branches' learning-rate rule: ``"auto"`` is ``"sqrt"`` for an Adam-type
    optimizer, ``"linear"`` otherwise."""
    if lr_rule == "auto":
        return "sqrt" if precond.family(optimizer) == "adam" else "linear"
    if lr_rule not in ("sqrt", "linear"):
        raise ValueError(f"lr_rule must be 'auto', 'sqrt' or 'linear', got {lr_rule!r}")
    return lr_rule


def plan(base_batch: int, n: int, batch_sizes: Optional[Sequence[int]], budget: Optional[int], seeds: int,
         rule: str, seed: int, lr_grid: Sequence[float] = (1.0,)) -> Tuple[List[BranchSpec], int]:
    """The branches (the base batch size's first) and the sample budget; ``ValueError``
    (one line) on batch sizes the data cannot fill, a budget smaller than the largest
    batch, or fewer than two seeds.

    A branch at ``B`` may take ``1.5·budget/min(B, base_batch)`` steps: as many examples as
    the base batch's budget below it, as many steps above it (by the law, a larger batch
    needs no more steps and a smaller one no more examples to the same loss), with a
    margin; it stops at its target once past the budget."""
    if not (isinstance(base_batch, int) and base_batch >= 1):
        raise ValueError(f"base_batch must be a positive int, got {base_batch!r}")
    sizes = sorted({max(1, int(base_batch * f)) for f in FACTORS} if batch_sizes is None else
                   {int(b) for b in batch_sizes} | {base_batch})
    if len(sizes) < 3 or sizes[0] < 1:
        raise ValueError(f"the probe needs at least 3 distinct positive batch sizes, got {sizes}")
    if sizes[-1] > n:
        raise ValueError(f"batch size {sizes[-1]} is larger than the {n} training samples: the data cannot fill it")
    budget = int(budget if budget is not None else base_batch * DEFAULT_BUDGET_STEPS)
    if budget < sizes[-1]:
        raise ValueError(f"a budget of {budget} samples is smaller than the largest batch {sizes[-1]}")
    if not (isinstance(seeds, int) and seeds >= 2):
        raise ValueError(f"seeds must be an int ≥ 2 (intervals need repeats), got {seeds!r}")
    if not lr_grid or any(not (m > 0 and math.isfinite(m)) for m in lr_grid):
        raise ValueError(f"lr_grid must hold positive multipliers, got {list(lr_grid)}")
    grid = sorted(set(float(m) for m in lr_grid) | {1.0})
    specs = []
    for b in sorted(sizes, key=lambda b: b != base_batch):
        ratio = b / base_batch
        factor = math.sqrt(ratio) if rule == "sqrt" else ratio
        steps = max(MIN_STEPS, math.ceil(1.5 * budget / min(b, base_batch)))
        for m in sorted(grid, key=lambda m: m != 1.0):
            for s in range(seeds):
                specs.append(BranchSpec(b, (seed + 1) * 1_000_003 + b * 1009 + s, factor * m, steps, budget=budget,
                                        multiplier=m))
    return specs, budget


def _run(specs: Sequence[Tuple[int, BranchSpec]], model, optimizer, train, held_out, loss_fn, quiet: bool,
         group, world: int, rank: int, evals: int, start: float) -> Dict[int, Any]:
    """Run this rank's share of ``(index, spec)`` and gather everyone's results.

    A branch that raises on one rank fails every rank, each at the gather (the others
    would otherwise wait there for it until the collective's timeout): the rank that
    raised re-raises its error, the others a one-line ``RuntimeError`` naming it."""
    mine = [(i, s) for k, (i, s) in enumerate(specs) if k % world == rank]
    done = {}
    error: Optional[BaseException] = None
    with tqdm(total=len(mine), desc="probe branches", disable=quiet or not sys.stderr.isatty(), leave=False,
              file=sys.stderr) as progress:
        try:
            for i, spec in mine:
                done[i] = run_branch(spec, model, optimizer, train, held_out, loss_fn, evals, start)
                progress.update(1)
        except Exception as e:  # noqa: BLE001 - every rank must still reach the gather
            if world == 1:
                raise
            error = e
    if world > 1:
        parts: List[Any] = [None] * world
        mine_out = (done, None if error is None else f"{type(error).__name__}: {error}".splitlines()[0])
        dist.all_gather_object(parts, mine_out, group=group)
        if error is not None:
            raise error
        failed = [(r, msg) for r, (_, msg) in enumerate(parts) if msg is not None]
        if failed:
            raise RuntimeError(f"a probe branch failed on rank {failed[0][0]} ({failed[0][1]})")
        done = {i: r for part, _ in parts for i, r in part.items()}
    return done


def _proxy(model: nn.Module, optimizer, train: Data, loss_fn: LossFn, base_batch: int, batches: int,
           seed: int) -> Dict[str, Any]:
    """``B_simple`` (and the preconditioned one) at the checkpoint from ``batches``
    batches: the mean of each batch's unbiased ``tr(Σ)`` and ``|G|²``, Fieller's interval
    for their ratio. Gradients are computed on a copy; the parent's stay as they were."""
    twin = copy.deepcopy(model).train()  # the same parameter names as the parent's
    weights = {}
    if precond.family(optimizer) == "adam":
        weights = precond.Preconditioner(optimizer, {p: n for n, p in model.named_parameters()}).by_name()
    x, y = train
    rows, rows_w = [], []
    with torch.random.fork_rng(devices=[x.device.index or 0] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)  # dropout: the same masks whatever the caller's generator (and on every rank)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(batches):
            idx = torch.randperm(len(x), generator=gen)[:base_batch].to(x.device)
            with Capture(twin) as cap:
                loss_fn(twin(x[idx]), y[idx]).backward()
            st = cap.stats()
            twin.zero_grad(set_to_none=True)
            rows.append((st.trace_cov, st.grad_sq_norm))
            if weights:
                rows_w.append(precond.weighted(st.by_param, weights))
    out = {"batches": batches}
    out["b_simple"], out["b_simple_interval"] = _ratio(rows)
    out["preconditioned"], out["preconditioned_interval"] = _ratio(rows_w) if rows_w else (None, [None, None])
    return out


def _ratio(rows: List[Tuple[float, float]]) -> Tuple[Optional[float], List[float]]:
    """Mean ``tr(Σ)`` over mean ``|G|²`` of independent batches, with Fieller's interval
    (Student's ``t`` quantile for the few batches, not the normal one)."""
    t, g = (np.array(v, dtype=float) for v in zip(*rows))
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(g))) or len(t) < 2:
        return None, [None, None]
    mt, mg = float(t.mean()), float(g.mean())
    c = np.cov(t, g) / len(t)
    lo, hi = fieller(mt, mg, float(c[0, 0]), float(c[1, 1]), float(c[0, 1]), float(student_t.ppf(0.975, len(t) - 1)))
    return (mt / mg if mg > 0 else None), [lo, hi]


def probe(model: nn.Module, optimizer: torch.optim.Optimizer, train: Data, loss_fn: LossFn, *, held_out: Data,
          base_batch: int, batch_sizes: Optional[Sequence[int]] = None, budget: Optional[int] = None,
          seeds: int = 3, lr_rule: str = "auto", lr_grid: Sequence[float] = (1.0,), tolerance: float = 0.05,
          target_fraction: float = 0.8, evals: int = 16,
          proxy_batches: int = 8, seed: int = 0,
          step: Optional[int] = None, task: Optional[str] = None, quiet: bool = False,
          process_group=None) -> Dict[str, Any]:
    """Branch from the current weights and optimizer state; measure the critical batch.

    Args:
        model, optimizer: the parent (read only: branches train copies).
        train: ``(x, y)`` samples the branches draw fresh batches from.
        loss_fn: ``loss_fn(model(x_b), y_b)``, the batch mean.
        held_out: ``(x, y)`` the branches' loss is measured on.
        base_batch: the batch size the parent trains with (its learning rate's).
        batch_sizes: the branches' batch sizes (default ``base_batch`` × ``FACTORS``).
        budget: samples each branch may use (default ``64 · base_batch``).
        seeds: branches per batch size (≥ 2).
        lr_rule: ``"auto"`` (``"sqrt"`` for Adam-type optimizers, ``"linear"`` otherwise).
        lr_grid: multipliers of the rule's learning rate tried at every batch size (1
            always among them); each reading takes, per batch size, the multiplier that
            did best by it (McCandlish's law assumes a well-tuned rate at every size).
        tolerance: Merrill's tolerance, a fraction of the loss drop to the best.
        target_fraction: McCandlish's target, this fraction of the way from the
            checkpoint's loss to where the base batch gets on the budget (smaller: a
            reading closer to the checkpoint, from fewer steps).
        evals: held-out evaluations along each branch (about; its cost is most of a
            small model's probe).
        proxy_batches: batches of ``base_batch`` for the noise scale at the checkpoint.
        step, task: the checkpoint's step and a name, recorded.
        process_group: ranks to split the branches over (default: the world where
            ``torch.distributed`` is initialised).

    Returns:
        The ``gradnoise-probe`` document (:mod:`gradnoise.formats`; write it with
        :func:`gradnoise.formats.write_probe`).
    """
    t0 = time.perf_counter()
    rule = lr_rule_for(optimizer, lr_rule)
    specs, budget = plan(base_batch, len(train[0]), batch_sizes, budget, seeds, rule, seed, lr_grid)
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be in (0, 1), got {tolerance!r}")
    for name, v in (("evals", evals), ("proxy_batches", proxy_batches)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "evals" else 2):
            raise ValueError(f"{name} must be an int ≥ {1 if name == 'evals' else 2}, got {v!r}")
    if not 0 < target_fraction <= 1:
        raise ValueError(f"target_fraction must be in (0, 1], got {target_fraction!r}")
    # the noise scale first: cheap, and a model the per-sample engine refuses fails before any branch
    proxy = _proxy(model, optimizer, train, loss_fn, base_batch, proxy_batches, seed)
    start = held_out_loss(model, held_out, loss_fn)
    rank, world = 0, 1
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)
    args = (model, optimizer, train, held_out, loss_fn, quiet, process_group, world, rank, evals, start)
    base = [(i, s) for i, s in enumerate(specs) if s.batch_size == base_batch and s.multiplier == 1.0]
    done = _run(base, *args)  # the base batch first: its progress on the budget sets the target
    target = fits.common_target(start, [fits.loss_at(done[i][0], budget) for i, _ in base], target_fraction)
    first = {i for i, _ in base}
    rest = [(i, dataclasses.replace(s, target=target)) for i, s in enumerate(specs) if i not in first]
    done.update(_run(rest, *args))
    lr = precond.current_lr(optimizer)
    doc = _readings(specs, done, start, target, budget, tolerance, seed, lr)
    doc["proxy"] = {**proxy, **_ratios(doc["mccandlish"], proxy)}
    return {"format": PROBE_FORMAT, "version": PROBE_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "task": task or type(model).__name__, "checkpoint": {"step": step, "loss": start},
            "optimizer": precond.describe(optimizer), "base_batch": base_batch, "lr": lr, "lr_rule": rule,
            "lr_grid": sorted({s.multiplier for s in specs}),
            "budget": budget, "batch_sizes": sorted({s.batch_size for s in specs}), "seeds": seeds,
            **doc, "seconds": time.perf_counter() - t0}


def _readings(specs: List[BranchSpec], done, start: float, target: float, budget: int, tolerance: float,
              seed: int, lr0: Optional[float]) -> Dict[str, Any]:
    """The branches' records and both readings, each from the best learning-rate
    multiplier of every batch size (by its median steps to the target, or loss at the
    budget)."""
    rows, steps, at_budget = [], {}, {}
    for i, s in enumerate(specs):
        curve, diverged = done[i]
        hit = fits.crossing(curve, target) if math.isfinite(target) else None
        loss_b = fits.loss_at(curve, budget)
        rows.append({"batch_size": s.batch_size, "seed": s.seed, "lr_multiplier": s.multiplier,
                     "lr": lr0 * s.lr_factor if lr0 is not None else None, "steps": s.steps, "diverged": diverged,
                     "curve": curve, "steps_to_target": hit[0] if hit else None,
                     "examples_to_target": hit[1] if hit else None, "loss_at_budget": loss_b})
        steps.setdefault(s.batch_size, {}).setdefault(s.multiplier, []).append(hit[0] if hit else math.inf)
        at_budget.setdefault(s.batch_size, {}).setdefault(s.multiplier, []).append(
            loss_b if math.isfinite(loss_b) else math.inf)  # diverged: worst, for the choice of multiplier too
    best_steps = {b: _best(by_m) for b, by_m in steps.items()}
    best_loss = {b: _best(by_m) for b, by_m in at_budget.items()}
    mc = fits.mccandlish({b: v for b, (_, v) in best_steps.items()}, seed=seed) if math.isfinite(target) else {
        "b_noise": None, "interval": [None, None], "s_min": None, "e_min": None, "points": [],
        "reason": f"the base batch's branches did not lower the held-out loss within {budget} samples: raise "
                  f"--budget (e.g. to {4 * budget})"}
    mc["multipliers"] = [[b, m] for b, (m, _) in sorted(best_steps.items())]
    merrill = fits.largest_within(start, {b: v for b, (_, v) in best_loss.items()}, tolerance, seed=seed)
    merrill["multipliers"] = [[b, m] for b, (m, _) in sorted(best_loss.items())]
    return {"branches": rows, "target_loss": target, "mccandlish": mc, "merrill": merrill}


def _best(by_multiplier: Dict[float, List[float]]) -> Tuple[float, List[float]]:
    """``(multiplier, values)`` of the multiplier with the least median value."""
    return min(by_multiplier.items(), key=lambda kv: (float(np.median(kv[1])), abs(math.log(kv[0]))))


def _ratios(mc: Dict[str, Any], proxy: Dict[str, Any]) -> Dict[str, Any]:
    """The branch-measured ``B_noise`` over each proxy, with a conservative interval."""
    out: Dict[str, Any] = {}
    for key, name in (("b_simple", "ratio"), ("preconditioned", "preconditioned_ratio")):
        v, b = proxy.get(key), mc.get("b_noise")
        out[name] = b / v if v and b is not None else None
        out[f"{name}_interval"] = (fits.ratio_interval(mc["interval"], proxy[f"{key}_interval"])
                                   if out[name] is not None else [None, None])
    return out


__all__ = ["FACTORS", "lr_rule_for", "plan", "probe"]
