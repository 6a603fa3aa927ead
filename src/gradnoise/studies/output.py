"""Study files: what every study writes, and the only thing the report reads.

Format ``gradnoise-study`` version 1: JSON Lines, one object per line, each with a
``type``. A study on one task writes ``<out>/<study>-<task>.jsonl``; lines are appended
and flushed as they are produced, so a killed study leaves a readable prefix. A file
left by an earlier study of the same name is moved to ``<out>/previous/`` first
(:func:`set_aside`), never overwritten. The first
line is the header::

    {"type": "header", "format": "gradnoise-study", "version": 1, "study": "law",
     "task": "digits-mlp", "seed": 0, "size": "default", "config": {...},
     "created": "2026-…+00:00"}

Later lines, by study (undefined numbers are ``null``; intervals are ``[low, high]``
with unbounded ends written ``"inf"`` / ``"-inf"``):

``law``
    ``checkpoint``: ``{"checkpoint": "init"|"trained", "step", "population", "loss",
    "trace_cov", "grad_sq_norm"}`` — full-data values at fixed parameters; ``trace_cov``
    is the population variance ``(1/N) Σ||g_i − ∇J||²`` from the per-sample engine.
    ``point``: ``{"checkpoint", "batch_size", "batches", "mse", "mse_se", "predicted",
    "z"}`` — ``mse`` the Monte-Carlo mean of ``||ĝ_B − ∇J||²`` over ``batches`` batches
    drawn without replacement, ``mse_se`` its standard error, ``predicted`` =
    ``trace_cov/B · (N − B)/(N − 1)``, ``z = (mse − predicted)/mse_se``.
    ``summary``: ``{"max_abs_z", "checkpoint", "batch_size", "points"}``.
``trajectory``
    ``step``: ``{"step", "loss", "full_loss"}`` — the batch loss of every step and the
    full-data loss where it was evaluated (else ``null``). The noise of the same steps is
    in the monitor's run file ``config["run_file"]`` (format ``gradnoise-run``, beside
    this file). ``summary``: ``{"final_loss", "b_simple_first", "b_simple_last",
    "b_simple_interval"}``.
``critical-batch``
    ``run``: ``{"batch_size", "lr", "seed", "reached", "steps", "examples",
    "final_loss", "b_simple", "b_simple_interval"}`` — one training run to
    ``config["target_loss"]``; ``steps``/``examples`` are ``null`` when it did not
    reach it; ``b_simple`` is the monitor's smoothed value at the end of the run.
    ``best``: ``{"batch_size", "seed", "lr", "steps", "examples"}`` — the fewest steps
    over the learning-rate grid. ``summary``: ``{"target_loss", "s_min", "e_min",
    "b_crit", "b_crit_interval", "b_simple", "b_simple_interval", "points", "reason"}``
    — the fit ``(S/S_min − 1)(E/E_min − 1) = 1``, ``B_crit = E_min/S_min``;
    ``b_simple`` is the median over the best runs of the monitor's smoothed value at
    their end and ``b_simple_interval`` the range of those values; ``reason`` (or
    ``null``) says why the fit is missing or doubtful (several notes joined by
    ``"; "``).
``lr-batch``
    ``cell``: ``{"batch_size", "lr", "final_loss", "diverged", "no_progress",
    "skipped"}`` — ``diverged``: the run blew up (NaN/inf, or a loss far above the
    initial one); ``no_progress``: it stayed finite but ended less than 0.1 % below its
    start (too small a rate, or stuck); ``skipped``: not run, since the two rates below it
    already diverged (counted as diverged). ``stable``: ``{"batch_size", "lr_max",
    "lr_best", "best_loss"}`` — the largest rate of the grid that trained (neither
    diverged nor made no progress) and the rate with the lowest final loss (``null``
    if none). ``summary``: ``{"eps_max", "b_noise", "b_noise_interval", "rms",
    "stable_fit", "b_simple", "points", "reason"}`` — the fit
    ``ε(B) = ε_max/(1 + B_noise/B)`` to ``lr_best``; ``stable_fit`` is the same law
    fitted to ``lr_max`` (``{"eps_max", "b_noise", "b_noise_interval", "rms"}``, or
    ``null``); ``b_simple`` was measured at initialisation; ``reason`` (or ``null``)
    says why the fit is missing or doubtful (several notes joined by ``"; "``).
``recommend``
    ``summary``: ``{"run_file", "batch_size", "b_crit", "b_crit_interval", "steps",
    "rules": [{"to_batch", "linear", "sqrt", "adascale"}, ...]}`` — the smoothed
    ``B_simple`` of the run's last measured steps as the critical batch size, and the
    learning-rate multiplier each rule gives for moving from ``batch_size`` to
    ``to_batch``.
"""
from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Optional

FORMAT = "gradnoise-study"
VERSION = 1
STUDIES = ("law", "trajectory", "critical-batch", "lr-batch", "recommend")


def json_safe(v: Any) -> Any:
    """Floats that JSON can hold: NaN -> ``None``, ±inf -> ``"inf"``/``"-inf"``;
    tuples become lists; dicts and lists are converted recursively."""
    if isinstance(v, float):
        if math.isnan(v):
            return None
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return v
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


def set_aside(path: Path) -> None:
    """Move an existing ``path`` into ``previous/`` beside it, named with its time of
    last change, so a new study never overwrites or deletes an earlier one's data."""
    if not path.exists():
        return
    stamp = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).strftime("%Y%m%dT%H%M%S")
    name = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.name
    dest = path.parent / "previous" / f"{name}.{stamp}.jsonl"
    dest.parent.mkdir(exist_ok=True)
    i = 1
    while dest.exists():  # two studies within one second
        dest = dest.with_name(f"{name}.{stamp}-{i}.jsonl")
        i += 1
    os.replace(path, dest)


class StudyWriter:
    """Appends the lines of one study file, flushing each.

    Args:
        out: the output folder (created if missing).
        study: one of :data:`STUDIES`.
        task: the task's name (used in the file name).
        seed, size, config: recorded in the header.
    """

    def __init__(self, out: "os.PathLike[str] | str", study: str, task: str, seed: int, size: str,
                 config: Dict[str, Any]):
        Path(out).mkdir(parents=True, exist_ok=True)
        self.path = Path(out) / f"{study}-{task}.jsonl"
        set_aside(self.path)  # an earlier study's file goes to previous/, never overwritten
        self._f = open(self.path, "x", encoding="utf-8")
        self.write("header", format=FORMAT, version=VERSION, study=study, task=task, seed=seed, size=size,
                   config=config, created=datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def write(self, type_: str, **fields: Any) -> None:
        """One line ``{"type": type_, **fields}``."""
        self._f.write(json.dumps(json_safe({"type": type_, **fields})) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "StudyWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def num(v: Optional[float]) -> Optional[float]:
    """A float for JSON (``None`` for missing or non-finite)."""
    return float(v) if v is not None and math.isfinite(v) else None
