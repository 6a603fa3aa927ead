"""Overhead of ``gradnoise.NoiseMonitor`` in a training loop, against the same loop without it.

    python benchmarks/monitor_overhead.py [--repeats N] [--models M1,M2] [--json PATH] [--ddp]

For each reference model (benchmarks/models.py) every loop trains its own copy of the same
weights on the same fixed batch with SGD. A *plain* step is

    zero_grad -> forward -> mean cross-entropy -> backward -> optimizer.step()

and a monitored step adds ``monitor.step()`` between backward and ``optimizer.step()``.
Cases, each a monitored loop next to a plain loop of the same shape:

* ``microbatch``: ``source="microbatch"``, the batch split in 2 equal micro-batches (two
  forward/backward passes per step, each loss the micro-batch mean times 1/2), against
  plain with the same 2 micro-batches;
* ``per_sample every=1``: ``source="per_sample"``, every step measured, one pass per step;
* ``per_sample every=10``: ``source="per_sample", every=10``; the unit timed is a window of
  10 consecutive steps (exactly one of them measured), reported per step, against a
  plain window of 10 steps;
* ``adam10``: the same with AdamW, the monitor given ``optimizer=`` (it reads Adam's state
  on measured steps for the update direction's noise) and ``step(loss=)``;
* ``ddp`` (``--ddp``, optional): 2 processes on gloo, 1 thread each, each with half the
  batch, ``source="ddp"`` (every step measured) against plain DistributedDataParallel.

Timing: 2 threads (``--threads``), float32, seed 0. Warm-up rounds, then ``--repeats``
rounds; a round times every case once as a pair (plain, monitored), plain first in every
other pair, cases in an order that rotates from round to round, all in one process, so
slow drifts of the machine hit both sides alike. Reported: median time per step of each
side, the ratio of medians and (``paired``) the median over pairs of monitored/plain with
its interquartile range, and the median time of the ``monitor.step()`` call itself on
measured steps (its fixed cost: reducing the moments, statistics, smoothing, record; the
rest of the overhead is hooks and capture work inside forward and backward). Timings taken while other processes compete for the cores are
slow and noisy: check ``uptime`` first; the script prints the load average.

Progress goes to stderr; the Markdown table to stdout.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, load_average, log, setup_path, split_checked, write_json  # noqa: E402

setup_path()

import models  # noqa: E402  (benchmarks/models.py)

LR = 1e-4  # small, so that the weights stay close to their start over the run


# ---- loops --------------------------------------------------------------------------------
class Loop:
    """A training loop on its own copy of ``model``: ``run(n)`` does ``n`` optimizer steps.

    Args:
        model: copied, never modified.
        x, y: the fixed batch, split into ``micro`` equal micro-batches per step.
        monitor: keyword arguments of ``gradnoise.NoiseMonitor``, or None for plain.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, micro: int = 1,
                 monitor: Optional[dict] = None, copy_model: bool = True, adam: bool = False):
        self.model = copy.deepcopy(model) if copy_model else model
        self.opt = (torch.optim.AdamW if adam else torch.optim.SGD)(self.model.parameters(), lr=LR)
        self.adam = adam
        self.parts = list(zip(x.chunk(micro), y.chunk(micro)))
        self.batch = x.shape[0]
        self.monitor = None
        self.records = 0
        self.last = None
        self.t_close: List[float] = []  # seconds in monitor.step() of measured steps
        if monitor is not None:
            import gradnoise

            # with AdamW the monitor also reads the optimizer (its state: the update direction's noise)
            self.monitor = gradnoise.NoiseMonitor(self.model, **monitor, **({"optimizer": self.opt} if adam else {}))

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = None
        if len(self.parts) == 1:
            xb, yb = self.parts[0]
            loss = F.cross_entropy(self.model(xb), yb)
            loss.backward()
        else:
            for xb, yb in self.parts:
                (F.cross_entropy(self.model(xb), yb) * (xb.shape[0] / self.batch)).backward()
        if self.monitor is not None:
            t0 = time.perf_counter()
            rec = self.monitor.step(loss=loss if self.adam else None)
            if rec is not None:
                self.t_close.append(time.perf_counter() - t0)
                self.records += 1
                self.last = rec
        self.opt.step()

    def run(self, n: int) -> float:
        """Seconds for ``n`` consecutive steps."""
        t0 = time.perf_counter()
        for _ in range(n):
            self.step()
        return time.perf_counter() - t0


class Case:
    """A monitored loop and its plain twin, timed in windows of ``window`` steps."""

    def __init__(self, name: str, plain: Loop, monitored: Loop, window: int = 1):
        self.name, self.plain, self.monitored, self.window = name, plain, monitored, window
        self.t_plain: List[float] = []
        self.t_mon: List[float] = []
        self.paired: List[float] = []

    def warm(self) -> None:
        self.plain.run(self.window)
        self.monitored.run(self.window)

    def time_pair(self, plain_first: bool) -> None:
        if plain_first:
            tp = self.plain.run(self.window)
            tm = self.monitored.run(self.window)
        else:
            tm = self.monitored.run(self.window)
            tp = self.plain.run(self.window)
        self.t_plain.append(tp / self.window)
        self.t_mon.append(tm / self.window)
        self.paired.append(tm / tp)

    def row(self, model: str) -> dict:
        mp, mm = statistics.median(self.t_plain), statistics.median(self.t_mon)
        q = statistics.quantiles(self.paired, n=4) if len(self.paired) > 1 else [self.paired[0]] * 3
        last = self.monitored.last
        return {
            "model": model, "case": self.name, "window": self.window,
            "plain_ms": mp * 1e3, "monitored_ms": mm * 1e3, "ratio": mm / mp,
            "paired_median": q[1], "paired_q1": q[0], "paired_q3": q[2],
            "records": self.monitored.records,
            "step_call_ms": statistics.median(self.monitored.t_close) * 1e3 if self.monitored.t_close else None,
            "steps": self.monitored.monitor.step_index if self.monitored.monitor else None,
            "last_b_simple": None if last is None else _num(last.smoothed.b_simple),
            "times_plain_s": self.t_plain, "times_monitored_s": self.t_mon,
        }


def _num(v: float) -> Optional[float]:
    return float(v) if v is not None and math.isfinite(v) else None


def make_cases(name: str, seed: int, which: List[str]) -> List[Case]:
    model, x, y = models.build(name, seed)
    cases = []
    if "microbatch" in which:
        cases.append(Case("microbatch (2 micro-batches)", Loop(model, x, y, 2),
                          Loop(model, x, y, 2, {"source": "microbatch"})))
    if "every1" in which:
        cases.append(Case("per_sample every=1", Loop(model, x, y),
                          Loop(model, x, y, 1, {"source": "per_sample"})))
    if "every10" in which:
        cases.append(Case("per_sample every=10", Loop(model, x, y),
                          Loop(model, x, y, 1, {"source": "per_sample", "every": 10}), window=10))
    if "adam10" in which:
        cases.append(Case("per_sample every=10, AdamW, optimizer= and loss=", Loop(model, x, y, adam=True),
                          Loop(model, x, y, 1, {"source": "per_sample", "every": 10}, adam=True), window=10))
    return cases


def check(cases: List[Case]) -> None:
    """One measured step of each monitored loop must give a finite raw tr(Σ)."""
    for c in cases:
        c.monitored.step()
        rec = c.monitored.last
        if rec is None or not math.isfinite(rec.raw.trace_cov):
            raise RuntimeError(f"{c.name}: the monitor produced no finite record ({rec})")
        # realign so that every window of `every` steps holds one measured step
        every = c.monitored.monitor.every
        while c.monitored.monitor.step_index % every:
            c.monitored.step()


def bench_model(name: str, args) -> List[dict]:
    torch.manual_seed(args.seed)
    cases = make_cases(name, args.seed, args.cases)
    check(cases)
    for _ in range(args.warmup):
        for c in cases:
            c.warm()
    gc.collect()
    n = len(cases)
    report_every = max(1, args.repeats // 5)
    for r in range(args.repeats):
        for j in range(n):
            c = cases[(r + j) % n]
            c.time_pair(plain_first=(r + j) % 2 == 0)
        if (r + 1) % report_every == 0:
            log(f"  {name}: round {r + 1}/{args.repeats}")
    rows = [c.row(name) for c in cases]
    for c in cases:
        if c.monitored.monitor is not None:
            c.monitored.monitor.close()
    return rows


# ---- DDP (optional) ---------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, names: List[str], args, out_path: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(args.ddp_threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = []
    try:
        for name in names:
            model, x, y = models.build(name, args.seed)
            xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
            plain = Loop(DDP(copy.deepcopy(model)), xs, ys, copy_model=False)
            mon = Loop(DDP(copy.deepcopy(model)), xs, ys, 1, {"source": "ddp"}, copy_model=False)
            case = Case("ddp (2 ranks, gloo)", plain, mon)
            case.monitored.step()
            if case.monitored.last is None or not math.isfinite(case.monitored.last.raw.trace_cov):
                raise RuntimeError(f"ddp source gave no finite record: {case.monitored.last}")
            for _ in range(args.warmup):
                case.warm()
            dist.barrier()
            for r in range(args.repeats):
                dist.barrier()  # both ranks start each pair together
                case.time_pair(plain_first=r % 2 == 0)
                if rank == 0 and (r + 1) % max(1, args.repeats // 5) == 0:
                    log(f"  {name} ddp: round {r + 1}/{args.repeats}")
            rows.append(case.row(name))
            mon.monitor.close()
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(out_path).write_text(json.dumps(rows))


def bench_ddp(names: List[str], args) -> List[dict]:
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ddp.json")
        mp.spawn(_ddp_worker, args=(2, _free_port(), names, args, out), nprocs=2, join=True)
        return json.loads(Path(out).read_text())


# ---- output ----------------------------------------------------------------------------------
def markdown(rows: List[dict]) -> str:
    lines = [
        "| model | case | plain ms/step | monitored ms/step | time ratio | paired (IQR) | `monitor.step()` ms | records |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['case']} | {r['plain_ms']:.2f} | {r['monitored_ms']:.2f} | "
            f"{r['ratio']:.3f} | {r['paired_median']:.3f} ({r['paired_q1']:.3f}–{r['paired_q3']:.3f}) | "
            f"{_ms(r['step_call_ms'])} | {r['records']}/{r['steps']} |"
        )
    return "\n".join(lines)


def _ms(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:.2f}"


CASES = ("microbatch", "every1", "every10", "adam10")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {','.join(CASES)}")
    p.add_argument("--ddp", action="store_true", help="also time source='ddp' with 2 gloo processes")
    p.add_argument("--ddp-threads", type=int, default=1, help="torch threads per DDP process (default 1)")
    args = p.parse_args(argv)
    args.models = split_checked(p, args.models, models.PROBLEMS, "model")
    args.cases = split_checked(p, args.cases, CASES, "case")
    if args.repeats < 2 or args.warmup < 0:
        p.error("--repeats must be >= 2 and --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)
    load_before = load_average()
    start = time.perf_counter()
    rows: List[dict] = []
    for name in args.models:
        if args.cases:
            rows.extend(bench_model(name, args))
    if args.ddp:
        rows.extend(bench_ddp(args.models, args))
    elapsed = time.perf_counter() - start
    print(markdown(rows))
    env = (f"torch {torch.__version__}, {args.threads} threads ({args.ddp_threads} per DDP rank), "
           f"{platform.processor() or platform.machine()}, python {platform.python_version()}")
    print(f"\n{env}; {args.repeats} rounds after {args.warmup} warm-up; time ratio = "
          f"median(monitored)/median(plain) per step; paired = median over pairs; "
          f"{elapsed:.0f} s in all; load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")
    if args.json:
        write_json(args.json, {
            "repeats": args.repeats, "warmup": args.warmup, "threads": args.threads,
            "ddp_threads": args.ddp_threads, "ddp": args.ddp, "seed": args.seed,
            "models": args.models, "cases": args.cases, "lr": LR,
            "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpus": os.cpu_count(), "elapsed_s": elapsed,
            "load_before": load_before, "load_after": os.getloadavg()[0],
        }, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
