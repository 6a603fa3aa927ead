"""Study ``trajectory``: the noise along an ordinary SGD run.

Trains with plain SGD and a :class:`gradnoise.NoiseMonitor` (per-sample source) that
measures every ``every``-th step, writing its standard run file
``trajectory-<task>.run.jsonl`` (format ``gradnoise-run``): ``tr(Σ)``, ``|G|²`` and
``B_simple = tr(Σ)/|G|²``, raw and smoothed, total and per parameter, with the 95 %
interval of the smoothed ``B_simple``. The study file beside it holds the loss of every
step and the full-data loss every ``eval_every`` steps. McCandlish et al. (2018, §3)
report that ``|G|²`` falls faster than ``tr(Σ)`` as the loss falls, so that the noise
scale — the batch size worth using — grows during training; this study shows whether
it does on your task.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..monitor import NoiseMonitor
from ..monitor.sinks import JsonlSink
from .output import StudyWriter, num
from .progress import bar
from .task import Task
from .training import batches, full_loss, sgd_step


@dataclass
class TrajectoryConfig:
    batch_size: int = 32
    lr: float = 0.1
    steps: int = 600
    every: int = 2        # measure every k-th step
    eval_every: int = 25  # full-data loss every k steps
    beta: float = 0.95

    @classmethod
    def for_size(cls, size: str) -> "TrajectoryConfig":
        return cls(steps=40, every=2, eval_every=10) if size == "tiny" else cls()


def run(task: Task, out, seed: int = 0, size: str = "default", quiet: bool = False,
        config: TrajectoryConfig = None) -> dict:
    """Run the study; writes ``trajectory-<task>.jsonl`` and the monitor's
    ``trajectory-<task>.run.jsonl`` in ``out``; returns the summary."""
    cfg = config or TrajectoryConfig.for_size(size)
    model = task.fresh_model()
    gen = torch.Generator().manual_seed(seed)
    run_name = f"trajectory-{task.name}.run.jsonl"
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    first = last = None
    loss = math.nan
    it = batches(task.size, min(cfg.batch_size, task.size // 2), gen)  # small data sets: half of it
    with StudyWriter(out, "trajectory", task.name, seed, size, {**asdict(cfg), "run_file": run_name}) as w, \
            bar(cfg.steps, f"trajectory {task.name}", quiet) as progress:
        # the run file is staged with the study file: a failed run leaves the old pair
        monitor = NoiseMonitor(model, source="per_sample", sinks=[JsonlSink(w.companion(run_name))],
                               every=cfg.every, beta=cfg.beta, optimizer=opt)
        try:
            for step in range(cfg.steps):
                loss = sgd_step(model, opt, task, next(it), monitor)
                rec = monitor.last if monitor.last is not None and monitor.last.step == step else None
                if rec is not None and math.isfinite(rec.smoothed.b_simple):
                    # the first value worth quoting: the first with a bounded interval
                    first = first or (rec if math.isfinite(rec.b_simple_interval[1]) else None)
                    last = rec
                ev = full_loss(model, task) if step % cfg.eval_every == 0 or step == cfg.steps - 1 else None
                w.write("step", step=step, loss=num(loss), full_loss=num(ev))
                progress.update(1)
        finally:
            monitor.close()
        summary = {
            "final_loss": num(full_loss(model, task)),
            "b_simple_first": num(first.smoothed.b_simple) if first else None,
            "b_simple_first_step": first.step if first else None,
            "b_simple_first_interval": list(first.b_simple_interval) if first else [math.nan, math.nan],
            "b_simple_last": num(last.smoothed.b_simple) if last else None,
            "b_simple_interval": list(last.b_simple_interval) if last else [math.nan, math.nan],
        }
        w.write("summary", **summary)
    return summary
