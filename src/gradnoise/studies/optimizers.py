"""Study ``optimizers``: how noisy is each optimizer's *update*, not just its gradient?

SGD, momentum, Adam, RMSProp, SVRG, STORM and MARS train the same model from the same
weights at a small batch, each for ``steps`` steps (full-data loss every ``eval_every``).
At checkpoints along the way the optimizer's state is frozen and ``draws`` independent
batches are each given one step from that same state; the update ``u = θ_after −
θ_before`` of each is recorded. Over the draws,

    noise  = tr Cov(u)           (unbiased, over the draws)
    signal = |E u|² = |ū|² − tr Cov(u)/K

and the update's noise-to-signal ratio ``noise/signal`` is scale-free, so optimizers with
different step sizes compare directly; for SGD it is the gradient's ``tr(Σ_B)/|G|²``. The
claim that adaptive optimizers dampen gradient noise is thereby measured on their actual
updates (a preconditioner can as well amplify noise in directions where the signal is
small). A jackknife over the draws gives a 95 % interval (on the log scale). For SVRG the variance of its
estimator ``g − g̃ + μ̃`` is also compared with SGD's gradient variance at the same state
(Defazio & Bottou 2019 found that it barely falls on deep networks).
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch

from ..optim import MARS, STORM, SVRG
from ..stats.smoothing import Z95
from .output import StudyWriter, num
from .progress import bar
from .task import Task
from .training import batches, full_loss

CLOSURE = ("SVRG", "STORM", "MARS")   # these step through a closure on the batch


def _optimizers(lr: float) -> Dict[str, Callable]:
    """Name -> ``make(params)``, each at its usual rate for this scale of problem."""
    return {
        "SGD": lambda p: torch.optim.SGD(p, lr=lr),
        "momentum": lambda p: torch.optim.SGD(p, lr=lr / 10, momentum=0.9),
        "Adam": lambda p: torch.optim.Adam(p, lr=1e-3),
        "RMSProp": lambda p: torch.optim.RMSprop(p, lr=1e-3),
        "SVRG": lambda p: SVRG(p, lr=lr),
        "STORM": lambda p: STORM(p, lr=lr, a=0.1),
        "MARS": lambda p: MARS(p, lr=3e-3),
    }


@dataclass
class OptimizersConfig:
    optimizers: List[str] = field(default_factory=lambda: list(_optimizers(0.1)))
    batch_size: int = 16
    sgd_lr: float = 0.1        # SGD, SVRG, STORM (momentum uses a tenth of it)
    steps: int = 300
    eval_every: int = 25
    checkpoints: int = 4       # noise measured at this many evenly spaced steps (the first at 0)
    draws: int = 24            # batches per measurement

    @classmethod
    def for_size(cls, size: str) -> "OptimizersConfig":
        if size == "tiny":
            return cls(steps=40, eval_every=10, checkpoints=2, draws=8)
        return cls()


def _closure(model, task: Task, idx: torch.Tensor):
    def closure():
        model.zero_grad(set_to_none=False)
        loss = task.loss_fn(model(task.x[idx]), task.y[idx])
        loss.backward()
        return loss
    return closure


def _step(name: str, model, opt, task: Task, idx: torch.Tensor) -> float:
    if name in CLOSURE:
        return float(opt.step(_closure(model, task, idx)).detach())
    opt.zero_grad(set_to_none=True)
    loss = task.loss_fn(model(task.x[idx]), task.y[idx])
    loss.backward()
    opt.step()
    return float(loss.detach())


def _snapshot(opt: SVRG, model, task: Task) -> None:
    """SVRG's snapshot: the full-data gradient at the current weights."""
    def full():
        model.zero_grad(set_to_none=True)
        task.loss_fn(model(task.x), task.y).backward()
    opt.snapshot(full)


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def _updates(name: str, make, model, opt, task: Task, b: int, draws: int, gen) -> np.ndarray:
    """``[draws, P]``: the update each of ``draws`` fresh batches would make from the
    current state (model and optimizer copied for every draw; the real run is untouched)."""
    before = _flat(model)
    weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    m = copy.deepcopy(model)
    o = make(m.parameters())
    out = []
    for _ in range(draws):
        m.load_state_dict(weights)
        o.load_state_dict(state)  # load_state_dict copies the state: every draw starts from the same one
        idx = torch.randperm(task.size, generator=gen)[:b]
        _step(name, m, o, task, idx)
        out.append((_flat(m) - before).numpy())
    return np.stack(out)


def noise_to_signal(u: np.ndarray) -> Tuple[float, float, float]:
    """``(noise, signal, ratio)`` of updates ``u`` ``[K, P]`` (module docstring); the ratio
    is NaN when the unbiased signal is not above zero."""
    k = len(u)
    mean = u.mean(0)
    noise = float(((u - mean) ** 2).sum() / (k - 1))
    signal = float(mean @ mean - noise / k)
    return noise, signal, noise / signal if signal > 0 else math.nan


def _interval(u: np.ndarray, ratio: float) -> List[float]:
    """A 95 % interval of the ratio from the jackknife over the draws, on the log scale
    (``ratio·exp(±Z95·se)``, ``se`` the jackknife standard error of ``log ratio``); the
    upper end is ``inf`` when leaving out one draw leaves no positive signal."""
    if not (math.isfinite(ratio) and ratio > 0):
        return [math.nan, math.nan]
    k = len(u)
    logs = []
    for i in range(k):
        r = noise_to_signal(np.delete(u, i, axis=0))[2]
        if not (math.isfinite(r) and r > 0):
            return [0.0, math.inf]
        logs.append(math.log(r))
    logs = np.array(logs)
    se = math.sqrt((k - 1) / k * float(np.sum((logs - logs.mean()) ** 2)))
    return [ratio * math.exp(-Z95 * se), ratio * math.exp(Z95 * se)]


def _sgd_variance(model, task: Task, b: int, draws: int, gen) -> float:
    """``tr Cov`` of SGD's batch gradient at the current weights, over ``draws`` batches."""
    gs = []
    for _ in range(draws):
        idx = torch.randperm(task.size, generator=gen)[:b]
        model.zero_grad(set_to_none=True)
        task.loss_fn(model(task.x[idx]), task.y[idx]).backward()
        gs.append(torch.cat([p.grad.reshape(-1).double() for p in model.parameters()]).numpy())
    g = np.stack(gs)
    model.zero_grad(set_to_none=True)
    return float(((g - g.mean(0)) ** 2).sum() / (draws - 1))


def _train(name: str, make, task: Task, cfg: OptimizersConfig, seed: int, w: StudyWriter, progress):
    model = task.fresh_model()
    opt = make(model.parameters())
    b = min(cfg.batch_size, task.size // 2)
    it = batches(task.size, b, torch.Generator().manual_seed(seed))
    probe = torch.Generator().manual_seed(seed + 7)
    marks = set(np.linspace(0, cfg.steps - 1, cfg.checkpoints).round().astype(int).tolist())
    per_epoch = max(1, task.size // b)
    ratios = []
    for step in range(cfg.steps):
        if name == "SVRG" and step % per_epoch == 0:
            _snapshot(opt, model, task)  # once an epoch, m = N/B
        if step in marks:
            u = _updates(name, make, model, opt, task, b, cfg.draws, probe)
            noise, signal, ratio = noise_to_signal(u)
            lr = opt.param_groups[0].get("lr") or 1.0
            row = {"optimizer": name, "step": step, "noise": noise, "signal": signal, "ratio": num(ratio),
                   "ratio_interval": _interval(u, ratio)}
            if name == "SVRG":  # its estimator's variance against SGD's gradient at the same weights
                row["estimator_variance"] = noise / lr ** 2
                row["sgd_variance"] = _sgd_variance(model, task, b, cfg.draws, probe)
            w.write("noise", **row)
            ratios.append(ratio)
        loss = _step(name, model, opt, task, next(it))
        full = full_loss(model, task) if step % cfg.eval_every == 0 or step == cfg.steps - 1 else None
        w.write("loss", optimizer=name, step=step, loss=num(loss), full_loss=num(full))
        progress.update(1)
    return full_loss(model, task), ratios


def run(task: Task, out, seed: int = 0, size: str = "default", quiet: bool = False,
        config: OptimizersConfig = None) -> dict:
    """Run the study; writes ``optimizers-<task>.jsonl``; returns the summary."""
    cfg = config or OptimizersConfig.for_size(size)
    makers = _optimizers(cfg.sgd_lr)
    unknown = [n for n in cfg.optimizers if n not in makers]
    if unknown:
        raise ValueError(f"unknown optimizer(s) {', '.join(unknown)}; choose from {', '.join(makers)}")
    final: Dict[str, Dict] = {}
    with StudyWriter(out, "optimizers", task.name, seed, size, asdict(cfg)) as w, \
            bar(len(cfg.optimizers) * cfg.steps, f"optimizers {task.name}", quiet) as progress:
        for name in cfg.optimizers:
            loss, ratios = _train(name, makers[name], task, cfg, seed, w, progress)
            finite = [r for r in ratios if math.isfinite(r)]
            final[name] = {"final_loss": num(loss), "median_ratio": num(float(np.median(finite))) if finite else None}
        summary = {"batch_size": min(cfg.batch_size, task.size // 2), "steps": cfg.steps, "optimizers": final}
        w.write("summary", **summary)
    return summary
