"""What the benchmark scripts share: finding gradnoise in a checkout, progress output,
the common command-line options, the load-average warning and the JSON results file."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

HERE = Path(__file__).resolve().parent


def setup_path() -> None:
    """Make ``benchmarks/`` importable, and ``src/`` when gradnoise is not installed."""
    sys.path.insert(0, str(HERE))
    try:
        installed = importlib.util.find_spec("gradnoise") is not None
    except (ImportError, ValueError):
        installed = True
    if not installed:  # run from a checkout without install or PYTHONPATH
        sys.path.insert(0, str(HERE.parent / "src"))


def log(msg: str) -> None:
    """Progress, to stderr (the table goes to stdout)."""
    print(msg, file=sys.stderr, flush=True)


def add_common_args(p: argparse.ArgumentParser, repeats: int = 30, warmup: int = 3,
                    models: str = "M1,M2,M3", threads: int = 2) -> None:
    """``--repeats --warmup --models --json --threads --seed``, with a script's defaults."""
    p.add_argument("--repeats", type=int, default=repeats, help=f"timed rounds per model (default {repeats})")
    p.add_argument("--warmup", type=int, default=warmup, help=f"untimed rounds first (default {warmup})")
    p.add_argument("--models", default=models, help=f"comma-separated, from {models}")
    p.add_argument("--json", metavar="PATH", help="also write all results, raw times included")
    p.add_argument("--threads", type=int, default=threads, help=f"torch threads (default {threads})")
    p.add_argument("--seed", type=int, default=0)


def split_checked(p: argparse.ArgumentParser, text: str, allowed, what: str) -> List[str]:
    """Comma-separated names, each one of ``allowed`` (else a usage error)."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    for m in names:
        if m not in allowed:
            p.error(f"unknown {what} {m!r}; choose from {','.join(allowed)}")
    return names


def load_average(warn: bool = True) -> float:
    """The 1-minute load average, with a note on stderr when the machine is busy."""
    load = os.getloadavg()[0]
    if warn and load >= 1.0:
        log(f"note: load average is {load:.1f}; if other processes compete for "
            "the cores, timings will be slow and noisy")
    return load


def write_json(path: str, config: dict, rows: List[dict]) -> None:
    """``{"config": …, "results": rows}`` to ``path``."""
    Path(path).write_text(json.dumps({"config": config, "results": rows}, indent=1))
    log(f"wrote {path}")


def time_rotating(fns: Dict[str, Callable[[], None]], repeats: int, warmup: int) -> Dict[str, List[float]]:
    """Seconds per call of each variant: ``warmup`` untimed rounds, then ``repeats`` rounds
    that run every variant once, in an order rotating from round to round."""
    names = list(fns)
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: Dict[str, List[float]] = {k: [] for k in names}
    for r in range(repeats):
        for k in names[r % len(names):] + names[: r % len(names)]:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return times


def run_models(argv, doc: str, models, bench: Callable[[str, int, int], dict], markdown: Callable[[List[dict]], str],
               repeats: int, warmup: int, what: str) -> int:
    """The ``main`` of a script that benchmarks each of ``models`` (common options, 1
    thread by default): ``bench(name, repeats, warmup)`` per model, the table, the JSON."""
    import argparse

    import torch

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    add_common_args(p, repeats=repeats, warmup=warmup, models=",".join(models), threads=1)
    args = p.parse_args(argv)
    names = split_checked(p, args.models, models, "model")
    torch.set_num_threads(args.threads)
    load = load_average()
    rows = []
    for name in names:
        log(f"{name}: {args.repeats} rounds")
        rows.append(bench(name, args.repeats, args.warmup))
    print(markdown(rows))
    print(f"\ntorch {torch.__version__}, {args.threads} thread(s), {args.repeats} rotating rounds after "
          f"{args.warmup}, ratio of medians to {what}; load average {load:.1f}")
    if args.json:
        write_json(args.json, {"repeats": args.repeats, "threads": args.threads, "torch": torch.__version__,
                               "load_before": load}, rows)
    return 0
