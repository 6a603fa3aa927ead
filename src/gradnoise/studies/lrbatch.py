"""Study ``lr-batch``: which learning rates train, at which batch size.

A grid of batch sizes × learning rates; each cell trains SGD for ``steps`` steps from
the same initial weights and records the full-data loss at the end. A cell *diverges*
when a batch loss blows up (NaN/inf, or 100× the initial loss) or the final full-data
loss is NaN/inf or above three times the initial one; it made *no progress* when it
stayed finite but ended less than 0.1 % below where it started (too small a rate, or
stuck). Rates
are tried upwards; after two divergences in a row the larger ones are not run (marked
diverged, ``skipped``). For each batch size the largest rate that trained — neither
diverged nor stalled (``lr_max``; a large rate that leaves the model stuck, e.g. with
dead ReLUs, is not stable in any useful sense) — and the rate with the lowest final
loss (``lr_best``) are compared with
McCandlish et al.'s (2018) law for the best step size,

    ε(B) = ε_max / (1 + B_noise/B),

fitted to ``lr_best`` and, separately, to ``lr_max``
(:func:`gradnoise.stats.fits.fit_hyperbolic`, ``s = −1``): the best rate grows almost
linearly with ``B`` while ``B ≪ B_noise`` and saturates at ``ε_max`` beyond. The
largest stable rate is often set by curvature (``ε < 2/λ_max``) rather than by noise,
and then barely moves with ``B``. ``B_simple`` at initialisation (exact, from all
samples) is reported beside the fitted ``B_noise``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import List

import torch

from ..stats.fits import fit_hyperbolic
from .output import StudyWriter, num
from .progress import bar
from .task import Task
from .training import full_loss, full_noise, train_sgd


PROGRESS = 1e-3  # a run must lower the loss by this fraction of the initial loss


@dataclass
class LrBatchConfig:
    batch_sizes: List[int] = field(default_factory=lambda: [8, 16, 32, 64, 128, 256, 512])
    lrs: List[float] = field(default_factory=lambda: [round(0.1 * 2 ** (k / 2), 4) for k in range(13)])
    steps: int = 100

    @classmethod
    def for_size(cls, size: str) -> "LrBatchConfig":
        if size == "tiny":
            return cls(batch_sizes=[8, 32, 128], lrs=[0.1, 0.4, 1.6, 6.4], steps=15)
        return cls()


def _row(task: Task, b: int, cfg: LrBatchConfig, seed: int, initial: float, w: StudyWriter, progress):
    """Every rate at batch size ``b``, upwards; writes ``cell`` lines and the ``stable``
    line; returns ``(lr_max, lr_best)`` (None where no rate qualifies)."""
    lr_max, best, blowups = None, (math.inf, None), 0
    for lr in sorted(cfg.lrs):
        skip = blowups >= 2
        final, blew = (math.nan, True) if skip else train_sgd(
            task.fresh_model(), task, b, lr, cfg.steps, torch.Generator().manual_seed(seed), initial)
        stuck = not blew and not final < initial - PROGRESS * abs(initial)
        w.write("cell", batch_size=b, lr=lr, final_loss=num(final), diverged=blew, no_progress=stuck, skipped=skip)
        blowups = blowups + 1 if blew else 0
        if not blew and not stuck:
            lr_max, best = lr, min(best, (final, lr))
        progress.update(1)
    w.write("stable", batch_size=b, lr_max=lr_max, lr_best=best[1], best_loss=num(best[0]))
    return lr_max, best[1]


def run(task: Task, out, seed: int = 0, size: str = "default", quiet: bool = False,
        config: LrBatchConfig = None) -> dict:
    """Run the study; writes ``lr-batch-<task>.jsonl``; returns the summary."""
    cfg = config or LrBatchConfig.for_size(size)
    sizes = [b for b in cfg.batch_sizes if b <= task.size]
    notes = [f"batch sizes above the {task.size} samples left out"] if len(sizes) < len(cfg.batch_sizes) else []
    model0 = task.fresh_model()
    initial = full_loss(model0, task)
    b_simple0 = full_noise(model0, task)["b_simple"]
    rows = []
    with StudyWriter(out, "lr-batch", task.name, seed, size, asdict(cfg)) as w, \
            bar(len(sizes) * len(cfg.lrs), f"lr-batch {task.name}", quiet) as progress:
        for b in sizes:
            rows.append((b, *_row(task, b, cfg, seed, initial, w, progress)))
        summary = _summary(rows, b_simple0, cfg.lrs, seed, notes)
        w.write("summary", **summary)
    return summary


def _fit(points, seed: int, what: str):
    """The law fitted to ``[(B, lr)]``: ``(fit, None)``, or ``(None, reason)`` when the
    points cannot support one (too few, no bend within the sweep, or the fitted B_noise
    outside the swept batch sizes)."""
    try:
        fit = fit_hyperbolic([b for b, _ in points], [lr for _, lr in points], s=-1.0, seed=seed)
    except ValueError as e:
        return None, f"no fit to the {what}: {len(points)} usable batch sizes ({e})"
    swept = [b for b, _ in points]
    if fit.at_bound or not min(swept) <= fit.c <= max(swept):
        where = "above" if fit.c > max(swept) else "below"
        return None, (f"no fit to the {what}: B_noise lies {where} the usable batch sizes "
                      f"{min(swept)}–{max(swept)} (the rates do not bend within the sweep)")
    return fit, None


def _inside(points, grid):
    """The points ``[(B, lr)]`` whose rate is inside the grid (an edge rate only bounds
    the optimum: the best might lie beyond it)."""
    return [(b, lr) for b, lr in points if min(grid) < lr < max(grid)] if len(grid) > 2 else list(points)


def _summary(rows, b_simple0: float, grid, seed: int, notes) -> dict:
    """Both fits (to the best and to the largest stable rates) and their notes; a fit
    is None ("—") with the reason when its premises fail."""
    best = [(b, lr) for b, _, lr in rows if lr is not None]
    stable = [(b, lr) for b, lr, _ in rows if lr is not None]
    out = {"eps_max": None, "b_noise": None, "b_noise_interval": [math.nan, math.nan], "stable_fit": None,
           "b_simple": num(b_simple0), "best": [list(p) for p in best]}
    edge = [b for b, lr in best if lr >= max(grid)]
    if edge:
        notes.append(f"the largest rate of the grid was the best at B={', '.join(map(str, edge))} (left out of "
                     "the fit), so extend the grid upwards")
    low = [b for b, lr in best if lr <= min(grid)]
    if low and len(grid) > 1:
        notes.append(f"the smallest rate of the grid was the best at B={', '.join(map(str, low))} (left out of "
                     "the fit), so extend the grid downwards")
    usable = _inside(best, grid)
    out["points"] = len(usable)
    fit, why = _fit(usable, seed, "best rates")
    if fit is not None:
        out.update(eps_max=fit.a, b_noise=fit.c, b_noise_interval=list(fit.interval), rms=fit.rms)
    else:
        notes.append(why)
    if any(lr >= max(grid) for _, lr in stable):
        notes.append("the largest rate of the grid was stable at some batch size, so the largest stable "
                     "rates there are lower bounds (left out of their fit)")
    sfit, _ = _fit([(b, lr) for b, lr in stable if lr < max(grid)], seed, "largest stable rates")
    if sfit is not None:
        out["stable_fit"] = {"eps_max": sfit.a, "b_noise": sfit.c, "b_noise_interval": list(sfit.interval),
                             "rms": sfit.rms}
    out["reason"] = "; ".join(notes) or None
    return out
