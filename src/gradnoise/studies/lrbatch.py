"""Study ``lr-batch``: which learning rates train, at which batch size.

A grid of batch sizes × learning rates; each cell trains SGD for ``steps`` steps from
the same initial weights and records the full-data loss at the end. A cell *fails*
(diverges) when a batch loss exceeds three times the initial loss or becomes NaN/inf,
or when the final loss is no lower than the initial one (the run went nowhere). Rates
are tried upwards; after two failures in a row the larger ones are not run (marked
failed, ``skipped``). For each batch size the largest rate that did not fail
(``lr_max``) and the rate with the lowest final loss (``lr_best``) are compared with
McCandlish et al.'s (2018) law for the best step size,

    ε(B) = ε_max / (1 + B_noise/B),

fitted to ``lr_best`` (:func:`gradnoise.stats.fits.fit_hyperbolic`, ``s = −1``): the
best rate grows almost linearly with ``B`` while ``B ≪ B_noise`` and saturates at
``ε_max`` beyond. The largest stable rate is often set by curvature (``ε < 2/λ_max``)
rather than by noise, and then barely moves with ``B``. ``B_simple`` at
initialisation (exact, from all samples) is reported beside the fitted ``B_noise``.
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


@dataclass
class LrBatchConfig:
    batch_sizes: List[int] = field(default_factory=lambda: [8, 16, 32, 64, 128, 256, 512])
    lrs: List[float] = field(default_factory=lambda: [round(0.1 * 2 ** (k / 2), 4) for k in range(11)])
    steps: int = 100

    @classmethod
    def for_size(cls, size: str) -> "LrBatchConfig":
        if size == "tiny":
            return cls(batch_sizes=[8, 32, 128], lrs=[0.1, 0.4, 1.6, 6.4], steps=15)
        return cls()


def run(task: Task, out, seed: int = 0, size: str = "default", quiet: bool = False,
        config: LrBatchConfig = None) -> dict:
    """Run the study; writes ``lr-batch-<task>.jsonl``; returns the summary."""
    cfg = config or LrBatchConfig.for_size(size)
    sizes = [b for b in cfg.batch_sizes if b <= task.size]
    model0 = task.fresh_model()
    initial = full_loss(model0, task)
    b_simple0 = full_noise(model0, task)["b_simple"]
    stable_b, stable_lr = [], []
    with StudyWriter(out, "lr-batch", task.name, seed, size, asdict(cfg)) as w, \
            bar(len(sizes) * len(cfg.lrs), f"lr-batch {task.name}", quiet) as progress:
        for b in sizes:
            lr_max, best, fails = None, (math.inf, None), 0
            for lr in sorted(cfg.lrs):
                skip = fails >= 2
                final, failed = (math.nan, True) if skip else train_sgd(
                    task.fresh_model(), task, b, lr, cfg.steps, torch.Generator().manual_seed(seed), initial)
                failed = failed or not final < initial
                w.write("cell", batch_size=b, lr=lr, final_loss=num(final), diverged=failed, skipped=skip)
                fails = fails + 1 if failed else 0
                if not failed:
                    lr_max, best = lr, min(best, (final, lr))
                progress.update(1)
            w.write("stable", batch_size=b, lr_max=lr_max, lr_best=best[1], best_loss=num(best[0]))
            if best[1] is not None:
                stable_b.append(b)
                stable_lr.append(best[1])
        summary = _summary(stable_b, stable_lr, b_simple0, max(cfg.lrs), seed)
        w.write("summary", **summary)
    return summary


def _summary(bs, lrs, b_simple0: float, top: float, seed: int) -> dict:
    out = {"eps_max": None, "b_noise": None, "b_noise_interval": [math.nan, math.nan],
           "b_simple": num(b_simple0), "points": len(bs), "reason": None}
    try:
        fit = fit_hyperbolic(bs, lrs, s=-1.0, seed=seed)
    except ValueError as e:
        out["reason"] = f"no fit: {e}"
        return out
    out.update(eps_max=fit.a, b_noise=fit.c, b_noise_interval=list(fit.interval), rms=fit.rms)
    if any(lr >= top for lr in lrs):
        out["reason"] = "the largest rate of the grid was the best at some batch size; extend the grid upwards"
    elif fit.at_bound:
        out["reason"] = "B_noise lies outside the swept batch sizes"
    return out
