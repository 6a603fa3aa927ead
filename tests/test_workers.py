"""The distributed tests' worker wait (``tests/workers.py``): missing results fail, a hang
fails, an abort after every result was written only warns."""
from __future__ import annotations

import os
import sys

import pytest
import torch.multiprocessing as mp

from workers import wait_for_workers


def _worker(rank: int, out: str, write: bool, code: int, sleep: float) -> None:
    import time
    if write:
        open(os.path.join(out, f"r{rank}"), "w").close()
    time.sleep(sleep)
    os._exit(code)


def _run(tmp_path, write=True, code=0, sleep=0.0, timeout=60.0):
    ctx = mp.start_processes(_worker, args=(str(tmp_path), write, code, sleep), nprocs=2, join=False,
                             start_method="fork")
    wait_for_workers(ctx, timeout, "test", [str(tmp_path / f"r{r}") for r in range(2)])


@pytest.mark.skipif(sys.platform != "linux", reason="fork")
def test_wait_for_workers(tmp_path):
    for sub in ("ok", "late", "none", "hang"):
        (tmp_path / sub).mkdir()
    _run(tmp_path / "ok")
    with pytest.warns(UserWarning, match=r"wrote every result, then ended with exit codes \[134, 134\]"):
        _run(tmp_path / "late", code=134)
    with pytest.raises(RuntimeError, match=r"exit codes \[1, 1\] and wrote no r0 \(2 results missing\)"):
        _run(tmp_path / "none", write=False, code=1)
    with pytest.raises(TimeoutError, match="did not finish in 0.5 s"):
        _run(tmp_path / "hang", sleep=30.0, timeout=0.5)
