"""One branch of training: a copy of the model and its optimizer state, trained for a few
steps at one batch size on fresh batches, its held-out loss followed along the way.

The parent is never touched: the branch trains deep copies (the optimizer's state
included, copied before it is loaded), and its random numbers (batches, dropout) come from
its own seed inside :func:`torch.random.fork_rng`, so the parent's generators continue as
if no branch had run.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Data = Tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class BranchSpec:
    """One branch: batch size, seed, learning-rate multiplier and its most steps; with a
    ``target`` it stops once its held-out loss is at most that and it has used ``budget``
    samples."""

    batch_size: int
    seed: int
    lr_factor: float
    steps: int
    target: float = math.nan
    budget: int = 0
    multiplier: float = 1.0   # of the rule's learning rate (a per-branch grid)


def copy_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, twin: nn.Module) -> torch.optim.Optimizer:
    """An optimizer of ``optimizer``'s class over ``twin``'s parameters (``twin`` a deep
    copy of ``model``) with the same groups, hyper-parameters and a copy of its state."""
    index = {id(p): i for i, p in enumerate(model.parameters())}
    params = list(twin.parameters())
    groups = []
    for g in optimizer.param_groups:
        missing = [p for p in g["params"] if id(p) not in index]
        if missing:
            raise ValueError(f"the optimizer holds {len(missing)} parameter(s) that are not the model's: "
                             "its state cannot be copied onto a branch")
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": [params[index[id(p)]] for p in g["params"]]})
    try:  # every hyper-parameter is in the groups; a constructor may still insist on lr
        try:
            twin_opt = type(optimizer)(groups)
        except TypeError:
            twin_opt = type(optimizer)(groups, lr=optimizer.defaults["lr"])
        twin_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    except Exception as e:  # noqa: BLE001 - any optimizer class: say which could not be copied
        raise ValueError(f"the state of {type(optimizer).__name__} cannot be copied onto a branch "
                         f"({type(e).__name__}: {e})") from None
    return twin_opt


def held_out_loss(model: nn.Module, data: Data, loss_fn: LossFn, chunk: int = 1024) -> float:
    """The mean loss over ``data`` in evaluation mode (the model's mode restored)."""
    x, y = data
    was = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            total += float(loss_fn(model(x[i:i + chunk]), y[i:i + chunk])) * len(x[i:i + chunk])
    model.train(was)
    return total / len(x)


def run_branch(spec: BranchSpec, model: nn.Module, optimizer: torch.optim.Optimizer, train: Data, held_out: Data,
               loss_fn: LossFn, evals: int = 16, start: Optional[float] = None) -> Tuple[List[List[float]], bool]:
    """Train a copy for ``spec.steps`` steps of ``spec.batch_size`` samples drawn without
    replacement from ``train``, learning rates times ``spec.lr_factor``.

    Returns ``(curve, diverged)``: ``curve`` ``[[samples, steps, held-out loss], …]`` at
    the checkpoint (``start`` when the caller has it), about ``evals`` evenly spaced steps and the last (or where it reached
    its target past its budget); ``diverged`` when the training loss stopped being finite
    (the branch stops there)."""
    twin = copy.deepcopy(model).train()
    opt = copy_optimizer(optimizer, model, twin)
    for g in opt.param_groups:
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].mul_(spec.lr_factor)
        else:
            g["lr"] = g["lr"] * spec.lr_factor
    x, y = train
    b, every = spec.batch_size, max(1, spec.steps // evals)
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    curve = [[0.0, 0.0, held_out_loss(twin, held_out, loss_fn) if start is None else start]]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(spec.seed)
        gen = torch.Generator().manual_seed(spec.seed)
        for step in range(1, spec.steps + 1):
            idx = torch.randperm(len(x), generator=gen)[:b].to(x.device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(twin(x[idx]), y[idx])
            if not math.isfinite(float(loss.detach())):
                curve.append([float(step * b), float(step), math.nan])
                return curve, True
            loss.backward()
            opt.step()
            if step % every == 0 or step == spec.steps:
                curve.append([float(step * b), float(step), held_out_loss(twin, held_out, loss_fn)])
                if curve[-1][2] <= spec.target and step * b >= spec.budget:
                    break
    return curve, False


__all__ = ["BranchSpec", "copy_optimizer", "held_out_loss", "run_branch"]
