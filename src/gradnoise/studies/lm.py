"""Study ``lm``: the gradient noise of a small language model over a run, and a batch-size
warm-up driven by it.

The task is ``pydoc-gpt`` (:mod:`gradnoise.studies.gpt`): byte-level next-token
prediction on the standard library's documentation topics in windows of ``T`` bytes,
a causal GPT with tied embeddings. The per-sample unit is the *sequence*: ``B_simple``
is in sequences, and ``B_simple · T`` is the same noise scale in tokens (DESIGN.md §1:
the per-token loss is the mean over a sequence's ``T`` tokens).

A seeded ``eval_windows`` of the windows is held out; the model trains on the rest.

1. **Trajectory.** AdamW at batch ``batch_size`` and rate ``adam_lr`` for ``steps`` steps,
   :class:`gradnoise.monitor.NoiseMonitor` (``per_sample``, every ``every`` steps,
   debiased EMAs of decay ``beta``) measuring the exact per-sequence noise. Every
   ``eval_every`` steps: the held-out loss, the smoothed ``B_simple`` with its 95 %
   interval — of the whole model, of every layer, and of the LayerNorm layers alone
   (their ``tr(Σ)`` and ``|G|²`` summed, smoothed the same way). Merrill et al. (2025)
   measure the critical batch size of OLMo runs near zero at initialisation, rising,
   then plateauing; Gray et al. (2024) find the noise scale of the LayerNorm parameters
   alone tracks the whole model's. The summary states both: the growth of ``B_simple``
   as the loss falls (Spearman's ρ of ``B_simple`` against the loss over the
   checkpoints), and the agreement of the LayerNorm scale with the total (their ratio's
   median and 10–90 % range, Spearman's ρ between them).
   At ``probes`` checkpoints spread over the run the **branch probe**
   (:func:`gradnoise.control.probe.probe`) measures the critical batch directly — short
   branches of training at ``probe_factors`` × the batch, ``probe_seeds`` each, on a budget
   of ``probe_budget_steps`` batches, evaluated on ``probe_eval_windows`` of the held-out
   sequences — beside the raw and the preconditioned (AdamW)
   ``B_simple`` at the same weights: does the cheap proxy track the measured critical
   batch as the loss falls, and by what factor (``calibration`` in the summary)?
2. **Warm-up to a target** (:mod:`gradnoise.studies.lm_warmup`): AdamW at a fixed small
   and a fixed large batch against a batch that follows the measured noise scale
   (:class:`gradnoise.control.AdaptiveBatchSampler`, ``B = B_simple``), each until the
   held-out loss reaches ``target_loss``: steps, tokens and wall time, over seeds.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from scipy.stats import spearmanr

from ..control.probe import plan, probe
from ..monitor import NoiseMonitor
from ..monitor import names as _names
from ..monitor.smoother import NoiseSmoother
from ..numbers import fmt_num, fmt_with_interval
from .lm_warmup import METHODS, warmup
from .output import StudyWriter, num
from .progress import bar
from .task import Task
from .training import batches

LN = "LayerNorm"


@dataclass
class LmConfig:
    batch_size: int = 32
    adam_lr: float = 3e-3         # AdamW, every part
    steps: int = 600
    every: int = 2                # the monitor measures every k-th step
    beta: float = 0.95
    eval_every: int = 25          # steps between checkpoints of the trajectory
    eval_windows: int = 256       # held-out sequences
    methods: List[str] = field(default_factory=lambda: list(METHODS))
    base_batch: int = 8           # warm-up: the fixed small batch and where the warm-up starts
    large_batch: int = 64
    max_batch: int = 128
    target_loss: float = 2.4
    max_examples: int = 40_000    # sequences per warm-up run before it gives up
    eval_every_examples: int = 256
    adjust_every: int = 10        # the warm-up's adjustment points (steps)
    seeds: int = 2
    probes: int = 3               # branch probes along the trajectory (0: none; at most one per checkpoint)
    probe_factors: List[float] = field(default_factory=lambda: [0.5, 1, 2, 4])  # times batch_size
    probe_seeds: int = 2
    probe_budget_steps: int = 16  # each branch's sample budget, in steps of batch_size
    probe_eval_windows: int = 128  # held-out sequences the branches are evaluated on (of eval_windows)
    probe_evals: int = 8          # evaluations along a branch

    @classmethod
    def for_size(cls, size: str) -> "LmConfig":
        if size == "tiny":
            return cls(batch_size=8, steps=24, eval_every=6, eval_windows=32, base_batch=4, large_batch=8,
                       max_batch=16, target_loss=4.5, max_examples=800, eval_every_examples=64, adjust_every=4,
                       probes=2, probe_budget_steps=4, probe_eval_windows=32)
        return cls()


def check(task: Task, cfg: LmConfig) -> None:
    """ValueError for a task or options the study cannot use."""
    if task.x.dim() != 2 or task.y.shape != task.x.shape or task.x.dtype.is_floating_point:
        raise ValueError(f"the lm study needs token ids x and next-token targets y of one shape [N, T]; task "
                         f"{task.name!r} has x {list(task.x.shape)} ({task.x.dtype}) and y {list(task.y.shape)}")
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    train = task.size - cfg.eval_windows
    for name in ("batch_size", "steps", "every", "eval_every", "eval_windows", "base_batch", "large_batch", "max_batch",
                 "max_examples", "eval_every_examples", "adjust_every", "seeds", "probe_seeds", "probe_budget_steps",
                 "probe_eval_windows", "probe_evals"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a whole number ≥ 1, got {v!r}")
    for name in ("adam_lr", "target_loss"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    if not 0.0 <= cfg.beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {cfg.beta}")
    if train < 2:
        raise ValueError(f"eval_windows ({cfg.eval_windows}) leaves {train} of the {task.size} sequences to train on")
    if max(cfg.batch_size, cfg.large_batch, cfg.max_batch) > train // 2:
        raise ValueError(f"the batches ({cfg.batch_size}, {cfg.large_batch}, {cfg.max_batch}) must be at most half "
                         f"the {train} training sequences")
    if cfg.every > cfg.eval_every:
        raise ValueError(f"every ({cfg.every}) must be at most eval_every ({cfg.eval_every}): a checkpoint needs "
                         "a measured step")
    if not cfg.base_batch <= cfg.large_batch <= cfg.max_batch:
        raise ValueError("base_batch ≤ large_batch ≤ max_batch is needed")
    if isinstance(cfg.probes, bool) or not isinstance(cfg.probes, int) or cfg.probes < 0:
        raise ValueError(f"probes must be a whole number ≥ 0, got {cfg.probes!r}")
    if cfg.probes:  # the probe's own checks, before any training
        plan(cfg.batch_size, train, probe_sizes(cfg), cfg.batch_size * cfg.probe_budget_steps, cfg.probe_seeds,
             "sqrt", 0)


def probe_sizes(cfg: LmConfig) -> List[int]:
    """The branch probe's batch sizes."""
    return sorted({max(1, int(cfg.batch_size * f)) for f in cfg.probe_factors})


def probe_steps(cfg: LmConfig) -> List[int]:
    """The checkpoints the branch probe runs at: ``probes`` of them spread over the run,
    the last at its end (each on a checkpoint step)."""
    n = cfg.steps // cfg.eval_every
    k = min(cfg.probes, n)
    return sorted({cfg.eval_every * max(1, round(n * (i + 1) / k)) for i in range(k)}) if k else []


def split(n: int, held_out: int, seed: int) -> tuple:
    """``(train, test)`` index tensors: a seeded ``held_out`` of ``range(n)`` for the test."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[held_out:], perm[:held_out]


@torch.no_grad()
def held_out_loss(model, task: Task, test: torch.Tensor, chunk: int = 128) -> float:
    """Mean token loss over the held-out sequences ``test``."""
    total = 0.0
    for i in range(0, len(test), chunk):
        idx = test[i:i + chunk]
        total += float(task.loss_fn(model(task.x[idx]), task.y[idx])) * len(idx)
    return total / len(test)


def _b(stats, interval) -> List[Optional[float]]:
    """``[B_simple, low, high]``: an undefined value is None; an unbounded end stays
    ``inf`` (written ``"inf"``: the interval is one-sided, not missing)."""
    return [num(stats.b_simple), float(interval[0]), float(interval[1])]


def trajectory(task: Task, cfg: LmConfig, train, test, seed: int, w: StudyWriter, progress) -> List[Dict[str, Any]]:
    """Part 1 (module docstring); writes ``noise`` lines (every measured step) and
    ``checkpoint`` lines; returns the checkpoints."""
    torch.manual_seed(seed)
    model = task.fresh_model()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.adam_lr)
    layers = _names.layers(model)
    ln_of = {p: LN for info in layers.values() if info["type"] == LN for p in info["params"]}
    ln = NoiseSmoother(cfg.beta, ln_of)
    tokens_per = int(task.y[0].numel())
    it = batches(len(train), cfg.batch_size, torch.Generator().manual_seed(seed))
    points, seconds, last, ln_stats = [], 0.0, None, None
    probe_at = set(probe_steps(cfg))
    with NoiseMonitor(model, source="per_sample", every=cfg.every, beta=cfg.beta, optimizer=opt) as monitor:
        for step in range(1, cfg.steps + 1):
            t0 = time.perf_counter()
            idx = train[next(it)]
            opt.zero_grad(set_to_none=True)
            loss = task.loss_fn(model(task.x[idx]), task.y[idx])
            loss.backward()
            rec = monitor.step(loss=loss)
            opt.step()
            seconds += time.perf_counter() - t0
            if rec is not None:
                if not rec.skipped:
                    ln.update(rec.raw)
                ln_stats = ln.layers(cfg.batch_size, cfg.batch_size).get(LN)
                w.write("noise", step=step, tokens=step * cfg.batch_size * tokens_per, train_loss=num(float(loss.detach())),
                        b_simple=_b(rec.smoothed, rec.b_simple_interval), raw_b_simple=num(rec.raw.b_simple),
                        trace_cov=num(rec.smoothed.trace_cov), grad_sq_norm=num(rec.smoothed.grad_sq_norm),
                        ln_b_simple=_b(*ln_stats) if ln_stats else [None] * 3, flag=rec.flag)
                last = rec
            if step % cfg.eval_every == 0 and last is not None:
                model.eval()
                point = {"step": step, "tokens": step * cfg.batch_size * tokens_per,
                         "loss": num(held_out_loss(model, task, test)), "seconds": seconds,
                         "b_simple": _b(last.smoothed, last.b_simple_interval),
                         "ln_b_simple": _b(*ln_stats) if ln_stats else [None] * 3,
                         "layers": {k: _b(v.smoothed, v.b_simple_interval) for k, v in last.by_layer.items()}}
                model.train()
                if step in probe_at:
                    point["probe"] = _probe(model, opt, task, cfg, train, test, step, seed)
                w.write("checkpoint", **point)
                points.append(point)
                progress.update(1)
    return points


def _probe(model, opt, task: Task, cfg: LmConfig, train, test, step: int, seed: int) -> Dict[str, Any]:
    """The branch probe at this checkpoint (:func:`gradnoise.control.probe.probe`): the
    branch-measured critical batch (McCandlish's and Merrill's) beside the raw and the
    preconditioned ``B_simple`` at the same weights, each ``[value, low, high]``, their
    ratios, and its wall time."""
    held = test[:cfg.probe_eval_windows]
    doc = probe(model, opt, (task.x[train], task.y[train]), task.loss_fn, held_out=(task.x[held], task.y[held]),
                base_batch=cfg.batch_size, batch_sizes=probe_sizes(cfg), budget=cfg.batch_size * cfg.probe_budget_steps,
                seeds=cfg.probe_seeds, evals=cfg.probe_evals, seed=seed + step, step=step, task=task.name, quiet=True)
    mc, me, px = doc["mccandlish"], doc["merrill"], doc["proxy"]

    def tri(v, iv):
        return [num(v), *(num(x) if x is None or math.isfinite(x) else float(x) for x in (iv or [None, None]))]
    return {"b_crit": tri(mc["b_noise"], mc["interval"]), "b_crit_reason": mc["reason"],
            "merrill": tri(me["b_crit"], me["interval"]), "merrill_reason": me["reason"],
            "b_simple": tri(px["b_simple"], px["b_simple_interval"]),
            "preconditioned": tri(px["preconditioned"], px["preconditioned_interval"]),
            "ratio": tri(px["ratio"], px["ratio_interval"]),
            "preconditioned_ratio": tri(px["preconditioned_ratio"], px["preconditioned_ratio_interval"]),
            "seconds": doc["seconds"], "branches": len(doc["branches"])}


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)


def _rho(a: List[float], b: List[float]) -> Optional[float]:
    """Spearman's ρ (None below 3 pairs or for a constant series)."""
    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return float(spearmanr(a, b).statistic)


def growth(points: List[Dict[str, Any]], tokens_per: int) -> Dict[str, Any]:
    """``B_simple`` at the first, middle and last checkpoint where it is defined, in
    sequences and tokens, with the held-out loss, and Spearman's ρ of ``B_simple``
    against the loss (ρ < 0: it grows as the loss falls)."""
    ok = [p for p in points if _finite(p["b_simple"][0]) and _finite(p["loss"])]

    def at(p):
        b, lo, hi = p["b_simple"]
        return {"step": p["step"], "tokens": p["tokens"], "loss": p["loss"], "b_simple": b, "interval": [lo, hi],
                "b_simple_tokens": b * tokens_per}

    out: Dict[str, Any] = {"points": len(ok)}
    if ok:
        out.update(first=at(ok[0]), middle=at(ok[len(ok) // 2]), last=at(ok[-1]))
        out["growth"] = ok[-1]["b_simple"][0] / ok[0]["b_simple"][0] if ok[0]["b_simple"][0] > 0 else None
    out["rho_loss"] = _rho([p["b_simple"][0] for p in ok], [p["loss"] for p in ok])
    return out


def layernorm_agreement(points: List[Dict[str, Any]]) -> Dict[str, Any]:
    """How the LayerNorm layers' ``B_simple`` compares with the whole model's over the
    checkpoints where both are positive: the ratio's median and 10–90 % range, and
    Spearman's ρ between the two series."""
    pairs = [(p["ln_b_simple"][0], p["b_simple"][0]) for p in points
             if _finite(p["ln_b_simple"][0]) and _finite(p["b_simple"][0]) and p["b_simple"][0] > 0
             and p["ln_b_simple"][0] > 0]
    if not pairs:
        return {"points": 0, "median_ratio": None, "ratio_range": [None, None], "rho": None}
    ratios = np.array([a / b for a, b in pairs])
    return {"points": len(pairs), "median_ratio": float(np.median(ratios)),
            "ratio_range": [float(np.quantile(ratios, 0.1)), float(np.quantile(ratios, 0.9))],
            "rho": _rho([a for a, _ in pairs], [b for _, b in pairs])}


def calibration(points: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The branch probes along the run: per probed checkpoint its step, tokens, held-out
    loss, the branch-measured ``B_crit``, Merrill's, the raw, preconditioned and
    LayerNorm-only ``B_simple`` and the ratios (``[value, low, high]``), and the wall time;
    ``last`` the last of them."""
    rows = [{"step": p["step"], "tokens": p["tokens"], "loss": p["loss"], "ln_b_simple": p["ln_b_simple"],
             **p["probe"]} for p in points if p.get("probe")]
    return {"points": rows, "last": rows[-1] if rows else None}


def run(task: Task, out, seed: int = 0, size: str = "default", quiet: bool = False,
        config: LmConfig = None) -> dict:
    """Run the study; writes ``lm-<task>.jsonl``; returns the summary.

    Lines: ``noise`` (every measured step of the trajectory: smoothed ``B_simple`` and its
    interval, the LayerNorm layers', the raw one and the train loss), ``checkpoint``
    (every ``eval_every`` steps: the held-out loss, ``B_simple`` of the model, of the
    LayerNorm layers and of every layer, each ``[value, low, high]``), ``run`` (one
    warm-up run) and ``summary``.

    Summary keys: ``sequence_length``, ``batch_size``, ``lr``, ``steps``, ``params``,
    ``initial_loss``, ``final_loss``, ``growth`` (:func:`growth`), ``layernorm``
    (:func:`layernorm_agreement`), ``layers`` (layer -> its last ``[b, low, high]``),
    ``calibration`` (:func:`calibration`: the branch probes),
    ``target_loss``, ``base_batch``, ``large_batch``, ``methods`` (name -> ``reached``,
    ``runs``, and ``steps``, ``tokens``, ``seconds`` as ``{"mean", "interval", "n"}``
    over the seeds that reached the target).

    Raises:
        ValueError: a task that is not next-token prediction, or options it cannot meet.
    """
    cfg = config or LmConfig.for_size(size)
    check(task, cfg)
    train, test = split(task.size, cfg.eval_windows, seed)
    tokens_per = int(task.y[0].numel())
    initial = held_out_loss(task.fresh_model(), task, test)
    if cfg.methods and not initial > cfg.target_loss:
        raise ValueError(f"the initial loss {initial:.4g} is already at or below the target {cfg.target_loss:g}")
    n_points = cfg.steps // cfg.eval_every
    with StudyWriter(out, "lm", task.name, seed, size, asdict(cfg)) as w, \
            bar(n_points + len(cfg.methods) * cfg.seeds, f"lm {task.name}", quiet) as progress:
        points = trajectory(task, cfg, train, test, seed, w, progress)
        methods = warmup(task, cfg, train, test, seed, w, progress, lambda m: held_out_loss(m, task, test))
        last = points[-1] if points else {}
        summary = {"sequence_length": tokens_per, "batch_size": cfg.batch_size, "lr": cfg.adam_lr, "steps": cfg.steps,
                   "params": sum(p.numel() for p in task.model.parameters()), "initial_loss": initial,
                   "final_loss": last.get("loss"), "growth": growth(points, tokens_per),
                   "layernorm": layernorm_agreement(points), "layers": last.get("layers", {}),
                   "calibration": calibration(points),
                   "target_loss": cfg.target_loss, "base_batch": cfg.base_batch, "large_batch": cfg.large_batch,
                   "methods": methods}
        w.write("summary", **summary)
    return summary


def summary_line(s: dict) -> str:
    """One line for the end of ``gradnoise study``."""
    g, ln = s.get("growth") or {}, s.get("layernorm") or {}
    parts = []
    if g.get("first") and g.get("last"):
        f, la = g["first"], g["last"]
        parts.append(f"B_simple {fmt_num(f['b_simple'])} at loss {fmt_num(f['loss'], 3)} → "
                     f"{fmt_with_interval(la['b_simple'], la['interval'])} sequences "
                     f"(≈ {fmt_num(la['b_simple_tokens'])} tokens) at loss {fmt_num(la['loss'], 3)}")
    cal = (s.get("calibration") or {}).get("last")
    if cal:
        parts.append(f"branch B_crit {fmt_with_interval(cal['b_crit'][0], cal['b_crit'][1:])} at step {cal['step']} "
                     f"(×{fmt_num(cal['ratio'][0], 2)} B_simple)")
    if ln.get("median_ratio") is not None:
        parts.append(f"LayerNorm-only/total ×{fmt_num(ln['median_ratio'], 2)} (ρ {fmt_num(ln.get('rho'), 2)})")
    for name, m in (s.get("methods") or {}).items():
        steps = (m.get("steps") or {}).get("mean")
        parts.append(f"{name}: {fmt_num(steps)} steps to {fmt_num(s.get('target_loss'))}" if steps is not None
                     else f"{name}: target missed")
    return "; ".join(parts) or "no checkpoint"
