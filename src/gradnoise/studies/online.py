"""Study ``online``: learning from a drifting stream one sample at a time — how noisy is
each update, and how much is forgotten?

Data. A stratified ``test_fraction`` of the task's samples is held out; the rest feeds a
stream. The classes (sorted) are cut into ``phases`` groups ``G_1 … G_P`` of consecutive
classes; in phase ``p`` (``phase_samples`` stream samples) each stream sample's class is
drawn with probability ``focus/|G_p|`` for a class of ``G_p`` and
``(1 − focus)/(C − |G_p|)`` for every other class, then a training sample of that class
uniformly (with replacement). So the class proportions shift from group to group, the
earlier classes never vanish entirely (unless ``focus = 1``), and within a phase the
stream is i.i.d. Every method sees the same stream for a given seed, from the same
initial weights (the task's model: seeds vary the stream, not the initialisation).

Methods (``METHODS``):

* ``SGD B=1`` — plain SGD, one sample per update, rate ``sgd_lr``;
* ``SGD B=<b>`` — plain SGD on consecutive mini-batches of ``minibatch`` stream samples,
  rate ``minibatch_lr`` (``None``: ``minibatch × sgd_lr``, the linear scaling rule, the
  same expected movement per stream sample as SGD B=1, so that what differs is the
  noise);
* ``Adam B=1`` — Adam, one sample per update, rate ``adam_lr``;
* ``averaged SGD`` — SGD B=1 whose *evaluated* weights are the Polyak–Ruppert average
  ``θ̄_n = (1/n) Σ_{j≤n} θ_j`` of all iterates since the stream began, kept as the
  running mean ``θ̄_n = θ̄_{n−1} + (θ_n − θ̄_{n−1})/n`` (what
  :class:`torch.optim.swa_utils.AveragedModel` computes, at a fraction of its cost). The
  average weighs every iterate since the start alike, so under drift it lags: it keeps
  the earlier classes and learns the current ones late (read its forgetting beside its
  accuracy on the current classes).

Every ``eval_every`` stream samples (a checkpoint), for each method:

* the window noise (:class:`gradnoise.monitor.window.WindowNoise`): the last ``window``
  stream samples re-evaluated at the *current* iterate ``θ_t`` — unbiased ``tr(Σ)``,
  ``|G|²`` and ``B_simple = tr(Σ)/|G|²`` of the recent stream at the weights the next
  gradient is taken at;
* the update noise ``E||u − E u||²`` of the next update ``u`` of the evaluated weights
  and its signal ``|E u|²``: for SGD at batch ``B``, ``lr²·tr(Σ)/B`` and ``lr²·|G|²``
  (exact consequences of the window estimates); for Adam, measured: from a frozen copy of
  the model and the optimizer state, each window sample gets one B = 1 Adam step and
  over those ``n`` updates ``noise = tr Cov(u)`` (unbiased) and ``signal = |ū|² −
  noise/n`` (as in the ``optimizers`` study); Adam's update carries its momentum
  ``β₁·m``, the same for every draw, so only ``(1 − β₁)`` of the gradient is new: its
  noise-to-signal ratio is that of the whole step, not of the gradient. For averaged SGD,
  whose average moves by ``(θ_{n+1} − θ̄_n)/(n+1) = (θ_n − θ̄_n − lr·g)/(n+1)``, the same
  draws (noise ``lr²·tr(Σ)/(n+1)²``; the signal holds the pull ``θ_n − θ̄_n`` towards
  the iterate). ``iterate_update_noise`` is the noise of the iterate's own step (for
  averaged SGD ``lr²·tr(Σ)``, for the others the update noise itself);
* test accuracy on the classes of the current phase's group (``acc_current``), on the
  classes of all earlier groups together (``acc_earlier``, none in phase 1), on all
  classes, and per group;
* forgetting: for each earlier group ``j``, the best test accuracy on ``G_j`` at any
  checkpoint so far minus the accuracy now, averaged over the earlier groups (Chaudhry
  et al. 2018's average forgetting; ≥ 0 by construction).

Over ``seeds`` seeds (stream order and sampling), each run's final numbers and its mean
over checkpoints are summarised as means with 95 % t-intervals.

The stream, the methods and the update draws are in :mod:`gradnoise.studies.online_parts`.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..monitor.window import WindowNoise
from ..numbers import fmt_num, fmt_with_interval
from ..stats.intervals import mean_interval
from .online_parts import Method, accuracies, groups_of, lr_of, split, stream, update_draws
from .output import StudyWriter, num
from .progress import bar
from .task import Task


def method_names(minibatch: int) -> Tuple[str, ...]:
    """The methods' names for a mini-batch of ``minibatch`` samples."""
    return ("SGD B=1", f"SGD B={minibatch}", "Adam B=1", "averaged SGD")


METHODS = method_names(8)
BUILTIN = ("sgd1", "sgdb", "adam", "avg")


@dataclass
class OnlineConfig:
    methods: List[str] = field(default_factory=lambda: list(BUILTIN))  # sgd1, sgdb, adam, avg
    phases: int = 5              # class groups, one per phase of the stream
    phase_samples: int = 600     # stream samples per phase
    focus: float = 0.9           # share of a phase's samples from its own group
    test_fraction: float = 0.3
    minibatch: int = 8
    sgd_lr: float = 0.05         # SGD B=1 and averaged SGD
    minibatch_lr: Optional[float] = 0.2   # SGD B=minibatch (None: minibatch × sgd_lr; on digits-mlp that 0.4
    #                                      reached 0.70 on the current classes, 0.2 reached 0.95)
    adam_lr: float = 1e-3
    window: int = 64
    eval_every: int = 120        # stream samples between checkpoints (a multiple of minibatch)
    seeds: int = 3

    @classmethod
    def for_size(cls, size: str) -> "OnlineConfig":
        """``"tiny"`` (about 5 s on digits-mlp with 2 CPU threads) or the default (about 32 s)."""
        if size == "tiny":
            return cls(phases=3, phase_samples=160, window=32, eval_every=80, seeds=2)
        return cls()


# ------------------------------------------------------------------------------ data
def _check_config(cfg: OnlineConfig) -> None:
    """ValueError on options the study cannot use, whatever the task."""
    for name in ("phases", "phase_samples", "minibatch", "window", "eval_every", "seeds"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {v!r}")
    unknown = [m for m in cfg.methods if m not in BUILTIN]
    if not cfg.methods or len(set(cfg.methods)) != len(cfg.methods):
        raise ValueError(f"methods must be a non-empty list without repeats, got {cfg.methods}")
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(BUILTIN)} "
                         f"({', '.join(method_names(cfg.minibatch))})")
    if cfg.phases < 2:
        raise ValueError(f"phases must be at least 2 (a drift needs two), got {cfg.phases}")
    if not 0.0 < cfg.focus <= 1.0 or not 0.0 < cfg.test_fraction < 1.0:
        raise ValueError(f"focus must be in (0, 1] and test_fraction in (0, 1), got {cfg.focus}, {cfg.test_fraction}")
    if cfg.window < 2 or cfg.minibatch < 1 or cfg.seeds < 1 or cfg.phase_samples < 1:
        raise ValueError(f"window must be ≥ 2 and minibatch, seeds and phase_samples ≥ 1, got window={cfg.window}, "
                         f"minibatch={cfg.minibatch}, seeds={cfg.seeds}, phase_samples={cfg.phase_samples}")
    for name in ("sgd_lr", "minibatch_lr", "adam_lr"):
        v = getattr(cfg, name)
        if v is None and name == "minibatch_lr":
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    if cfg.eval_every < 1 or cfg.eval_every % cfg.minibatch or cfg.phase_samples % cfg.eval_every:
        raise ValueError(f"eval_every ({cfg.eval_every}) must be a multiple of minibatch ({cfg.minibatch}) and "
                         f"divide phase_samples ({cfg.phase_samples})")


def fits(task: Task, cfg: OnlineConfig, seed: int = 0) -> Optional[str]:
    """Why the study cannot run on ``task`` (None: it can), from its labels and class
    sizes alone, before anything runs: labels that are not classes, fewer classes than
    phases (one group of classes per phase), or a class too small to give both the
    stream and the test a sample. (``seed``: the registry's signature; unused.)"""
    y = task.y
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
        return (f"the online study needs integer class labels y of shape [N]; task {task.name!r} has "
                f"y of dtype {y.dtype} and shape {list(y.shape)}")
    labels, counts = torch.unique(y, return_counts=True)
    if cfg.phases > len(labels):
        return (f"its {cfg.phases} phases need at least {cfg.phases} classes (one group each); task {task.name!r} "
                f"has {len(labels)}")
    small = [int(c) for c, n in zip(labels, counts) if n < 2]
    if small:
        return f"class(es) {small} have fewer than 2 samples: none is left for the stream or the test"
    return None


def _check(task: Task, cfg: OnlineConfig) -> List[int]:
    """The sorted class labels; ValueError on a task or config the study cannot use."""
    _check_config(cfg)
    why = fits(task, cfg)
    if why is not None:
        raise ValueError(why)
    return sorted(int(c) for c in torch.unique(task.y))


def _pooled(acc: List[Optional[float]], counts: List[int], which: List[int]) -> Optional[float]:
    """Accuracy over the test samples of the groups ``which`` together."""
    pairs = [(acc[j], counts[j]) for j in which if acc[j] is not None]
    n = sum(c for _, c in pairs)
    return sum(a * c for a, c in pairs) / n if n else None


def _checkpoint(m: Method, task: Task, meter: WindowNoise, test: torch.Tensor, groups, counts,
                best: List[float], position: int, phase: int) -> Dict[str, Any]:
    acc = accuracies(m.evaluated, task, test, groups)
    for j, a in enumerate(acc):
        if a is not None:
            best[j] = max(best[j], a)
    earlier = [j for j in range(phase) if acc[j] is not None]
    forgetting = float(np.mean([best[j] - acc[j] for j in earlier])) if earlier else None
    w = meter.measure(lr=m.lr, batch_size=m.batch)
    signal = m.lr ** 2 * w.grad_sq_norm
    noise, how = w.update_noise, "lr²·trΣ/B"
    iterate = w.update_noise_at(m.lr, m.batch)
    if m.key in ("adam", "avg"):
        xs, ys = meter.samples()
        noise, signal = update_draws(m, task, xs, ys)
        how = "draws"
        iterate = noise if m.key == "adam" else iterate
    return {"position": position, "phase": phase, "step": m.steps, "acc_groups": [num(a) for a in acc],
            "acc_current": num(acc[phase]), "acc_earlier": num(_pooled(acc, counts, list(range(phase)))),
            "acc_all": num(_pooled(acc, counts, list(range(len(groups))))), "forgetting": num(forgetting),
            "window": w.n, "trace_cov": num(w.trace_cov), "grad_sq_norm": num(w.grad_sq_norm),
            "b_simple": num(w.b_simple), "window_flag": w.flag, "update_noise": num(noise),
            "update_signal": num(signal), "update_noise_method": how,
            "iterate_update_noise": num(iterate)}


def _run_one(key: str, name: str, task: Task, cfg: OnlineConfig, order: torch.Tensor, test, groups, counts,
             seed: int, w: StudyWriter, progress) -> Dict[str, Any]:
    t0 = time.perf_counter()
    m = Method(key, task, cfg)
    meter = WindowNoise(m.model, task.loss_fn, window=cfg.window)
    best = [-math.inf] * len(groups)
    rows = []
    for start in range(0, len(order) - m.batch + 1, m.batch):
        idx = order[start:start + m.batch]
        m.update(task, idx)
        meter.push(task.x[idx], task.y[idx])
        position = start + m.batch
        if position % cfg.eval_every == 0:
            phase = min((position - 1) // cfg.phase_samples, len(groups) - 1)
            row = _checkpoint(m, task, meter, test, groups, counts, best, position, phase)
            w.write("checkpoint", method=name, seed=seed, **row)
            rows.append(row)
            progress.update(1)
    last = rows[-1]
    run = {"method": name, "seed": seed, "seconds": time.perf_counter() - t0, "steps": m.steps,
           **{k: last[k] for k in ("acc_current", "acc_earlier", "acc_all", "forgetting", "acc_groups")},
           **_run_means(rows)}
    w.write("run", **run)
    return run


def _ratio(num_: List[Optional[float]], den: List[Optional[float]]) -> Optional[float]:
    """``Σ num / Σ den`` over the checkpoints where both are defined (None when ``Σ den ≤ 0``)."""
    pairs = [(a, b) for a, b in zip(num_, den) if a is not None and b is not None]
    d = sum(b for _, b in pairs)
    return sum(a for a, _ in pairs) / d if pairs and d > 0 else None


def _run_means(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """A run's means over its checkpoints; ratios as ratios of sums (DESIGN.md §1: never
    an average of noisy ratios)."""
    def mean(k):
        vals = [r[k] for r in rows if r[k] is not None]
        return float(np.mean(vals)) if vals else None

    return {"mean_trace_cov": mean("trace_cov"), "mean_update_noise": mean("update_noise"),
            "mean_iterate_update_noise": mean("iterate_update_noise"),
            "b_simple": _ratio([r["trace_cov"] for r in rows], [r["grad_sq_norm"] for r in rows]),
            "noise_to_signal": _ratio([r["update_noise"] for r in rows], [r["update_signal"] for r in rows])}


# ----------------------------------------------------------------------------- study
def run(task: Task, out, seed: int = 0, size: str = "default", quiet: bool = False,
        config: OnlineConfig = None) -> dict:
    """Run the study; writes ``online-<task>.jsonl``; returns the summary.

    Lines: ``phase`` (the groups and each phase's class counts in the stream of seed
    ``seed``), ``checkpoint`` (per method, seed and checkpoint: the fields of the module
    docstring), ``run`` (per method and seed: final accuracies and forgetting, means over
    checkpoints) and ``summary``.

    Summary keys:
        ``groups`` (class lists), ``phases``, ``phase_samples``, ``stream_samples``,
        ``focus``, ``window``, ``minibatch``, ``test_size``, ``seeds``, and ``methods``:
        name -> {``acc_current``, ``acc_earlier``, ``acc_all``, ``forgetting`` (final
        values), ``mean_trace_cov``, ``mean_update_noise``, ``mean_iterate_update_noise``,
        ``b_simple`` (Σ tr(Σ)/Σ |G|² over checkpoints), ``noise_to_signal`` (Σ update
        noise / Σ update signal), ``seconds``: each ``{"mean", "interval", "n"}`` over
        seeds (:func:`gradnoise.stats.intervals.mean_interval`, low end clipped at 0, high
        end at 1 for accuracies and forgetting);
        ``lr``, ``batch``, ``update_noise_method``, ``runs``}.

    Raises:
        ValueError: labels that are not integer classes ``[N]``, an unknown method, or
            options the data cannot meet (see :func:`_check`).
    """
    cfg = config or OnlineConfig.for_size(size)
    classes = _check(task, cfg)
    names = dict(zip(BUILTIN, method_names(cfg.minibatch)))
    gen = torch.Generator().manual_seed(seed)
    train, test = split(task.y, classes, cfg.test_fraction, gen)
    groups = groups_of(classes, cfg.phases)
    counts = [int(torch.isin(task.y[test], torch.tensor(g, dtype=task.y.dtype)).sum()) for g in groups]
    total = cfg.phases * cfg.phase_samples
    per_run = total // cfg.eval_every
    rows: Dict[str, List[Dict[str, Any]]] = {names[k]: [] for k in cfg.methods}
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # torch's one-off optimizer import, untimed
    with StudyWriter(out, "online", task.name, seed, size, asdict(cfg)) as w, \
            bar(len(cfg.methods) * cfg.seeds * per_run, f"online {task.name}", quiet) as progress:
        for r in range(cfg.seeds):
            order = stream(task.y, train, classes, groups, cfg, torch.Generator().manual_seed(seed + 1000 + r))
            if r == 0:
                for p, g in enumerate(groups):
                    part = task.y[order[p * cfg.phase_samples:(p + 1) * cfg.phase_samples]]
                    w.write("phase", phase=p, classes=g, counts={str(c): int((part == c).sum()) for c in classes})
            for key in cfg.methods:
                rows[names[key]].append(_run_one(key, names[key], task, cfg, order, test, groups, counts, seed + r,
                                                 w, progress))
        summary = _summary(rows, cfg, groups, len(test), names)
        w.write("summary", **summary)
    return summary


SUMMARY_KEYS = ("acc_current", "acc_earlier", "acc_all", "forgetting", "mean_trace_cov", "mean_update_noise",
                "mean_iterate_update_noise", "b_simple", "noise_to_signal", "seconds")


UNIT_KEYS = ("acc_current", "acc_earlier", "acc_all", "forgetting")   # quantities in [0, 1]


def _bounded(part: Dict[str, Any], key: str) -> Dict[str, Any]:
    """A summary interval clipped to its quantity's domain (accuracies and forgetting ≤ 1)."""
    if key in UNIT_KEYS and math.isfinite(part["interval"][1]):
        part["interval"] = [part["interval"][0], min(part["interval"][1], 1.0)]
    return part


def _summary(rows, cfg: OnlineConfig, groups, test_size: int, names) -> dict:
    keys = {v: k for k, v in names.items()}
    methods = {}
    for name, runs in rows.items():
        key = keys[name]
        methods[name] = {k: _bounded(mean_interval([r[k] for r in runs], lower=0.0), k) for k in SUMMARY_KEYS}
        methods[name].update({
            "lr": lr_of(key, cfg),
            "batch": cfg.minibatch if key == "sgdb" else 1, "runs": len(runs),
            "update_noise_method": "draws" if key in ("adam", "avg") else "lr²·trΣ/B"})
    return {"groups": groups, "phases": cfg.phases, "phase_samples": cfg.phase_samples,
            "stream_samples": cfg.phases * cfg.phase_samples, "focus": cfg.focus, "window": cfg.window,
            "minibatch": cfg.minibatch, "test_size": test_size, "seeds": cfg.seeds, "methods": methods}


def summary_line(s: dict) -> str:
    """One line for the end of ``gradnoise study``: final accuracy on the current and the
    earlier classes, forgetting, and the update noise-to-signal ratio per method."""
    parts = []
    for name, m in (s.get("methods") or {}).items():
        def mi(k):
            part = m.get(k) or {}
            return fmt_with_interval(part.get("mean"), part.get("interval"), digits=2)
        parts.append(f"{name}: acc now/earlier {fmt_num((m.get('acc_current') or {}).get('mean'), 2)}/"
                     f"{fmt_num((m.get('acc_earlier') or {}).get('mean'), 2)}, forgetting {mi('forgetting')}, "
                     f"update noise/signal {mi('noise_to_signal')}")
    return f"drifting stream of {s.get('stream_samples')} samples in {s.get('phases')} phases: " + "; ".join(parts)
