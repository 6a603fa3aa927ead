"""``gradnoise probe --task SPEC``: the branch probe (:func:`gradnoise.probe`) on a task.

The task's data (:mod:`gradnoise.studies.task`) is split, seeded, into the samples the
model trains and branches on and a held-out sixth the branches' loss is measured on. The
model is the task's; the optimizer is SGD (learning rate 0.1) or AdamW (1e-3). The probe
runs at a checkpoint of the user's loop (``--checkpoint``), or after ``--train-steps`` of
training at the base batch from the initial weights, so that it does not measure the
initialisation, where the critical batch is near zero.

The checkpoint is :mod:`gradnoise.control.checkpoint`'s (``gradnoise.save_checkpoint``
writes one from a training loop): the task's model, an optimizer over
``model.parameters()`` in that order of the class ``--optimizer`` names. Everything is checked before any
training step runs: the checkpoint against the model and the optimizer (the first key
that does not match is named), and the batch sizes and budget against the data
(:func:`gradnoise.control.probe.plan`); an error is one ``ValueError`` line.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..control.checkpoint import read_checkpoint
from ..control.probe import lr_rule_for, plan, probe
from ..formats import write_probe
from ..numbers import DASH, fmt_count, fmt_factor_interval, fmt_lr, fmt_num, fmt_share, fmt_with_interval
from .task import Task, load

HELD_OUT = 6                  # one sample in this many is held out
LRS = {"sgd": 0.1, "adamw": 1e-3}
BASE_BATCH = 32
TRAIN_STEPS = 100             # from the initial weights, when there is no checkpoint
# Group entries that are implementation switches, or absent in older torch versions: a
# checkpoint need not have them (torch fills them in when it loads the state).
FLAGS = frozenset({"params", "foreach", "fused", "capturable", "differentiable", "maximize",
                   "decoupled_weight_decay"})


@dataclass(frozen=True)
class Config:
    """The options of ``gradnoise probe`` (``None``: the default described)."""

    task: str
    checkpoint: Optional[str] = None
    batch_sizes: Optional[Sequence[int]] = None   # default: base batch × ½ … 16
    seeds: int = 3
    budget: Optional[int] = None                  # default: 64 base batches
    base_batch: int = BASE_BATCH
    optimizer: str = "sgd"
    lr: Optional[float] = None                    # default: LRS, or the checkpoint's
    train_steps: Optional[int] = None             # default: TRAIN_STEPS, 0 from a checkpoint
    lr_grid: Sequence[float] = (1.0,)
    seed: int = 0
    out: str = "gradnoise-report"
    quiet: bool = False


@dataclass
class Prepared:
    """Everything checked and built, nothing trained yet."""

    task: Task
    model: nn.Module
    optimizer: torch.optim.Optimizer
    train: Tuple[torch.Tensor, torch.Tensor]
    held_out: Tuple[torch.Tensor, torch.Tensor]
    step: Optional[int]        # the checkpoint's step (0 from the initial weights)
    train_steps: int


def _shape(t: Any) -> List[int]:
    return list(t.shape)


def check_model_state(model: nn.Module, state: Mapping[str, Any], where: str) -> None:
    """Refuse a state dict that is not ``model``'s: the first missing key, unexpected key
    or shape mismatch is named."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    more = lambda keys: f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""  # noqa: E731
    if missing:
        raise ValueError(f"{where}: the model's {missing[0]!r} is missing from the checkpoint{more(missing)}")
    if unexpected:
        raise ValueError(f"{where}: the checkpoint has {unexpected[0]!r}, which the model does not{more(unexpected)}")
    for k, v in own.items():
        saved = state[k]
        if not torch.is_tensor(saved):
            raise ValueError(f"{where}: the checkpoint's {k!r} is a {type(saved).__name__}, not a tensor")
        if saved.shape != v.shape:
            raise ValueError(f"{where}: {k!r} has shape {_shape(saved)} in the checkpoint but {_shape(v)} in the model")


def check_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, state: Mapping[str, Any],
                          where: str) -> None:
    """Refuse an optimizer state dict that ``optimizer`` cannot continue from: other
    groups or group sizes, hyper-parameters of another optimizer class, state tensors
    whose shape is not their parameter's."""
    name = type(optimizer).__name__
    groups, saved = optimizer.param_groups, state.get("param_groups")
    if not (isinstance(saved, list) and isinstance(state.get("state"), Mapping)
            and all(isinstance(g, Mapping) and isinstance(g.get("params"), list) for g in saved)):
        raise ValueError(f"{where}: the optimizer entry is not an optimizer's state_dict()")
    sizes, own_sizes = [len(g["params"]) for g in saved], [len(g["params"]) for g in groups]
    if sizes != own_sizes:
        raise ValueError(f"{where}: the checkpoint's optimizer has parameter groups of {sizes} tensors, the "
                         f"{name} over this model {own_sizes}")
    for i, (g, own) in enumerate(zip(saved, groups)):
        lacking = sorted(set(own) - set(g) - FLAGS)
        if lacking:
            hint = (" (an Adam-type optimizer's: --optimizer adamw?)" if "betas" in g else
                    " (SGD's: --optimizer sgd?)" if "momentum" in g else "")
            raise ValueError(f"{where}: the checkpoint's optimizer state is not a {name}'s{hint}: its group {i} "
                             f"lacks {lacking[0]!r}")
    names = {id(p): n for n, p in model.named_parameters()}
    params = {pid: p for g, own in zip(saved, groups) for pid, p in zip(g["params"], own["params"])}
    for pid, entries in state["state"].items():
        if pid not in params:
            raise ValueError(f"{where}: the checkpoint's optimizer holds state for parameter {pid!r}, which its "
                             "groups do not list")
        p = params[pid]
        for key, v in (entries.items() if isinstance(entries, Mapping) else ()):
            if torch.is_tensor(v) and v.dim() > 0 and v.shape != p.shape:
                raise ValueError(f"{where}: the optimizer's {key!r} of {names.get(id(p), 'a parameter')!r} has shape "
                                 f"{_shape(v)} in the checkpoint but the parameter {_shape(p)}")


def make_optimizer(name: str, model: nn.Module, lr: Optional[float]) -> torch.optim.Optimizer:
    """``sgd`` (plain, no momentum) or ``adamw`` over ``model.parameters()``."""
    if name not in LRS:
        raise ValueError(f"optimizer must be one of {', '.join(LRS)}, got {name!r}")
    cls = torch.optim.SGD if name == "sgd" else torch.optim.AdamW
    return cls(model.parameters(), lr=LRS[name] if lr is None else lr)


def split(n: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(train, held_out)`` indices: a seeded ``1/HELD_OUT`` of ``range(n)`` held out."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = max(1, n // HELD_OUT)
    return perm[k:], perm[:k]


def prepare(cfg: Config) -> Prepared:
    """Load the task, split it, build the model and optimizer, check the probe's plan and
    load the checkpoint. ``ValueError`` (one line) on any bad input; nothing trains."""
    task = load(cfg.task, cfg.seed)
    tr, te = split(task.size, cfg.seed)
    train, held_out = (task.x[tr], task.y[tr]), (task.x[te], task.y[te])
    model = task.fresh_model()
    optimizer = make_optimizer(cfg.optimizer, model, cfg.lr)
    rule = lr_rule_for(optimizer)
    plan(cfg.base_batch, len(tr), cfg.batch_sizes, cfg.budget, cfg.seeds, rule, cfg.seed, cfg.lr_grid)
    step = 0
    if cfg.checkpoint is not None:
        where = f"checkpoint {cfg.checkpoint} (task {task.name})"
        ckpt = read_checkpoint(cfg.checkpoint)
        check_model_state(model, ckpt["model"], where)
        check_optimizer_state(optimizer, model, ckpt["optimizer"], where)
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except Exception as e:  # noqa: BLE001 - what the checks above did not foresee
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise ValueError(f"{where}: cannot be loaded ({type(e).__name__}: {first})") from None
        if cfg.lr is not None:
            for g in optimizer.param_groups:
                g["lr"] = cfg.lr
        step = ckpt.get("step")
    steps = cfg.train_steps if cfg.train_steps is not None else (0 if cfg.checkpoint else TRAIN_STEPS)
    return Prepared(task, model, optimizer, train, held_out, step, steps)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, data: Tuple[torch.Tensor, torch.Tensor], loss_fn,
          batch: int, steps: int, seed: int) -> None:
    """``steps`` steps of ``batch`` samples drawn without replacement (seeded)."""
    x, y = data
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randperm(len(x), generator=gen)[:batch]
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x[idx]), y[idx])
        if not math.isfinite(float(loss.detach())):
            raise ValueError("the training loss stopped being finite before the probe: lower --lr")
        loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run(cfg: Config) -> Tuple[Dict[str, Any], str]:
    """Check, train to the branch point, probe, write ``out/probe-<task>.json``; returns
    the probe document and the file's path."""
    p = prepare(cfg)
    train(p.model, p.optimizer, p.train, p.task.loss_fn, cfg.base_batch, p.train_steps, cfg.seed)
    step = None if p.step is None else p.step + p.train_steps
    doc = probe(p.model, p.optimizer, p.train, p.task.loss_fn, held_out=p.held_out, base_batch=cfg.base_batch,
                batch_sizes=cfg.batch_sizes, budget=cfg.budget, seeds=cfg.seeds, lr_grid=tuple(cfg.lr_grid),
                seed=cfg.seed, step=step, task=p.task.name, quiet=cfg.quiet)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    return doc, write_probe(Path(cfg.out) / f"probe-{p.task.name}.json", doc)


def _value(value: Any, iv: Any, reason: Optional[str]) -> str:
    text = fmt_with_interval(value, iv)
    return f"{text} ({reason})" if text == DASH and reason else text


def summary_lines(doc: Dict[str, Any]) -> List[str]:
    """The probe's readings for a terminal: both branch values and both proxies with
    their 95 % intervals, the ratios, the wall time."""
    mc, me, px, opt = doc["mccandlish"], doc["merrill"], doc["proxy"], doc["optimizer"]
    pre_reason = None if opt.get("family") == "adam" else f"only for Adam-family optimizers, not {opt['class']}"
    rows = [("branch B_crit (McCandlish's B_noise)", _value(mc["b_noise"], mc["interval"], mc.get("reason"))),
            (f"Merrill's B_crit (within {fmt_share(me['tolerance'])})",
             _value(me["b_crit"], me["interval"], me.get("reason"))),
            ("B_simple, raw", _value(px["b_simple"], px["b_simple_interval"], None)),
            ("B_simple, preconditioned", _value(px["preconditioned"], px["preconditioned_interval"], pre_reason)),
            ("branch B_crit / raw B_simple", fmt_factor_interval(px["ratio"], px["ratio_interval"]))]
    if px.get("preconditioned") is not None:
        rows.append(("branch B_crit / preconditioned", fmt_factor_interval(px["preconditioned_ratio"],
                                                               px["preconditioned_ratio_interval"])))
    rows.append(("wall time", f"{fmt_num(doc['seconds'])} s"))
    width = max(len(label) for label, _ in rows) + 2
    return [f"gradnoise probe: {doc['task']} at step {fmt_count(doc['checkpoint']['step'])} (held-out loss "
            f"{fmt_num(doc['checkpoint']['loss'])}), {opt['class']} lr {fmt_lr(doc['lr'])}, base batch "
            f"{doc['base_batch']}; batch sizes {', '.join(fmt_count(b) for b in doc['batch_sizes'])} × "
            f"{doc['seeds']} seeds, {fmt_count(doc['budget'])} samples each"
            ] + [f"  {label:<{width}}{value}" for label, value in rows]


__all__ = ["Config", "check_model_state", "check_optimizer_state", "prepare", "run",
           "split", "summary_lines", "train"]
