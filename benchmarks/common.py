"""What the benchmark scripts share: finding gradnoise in a checkout, progress output,
the common command-line options, the load-average warning and the JSON results file."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import List

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
