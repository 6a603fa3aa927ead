"""Overhead of gradnoise on the zoo of real third-party models, against a plain step and
against peers (torch.func, Opacus), each checked for exactness first.

    python benchmarks/zoo.py [--models gpt2,vit,...] [--batch 16] [--repeats 20] [--json PATH]

The models are those of ``tests/zoo_models.py`` (Hugging Face transformers, timm,
torchvision; small configurations, random init, float32). The method rows are timed
exactly as ``benchmarks/overhead.py`` times the reference models: every method on its
own copy of the same weights and batch, checked against a per-sample autograd loop,
then rounds in which each method runs right next to a plain step (2 threads, medians).
Peak memory is measured afterwards in separate runs.

The ``floor-mode`` row is the plain step under a torch-function mode that only passes
each call through: what any engine that routes the model's calls in Python pays first.
The ``monitor/10`` row is a training loop with ``NoiseMonitor(source="per_sample",
every=10)``: blocks of ten steps (one measured) alternate with ten plain steps; its
ratio is the median over blocks of the block-time ratio, i.e. the mean cost per step.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import List

import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, load_average, setup_path, split_checked, write_json  # noqa: E402

setup_path()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import overhead  # noqa: E402  (benchmarks/overhead.py)
import zoo_models  # noqa: E402  (tests/zoo_models.py)

METHODS = ("plain", "gradnoise", "torch.func", "opacus", "opacus-ghost", "floor-mode")


class _PassThrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class FloorMode(overhead.Plain):
    """The floor of any engine that sees the model's torch calls in Python: the plain
    step under a torch-function mode that only passes each call through."""

    name = "floor-mode"

    def step(self) -> None:
        with _PassThrough():
            super().step()


TABLE = {**overhead.METHODS, FloorMode.name: FloorMode}


def monitor_ratio(name: str, args) -> dict:
    """Median over blocks of (10 monitored steps) / (10 plain steps)."""
    import gradnoise

    model, x, y, loss_fn = zoo_models.build(name, args.batch, args.seed, args.size)
    plain = zoo_models.build(name, args.batch, args.seed, args.size)[0]
    mon = gradnoise.NoiseMonitor(model, source="per_sample", every=10)

    def block(m, monitor=None) -> float:
        t0 = time.perf_counter()
        for _ in range(10):
            m.zero_grad(set_to_none=True)
            loss_fn(m(x), y).backward()
            if monitor is not None:
                monitor.step()
        return time.perf_counter() - t0

    block(model, mon), block(plain)
    ratios = []
    for r in range(max(3, args.repeats // 4)):
        if r % 2:
            tp, tm = block(plain), block(model, mon)
        else:
            tm, tp = block(model, mon), block(plain)
        ratios.append(tm / tp)
    mon.close()
    return {"model": name, "method": "monitor/10", "status": "ok", "time_ratio": statistics.median(ratios),
            "notes": f"{len(ratios)} blocks of 10 steps"}


def markdown(rows: List[dict]) -> str:
    lines = ["| model | method | median ms | time ratio | peak-memory ratio | notes |",
             "|---|---|---:|---:|---:|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['method']} | – | – | – | {r['notes']} |")
            continue
        ms = f"{r['median_ms']:.1f}" if "median_ms" in r else "–"
        peak = f"{r['peak_ratio']:.2f}" if r.get("peak_ratio") is not None else "–"
        lines.append(f"| {r['model']} | {r['method']} | {ms} | {r['time_ratio']:.2f} | {peak} | {r['notes']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, repeats=20, models=",".join(zoo_models.ZOO))
    p.add_argument("--batch", type=int, default=16, help="samples per batch (default 16)")
    p.add_argument("--size", choices=sorted(zoo_models.SIZES), default="bench",
                   help="model size (default bench; test is the tests' tiny one)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--memory", choices=("profiler", "dispatch"), default="profiler")
    p.add_argument("--no-monitor", action="store_true", help="skip the monitor/10 rows")
    args = p.parse_args(argv)
    args.models = split_checked(p, args.models, zoo_models.ZOO, "model")
    args.methods = split_checked(p, args.methods, METHODS, "method")
    if "plain" not in args.methods:
        args.methods.insert(0, "plain")
    torch.set_num_threads(args.threads)
    load_before = load_average()
    build = lambda name, seed: zoo_models.build(name, args.batch, seed, args.size)  # noqa: E731
    rows: List[dict] = []
    start = time.perf_counter()
    for name in args.models:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows.extend(overhead.bench_model(name, args, build, TABLE))
            if not args.no_monitor:
                rows.append(monitor_ratio(name, args))
    print(markdown(rows))
    gn = [r["time_ratio"] for r in rows if r["method"] == "gradnoise" and r["status"] == "ok"]
    if gn:
        print(f"\ngradnoise: median {statistics.median(gn):.2f}x, max {max(gn):.2f}x over {len(gn)} models; "
              f"batch {args.batch}, {args.repeats} rounds, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, {time.perf_counter() - start:.0f} s, load {load_before:.1f}")
    if args.json:
        write_json(args.json, {"batch": args.batch, "repeats": args.repeats, "models": args.models,
                               "methods": args.methods, "torch": torch.__version__}, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
