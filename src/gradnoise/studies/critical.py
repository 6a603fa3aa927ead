"""Study ``critical-batch``: steps and examples to a target loss across batch sizes.

For each batch size ``B`` of a sweep, and each seed (the order of the batches), SGD is
trained from the same initial weights until the full-data loss reaches
``target_loss``, at every learning rate of a small grid; the fewest steps ``S`` over
the grid count (a run is cut off as soon as it needs more steps than the best so far,
so the grid costs little). With ``E = S·B`` examples, McCandlish et al. (2018) predict
the trade-off

    (S/S_min − 1)(E/E_min − 1) = 1,   i.e.   S(B) = S_min (1 + B_crit/B),

with the critical batch size ``B_crit = E_min/S_min``: below it, doubling the batch
nearly halves the steps; above it, it mostly wastes examples. ``B_crit`` is fitted
(:func:`gradnoise.stats.fits.fit_hyperbolic`, residual-bootstrap interval) and shown
beside the noise scale ``B_simple`` that a :class:`gradnoise.NoiseMonitor` measured
along the way (per-sample source, every ``every`` steps), which the same paper finds
close to ``B_crit``.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Tuple

import torch

from ..monitor import NoiseMonitor
from ..stats.fits import fit_hyperbolic
from .output import StudyWriter, num
from .progress import bar
from .task import Task
from .training import BLOW_UP, above, batches, diverged, full_loss, sgd_step


@dataclass
class CriticalConfig:
    batch_sizes: List[int] = field(default_factory=lambda: [8, 16, 32, 64, 128, 256, 512])
    lrs: List[float] = field(default_factory=lambda: [1.6, 0.8, 0.4, 0.2, 0.1])  # large first: cheap cut-offs
    seeds: int = 2
    target_loss: float = 0.2
    max_steps: int = 600
    eval_examples: int = 64   # full-data loss every max(1, eval_examples // B) steps
    every: int = 10           # the monitor measures every k-th step

    @classmethod
    def for_size(cls, size: str) -> "CriticalConfig":
        if size == "tiny":
            return cls(batch_sizes=[16, 64, 256], lrs=[1.6, 0.8, 0.4], seeds=1, target_loss=1.5, max_steps=300)
        return cls()


def eval_every(cfg: CriticalConfig, b: int) -> int:
    """Steps between full-data evaluations at batch size ``b`` (the resolution of S)."""
    return max(1, cfg.eval_examples // b)


def _train_to_target(task: Task, b: int, lr: float, seed: int, cfg: CriticalConfig, cap: int):
    """One run; returns ``(steps or None, final loss, B_simple, interval)``; gives up
    after ``cap`` steps, when a batch loss blows up or when the full-data loss
    diverges (:func:`~gradnoise.studies.training.diverged`)."""
    model = task.fresh_model()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    monitor = NoiseMonitor(model, source="per_sample", every=cfg.every)
    it, ev = batches(task.size, b, gen), eval_every(cfg, b)
    initial, loss, steps = full_loss(model, task), math.nan, None
    try:
        for s in range(1, cap + 1):
            if above(sgd_step(model, opt, task, next(it), monitor), initial, BLOW_UP):
                loss = math.nan
                break
            if s % ev == 0 or s == cap:
                loss = full_loss(model, task)
                if loss <= cfg.target_loss:
                    steps = s
                    break
                if diverged(loss, initial):
                    break
    finally:
        monitor.close()
    rec = monitor.last
    b_simple = rec.smoothed.b_simple if rec is not None else math.nan
    interval = rec.b_simple_interval if rec is not None else (math.nan, math.nan)
    return steps, loss, b_simple, interval


def _best_for_batch(task: Task, b: int, seed: int, cfg: CriticalConfig, w: StudyWriter, progress):
    """Every learning rate at batch size ``b``; writes ``run`` lines, returns the best
    ``(steps, lr, b_simple)`` or None when no rate reached the target."""
    best: Optional[Tuple[int, float, float]] = None
    for lr in cfg.lrs:
        cap = cfg.max_steps if best is None else best[0]
        steps, loss, b_simple, interval = _train_to_target(task, b, lr, seed, cfg, cap)
        reached = steps is not None
        w.write("run", batch_size=b, lr=lr, seed=seed, reached=reached, steps=steps,
                examples=steps * b if reached else None, final_loss=num(loss), b_simple=num(b_simple),
                b_simple_interval=list(interval))
        if reached and (best is None or steps < best[0]):
            best = (steps, lr, b_simple)
        progress.update(1)
    return best


def run(task: Task, out, seed: int = 0, size: str = "default", quiet: bool = False,
        config: CriticalConfig = None) -> dict:
    """Run the study; writes ``critical-batch-<task>.jsonl``; returns the summary."""
    cfg = config or CriticalConfig.for_size(size)
    sizes = [b for b in cfg.batch_sizes if b <= task.size]
    initial = full_loss(task.fresh_model(), task)
    if not initial > cfg.target_loss:
        raise ValueError(f"the initial loss {initial:.4g} is already at or below the target "
                         f"{cfg.target_loss:g}; set a lower --target-loss")
    notes = [f"batch sizes above the {task.size} samples left out: "
             f"{', '.join(str(b) for b in cfg.batch_sizes if b > task.size)}"] if len(sizes) < len(cfg.batch_sizes) else []
    bests: List[Tuple[int, int, float]] = []
    b_simples: List[float] = []
    with StudyWriter(out, "critical-batch", task.name, seed, size, asdict(cfg)) as w, \
            bar(len(sizes) * cfg.seeds * len(cfg.lrs), f"critical-batch {task.name}", quiet) as progress:
        for r in range(cfg.seeds):
            for b in sizes:
                best = _best_for_batch(task, b, seed + r, cfg, w, progress)
                if best is None:
                    continue
                steps, lr, b_simple = best
                w.write("best", batch_size=b, seed=seed + r, lr=lr, steps=steps, examples=steps * b)
                bests.append((b, steps, lr))
                if math.isfinite(b_simple):
                    b_simples.append(b_simple)
        summary = _summary(bests, b_simples, cfg, seed, notes)
        w.write("summary", **summary)
    return summary


def _usable(best: List[Tuple[int, int, float]], cfg: CriticalConfig) -> Tuple[List[Tuple[int, int]], List[str]]:
    """The best runs ``[(B, S, lr)]`` whose ``S`` measures the steps to the target, and
    notes on the others: a run that reached the target at its first evaluation only
    bounds ``S`` by the evaluation spacing, and a best rate at an edge of the grid
    (``len(lrs) > 1``) may overstate ``S`` — a fit through them is not a result."""
    notes = []
    first = sorted({b for b, s, _ in best if s <= eval_every(cfg, b)})
    if first:
        notes.append(f"B={', '.join(map(str, first))} reached the target at the first evaluation, so S is "
                     "only the evaluation spacing there (left out of the fit: set a lower --target-loss)")
    edges = (max(cfg.lrs), min(cfg.lrs)) if len(cfg.lrs) > 1 else ()
    for edge, where in zip(edges, ("top", "bottom")):
        at = sorted({b for b, _, lr in best if lr == edge})
        if at:
            notes.append(f"the best rate at B={', '.join(map(str, at))} is the {where} of the grid "
                         f"({edge:g}), so S may be overstated there (left out of the fit: extend --lrs)")
    kept = [(b, steps) for b, steps, lr in best if steps > eval_every(cfg, b) and lr not in edges]
    return kept, notes


def _summary(best, b_simples, cfg: CriticalConfig, seed: int, notes: List[str]) -> dict:
    """The fit ``S = S_min(1 + B_crit/B)`` to the usable best runs; ``b_crit`` is None
    ("—") with the ``reason`` when they cannot support it (too few, no bend within the
    sweep, or the fitted value outside the swept batch sizes, recorded in ``b_crit_bound``
    as ``"<8"`` / ``">512"``)."""
    points, usable_notes = _usable(best, cfg)
    notes = notes + usable_notes
    out = {"target_loss": cfg.target_loss, "points": len(points), "runs": len(best), "s_min": None,
           "e_min": None, "b_crit": None, "b_crit_interval": [math.nan, math.nan], "b_crit_bound": None,
           "reason": None,
           "b_simple": num(statistics.median(b_simples)) if b_simples else None,
           "b_simple_interval": [min(b_simples), max(b_simples)] if b_simples else [math.nan, math.nan]}
    try:
        fit = fit_hyperbolic([b for b, _ in points], [s for _, s in points], s=1.0, seed=seed)
    except ValueError as e:
        out["reason"] = "; ".join(dict.fromkeys(notes + [f"no B_crit: {len(points)} usable runs ({e})"]))
        return out
    swept = [b for b, _ in points]
    if fit.at_bound or not min(swept) <= fit.c <= max(swept):
        side = f">{max(swept)}" if fit.c > max(swept) else f"<{min(swept)}"
        out["b_crit_bound"] = side
        notes.append(f"no B_crit: the steps do not bend within the usable batch sizes {min(swept)}–{max(swept)} "
                     f"(B_crit {side.replace('>', 'above ').replace('<', 'below ')}), so widen the sweep")
    else:
        out.update(s_min=fit.a, e_min=fit.a * fit.c, b_crit=fit.c, b_crit_interval=list(fit.interval), rms=fit.rms)
    out["reason"] = "; ".join(dict.fromkeys(notes)) or None
    return out
