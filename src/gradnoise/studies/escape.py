"""Study ``escape``: gradient noise helps leave sharp minima.

(a) A controlled landscape (:mod:`gradnoise.studies.landscape`) with a sharp and a flat,
slightly deeper well: walkers start in the sharp well and take ``walk_steps`` SGD steps at
a fixed learning rate with batch sizes ``B`` from 1 up; the noise level of a step is
``ε·tr(Σ_B)`` at the sharp minimum. For each ``B`` the fraction of walkers that left the
sharp well (Wilson 95 % interval) under SGD's own noise and under isotropic Gaussian noise
of the same trace: SGD's noise is strongest along the sharp direction, so it should
escape more often at the same magnitude (Zhu et al. 2019).

(b) On the task, small- against large-batch SGD at the same learning rate, each trained
until its training loss reaches ``solution_loss`` (so both are solutions of the same
quality; a run that does not reach it within ``max_steps`` is flagged and left out of the
comparison), over several seeds (the order of the batches): the top Hessian eigenvalue
(power iteration on Hessian-vector products) and the trace (Hutchinson) of the training
loss at that point — on a fixed subsample of ``hessian_samples`` training samples, the
same for every run — and the train/test accuracy gap on a held-out quarter of the data. Known caveats, stated in the
report: sharpness depends on the parameterisation (Dinh et al. 2017); training the large
batch longer narrows the gap (Hoffer et al. 2017); under full-batch gradient descent the
top eigenvalue tracks ``2/ε`` (Cohen et al. 2021, the edge of stability).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..stats.intervals import mean_interval
from .landscape import Landscape, walk, wilson
from .output import StudyWriter, num
from .progress import bar
from .sharpness import hessian_trace, top_eigenvalue
from .task import Task
from .training import batches, full_loss, sgd_step


@dataclass
class EscapeConfig:
    walk_batch_sizes: List[int] = field(default_factory=lambda: [1, 2, 3, 4, 6, 8, 16])
    walk_lr: float = 0.02
    walkers: int = 150
    walk_steps: int = 300
    spread: float = 0.05        # the landscape's data spread s
    small_batch: int = 16
    large_batch: int = 512
    solution_lr: float = 0.4
    solution_loss: float = 0.1      # train until the training loss is this low
    max_steps: int = 6000
    seeds: int = 3
    test_fraction: float = 0.25
    hessian_samples: int = 512      # the Hessian is of the loss on this many training samples
    power_iters: int = 20
    probes: int = 20                # Hutchinson probes

    @classmethod
    def for_size(cls, size: str) -> "EscapeConfig":
        if size == "tiny":
            return cls(walk_batch_sizes=[1, 4, 16], walkers=40, walk_steps=150, large_batch=128,
                       solution_loss=1.0, max_steps=300, seeds=2, hessian_samples=128, power_iters=5, probes=4)
        return cls()


def _walks(cfg: EscapeConfig, seed: int, w: StudyWriter, progress) -> List[Dict[str, Any]]:
    land = Landscape(spread=cfg.spread)
    z = land.points(np.random.default_rng(seed))
    rows = []
    for b in cfg.walk_batch_sizes:
        for kind in ("sgd", "isotropic"):
            x, level = walk(land, z, cfg.walk_lr, b, cfg.walk_steps, cfg.walkers, kind,
                            np.random.default_rng([seed, b, kind == "sgd"]))
            k = int(np.sum(~land.sharp(x)))
            row = {"kind": kind, "batch_size": b, "lr": cfg.walk_lr, "noise_level": level, "walkers": cfg.walkers,
                   "escaped": k, "fraction": k / cfg.walkers, "interval": list(wilson(k, cfg.walkers))}
            w.write("walk", **row)
            rows.append(row)
            progress.update(1)
    return rows


@torch.no_grad()
def _accuracy(model, x: torch.Tensor, y: torch.Tensor) -> Optional[float]:
    """Classification accuracy, or None when the targets are not class labels."""
    if y.dtype not in (torch.int64, torch.int32) or y.dim() != 1:
        return None
    out = model(x)
    return float((out.argmax(-1) == y).double().mean()) if out.dim() == 2 else None


def _solution(task: Task, train: Task, test: Task, b: int, r: int, cfg: EscapeConfig, seed: int) -> Dict[str, Any]:
    model = task.fresh_model()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.solution_lr)
    gen = torch.Generator().manual_seed(seed + r)
    it = batches(train.size, b, gen)
    every = max(1, train.size // b)  # check the training loss once an epoch
    steps, reached = 0, False
    while steps < cfg.max_steps and not reached:
        for _ in range(min(every, cfg.max_steps - steps)):
            sgd_step(model, opt, train, next(it))
        steps += min(every, cfg.max_steps - steps)
        loss_now = full_loss(model, train)
        reached = loss_now <= cfg.solution_loss
        if not math.isfinite(loss_now):
            break
    model.eval()  # the Hessian of the trained model's loss (dropout off)
    hx, hy = train.x[:cfg.hessian_samples], train.y[:cfg.hessian_samples]  # the split is already shuffled
    loss = lambda: train.loss_fn(model(hx), hy)  # noqa: E731
    lam = top_eigenvalue(model, loss, iters=cfg.power_iters, tol=1e-3,
                         generator=torch.Generator().manual_seed(seed + r))
    tr, tr_se = hessian_trace(model, loss, probes=cfg.probes, generator=torch.Generator().manual_seed(seed + r + 1))
    acc_train, acc_test = _accuracy(model, train.x, train.y), _accuracy(model, test.x, test.y)
    return {"batch_size": b, "seed": seed + r, "lr": cfg.solution_lr, "steps": steps, "reached": reached,
            "train_loss": num(full_loss(model, train)), "test_loss": num(full_loss(model, test)),
            "train_accuracy": acc_train, "test_accuracy": acc_test,
            "gap": acc_train - acc_test if acc_train is not None and acc_test is not None else None,
            "top_eigenvalue": num(lam), "hessian_trace": num(tr), "hessian_trace_se": num(tr_se)}


def _split(task: Task, cfg: EscapeConfig, seed: int):
    perm = torch.randperm(task.size, generator=torch.Generator().manual_seed(seed))
    n_test = max(2, int(round(cfg.test_fraction * task.size)))
    test, train = perm[:n_test], perm[n_test:]
    return replace(task, x=task.x[train], y=task.y[train]), replace(task, x=task.x[test], y=task.y[test])


def run(task: Task, out, seed: int = 0, size: str = "default", quiet: bool = False,
        config: EscapeConfig = None) -> dict:
    """Run the study; writes ``escape-<task>.jsonl``; returns the summary."""
    cfg = config or EscapeConfig.for_size(size)
    train, test = _split(task, cfg, seed)
    sizes = sorted({min(b, train.size // 2) for b in (cfg.small_batch, cfg.large_batch)})
    if len(sizes) < 2:
        raise ValueError(f"the task's {train.size} training samples leave no room for two batch sizes")
    with StudyWriter(out, "escape", task.name, seed, size, asdict(cfg)) as w, \
            bar(2 * len(cfg.walk_batch_sizes) + cfg.seeds * 2, f"escape {task.name}", quiet) as progress:
        walks = _walks(cfg, seed, w, progress)
        solutions = []
        for r in range(cfg.seeds):
            for b in sizes:
                sol = _solution(task, train, test, b, r, cfg, seed)
                w.write("solution", **sol)
                solutions.append(sol)
                progress.update(1)
        summary = _summary(walks, solutions, sizes)
        w.write("summary", **summary)
    return summary


def _summary(walks: List[Dict[str, Any]], solutions: List[Dict[str, Any]], sizes: List[int]) -> dict:
    by = {(r["kind"], r["batch_size"]): r for r in walks}
    bs = sorted({r["batch_size"] for r in walks})
    more = [b for b in bs if by[("sgd", b)]["interval"][0] > by[("isotropic", b)]["interval"][1]]
    less = [b for b in bs if by[("sgd", b)]["interval"][1] < by[("isotropic", b)]["interval"][0]]
    out: Dict[str, Any] = {
        "walk": [[b, by[("sgd", b)]["noise_level"], by[("sgd", b)]["fraction"], by[("isotropic", b)]["fraction"]]
                 for b in bs],
        "sgd_escapes_more_at": more, "sgd_escapes_less_at": less,
        "small_batch": sizes[0], "large_batch": sizes[-1],
    }
    for name, b in (("small", sizes[0]), ("large", sizes[-1])):
        mine = [s for s in solutions if s["batch_size"] == b and s["reached"]]  # solutions only
        out[name] = {key: mean_interval([s[key] for s in mine], lower=None if key == "gap" else 0.0)
                     for key in ("top_eigenvalue", "hessian_trace", "gap", "train_loss", "test_accuracy")}
    small, large = out["small"]["top_eigenvalue"]["mean"], out["large"]["top_eigenvalue"]["mean"]
    out["sharpness_ratio"] = large / small if small and large is not None and small > 0 else None
    missed = sorted({s["batch_size"] for s in solutions if not s["reached"]})
    out["reason"] = (f"runs at B={', '.join(map(str, missed))} did not reach the training loss within the step "
                     "budget and are left out of the comparison") if missed else None
    return out
