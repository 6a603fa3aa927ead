"""Waiting for spawned distributed workers (``tests/monitor/test_ddp.py``, ``test_fsdp.py``).

A gloo worker process now and then aborts at interpreter exit (``terminate called without
an active exception``: a thread torn down after the process group was destroyed), after it
wrote all its results. ``torch.multiprocessing``'s own ``join`` then kills the other ranks
mid-run. Here every worker runs to its end; the run counts as failed when a result file is
missing (a worker that died earlier, or hung), whatever the exit codes say, and a late
abort is reported as a warning. The results themselves are checked by the tests.
"""
from __future__ import annotations

import os
import time
import warnings
from typing import List


def wait_for_workers(ctx, timeout_s: float, what: str, expected: List[str]) -> None:
    """Wait until every process of ``ctx`` (``mp.start_processes(..., join=False)``) has
    ended; raise when ``timeout_s`` passes or a path of ``expected`` is missing."""
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.is_alive() for p in ctx.processes):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {what} workers did not finish in {timeout_s} s")
            time.sleep(0.2)
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    codes = [p.exitcode for p in ctx.processes]
    missing = [path for path in expected if not os.path.exists(path)]
    if missing:
        raise RuntimeError(f"the {what} workers ended with exit codes {codes} and wrote no "
                           f"{os.path.basename(missing[0])} ({len(missing)} results missing)")
    if any(codes):
        warnings.warn(f"the {what} workers wrote every result, then ended with exit codes {codes}")
