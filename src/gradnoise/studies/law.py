"""Study ``law``: the definition of gradient noise, measured directly.

At fixed parameters (at initialisation and after some SGD training) the exact
full-data gradient ``∇J = (1/N) Σ g_i`` and the population variance
``tr(Σ) = (1/N) Σ ||g_i − ∇J||²`` come from one pass of the per-sample engine over all
``N`` samples. Then, for ``B = 1, 2, 4, …`` up to ``N/2``, many batches are drawn
uniformly without replacement and ``||ĝ_B − ∇J||²`` is measured with ordinary
autograd on each. Sampling theory predicts its mean exactly:

    E||ĝ_B − ∇J||² = tr(Σ)/B · (N − B)/(N − 1).

Each point reports the Monte-Carlo mean, its standard error and
``z = (mean − prediction)/SE``; the summary gives the largest ``|z|``. Computed in
float32 by default (rounding errors are about 1e-6 of the smallest measured error, far
below its Monte-Carlo error); ``dtype="float64"`` for a slower, exact-to-the-last-digit
run.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import List

import torch

from .output import StudyWriter, num
from .progress import bar
from .task import Task
from .training import batches, flat_grad, full_noise, sgd_step


@dataclass
class LawConfig:
    """Batch sizes are powers of two up to ``min(max_batch, N/2)``."""

    max_batch: int = 512
    draws: int = 200          # batches per batch size
    train_steps: int = 150    # SGD steps before the "trained" checkpoint
    train_batch: int = 32
    lr: float = 0.1
    dtype: str = "float32"    # or "float64"

    @classmethod
    def for_size(cls, size: str) -> "LawConfig":
        return cls(max_batch=16, draws=40, train_steps=20) if size == "tiny" else cls()


def batch_sizes(n: int, max_batch: int) -> List[int]:
    """``1, 2, 4, …`` up to ``min(max_batch, n // 2)``."""
    out, b = [], 1
    while b <= min(max_batch, n // 2):
        out.append(b)
        b *= 2
    return out


def _points(model, task: Task, full: dict, g_full: torch.Tensor, sizes: List[int], draws: int,
            gen: torch.Generator, writer: StudyWriter, checkpoint: str, progress) -> List[float]:
    """Measure every batch size; write ``point`` lines; return their ``z``."""
    n, zs = task.size, []
    for b in sizes:
        errs = torch.empty(draws, dtype=torch.float64)
        for d in range(draws):
            idx = torch.randperm(n, generator=gen)[:b]
            model.zero_grad(set_to_none=True)
            task.loss_fn(model(task.x[idx]), task.y[idx]).backward()
            errs[d] = (flat_grad(model) - g_full).square().sum()
            progress.update(1)
        mse, se = float(errs.mean()), float(errs.std() / math.sqrt(draws))
        pred = full["trace_cov"] / b * (n - b) / (n - 1)
        z = (mse - pred) / se if se > 0 else math.nan
        zs.append(z)
        writer.write("point", checkpoint=checkpoint, batch_size=b, batches=draws, mse=mse, mse_se=se,
                     predicted=pred, z=num(z))
    return zs


def run(task: Task, out, seed: int = 0, size: str = "default", quiet: bool = False,
        config: LawConfig = None) -> dict:
    """Run the study; writes ``law-<task>.jsonl`` in ``out`` and returns its summary."""
    cfg = config or LawConfig.for_size(size)
    dtype = {"float32": torch.float32, "float64": torch.float64}[cfg.dtype]
    model = task.fresh_model().to(dtype)
    task = replace(task, model=model, x=task.x.to(dtype) if task.x.is_floating_point() else task.x)
    sizes = batch_sizes(task.size, cfg.max_batch)
    gen = torch.Generator().manual_seed(seed)
    worst = {"max_abs_z": -1.0}
    with StudyWriter(out, "law", task.name, seed, size, asdict(cfg)) as w, \
            bar(2 * len(sizes) * cfg.draws + cfg.train_steps, f"law {task.name}", quiet) as progress:
        for checkpoint in ("init", "trained"):
            if checkpoint == "trained":
                opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
                it = batches(task.size, min(cfg.train_batch, task.size // 2), gen)
                for _ in range(cfg.train_steps):
                    sgd_step(model, opt, task, next(it))
                    progress.update(1)
            full = full_noise(model, task)
            g_full = flat_grad(model).clone()
            w.write("checkpoint", checkpoint=checkpoint, step=0 if checkpoint == "init" else cfg.train_steps,
                    population=task.size, **{k: num(v) for k, v in full.items() if k != "b_simple"})
            zs = _points(model, task, full, g_full, sizes, cfg.draws, gen, w, checkpoint, progress)
            for b, z in zip(sizes, zs):
                if math.isfinite(z) and abs(z) > worst["max_abs_z"]:
                    worst = {"max_abs_z": abs(z), "checkpoint": checkpoint, "batch_size": b}
        summary = {**worst, "points": 2 * len(sizes)}
        w.write("summary", **summary)
    return summary
