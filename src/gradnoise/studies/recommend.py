"""Study ``recommend``: advice from a run file the monitor wrote.

Reads a ``gradnoise-run`` file (:func:`gradnoise.read_run`), takes the smoothed noise
scale of its last measured steps as the critical batch size, with the monitor's 95 %
interval, and lists the learning-rate multiplier that a move from the run's batch size
to other batch sizes calls for under the linear, square-root and AdaScale rules
(:mod:`gradnoise.control.lr_rules`). Writes ``recommend-<name>.jsonl``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

from ..control import advise
from ..monitor.sinks import read_run
from .output import StudyWriter


def run_name(path: "os.PathLike[str] | str") -> str:
    """``runs/exp1.run.jsonl`` -> ``exp1``."""
    name = Path(path).name
    for suffix in (".jsonl", ".run"):
        name = name[: -len(suffix)] if name.endswith(suffix) else name
    return name


def run(run_file: "os.PathLike[str] | str", out, seed: int = 0, size: str = "default",
        batch_size: Optional[int] = None, to_batches: Optional[Iterable[int]] = None) -> dict:
    """Advice from ``run_file``; writes ``recommend-<name>.jsonl`` in ``out``.

    Raises:
        ValueError: the run file is missing, empty, corrupt, of an unknown version, or
            has no steps.
    """
    header, steps = read_run(run_file)
    try:
        rec = advise(steps, batch_size=batch_size, to_batches=to_batches)
    except ValueError as e:
        raise ValueError(f"{os.fspath(run_file)}: {e}") from None
    with StudyWriter(out, "recommend", run_name(run_file), seed, size,
                     {"run_file": os.fspath(run_file), "source": header.get("source")}) as w:
        summary = {"run_file": os.fspath(run_file), **rec}
        w.write("summary", **summary)
    return summary
