"""Running several studies on several tasks into one folder, as ``gradnoise study``
does.

By default every study runs, ``law`` and ``trajectory`` on both built-in tasks
(``digits-mlp``, ``digits-cnn``) and the training sweeps (``critical-batch``,
``lr-batch``) on ``digits-mlp`` only — the CNN trains ten times slower, and the sweeps
train a hundred models. With tasks named explicitly, every study runs on every task.
``recommend`` reads the run files of ``trajectory`` (or the ``run_files`` given).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from . import critical, law, lrbatch, recommend, trajectory
from .output import STUDIES
from .task import DEFAULT_TASKS, Task, load

SWEEPS = ("critical-batch", "lr-batch")
RUNNERS: Dict[str, Callable] = {"law": law.run, "trajectory": trajectory.run,
                                "critical-batch": critical.run, "lr-batch": lrbatch.run}
CONFIGS = {"law": law.LawConfig, "trajectory": trajectory.TrajectoryConfig,
           "critical-batch": critical.CriticalConfig, "lr-batch": lrbatch.LrBatchConfig}


@dataclass
class Overrides:
    """Settings from the command line that replace the studies' defaults (None: keep)."""

    lr: Optional[float] = None                   # law, trajectory
    lrs: Optional[List[float]] = None            # critical-batch, lr-batch
    batch_sizes: Optional[List[int]] = None      # critical-batch, lr-batch
    target_loss: Optional[float] = None          # critical-batch

    def config(self, study: str, size: str):
        cfg = CONFIGS[study].for_size(size)
        if self.lr is not None and study in ("law", "trajectory"):
            cfg = replace(cfg, lr=self.lr)
        if self.lrs is not None and study in SWEEPS:
            cfg = replace(cfg, lrs=sorted(self.lrs, reverse=study == "critical-batch"))
        if self.batch_sizes is not None and study in SWEEPS:
            cfg = replace(cfg, batch_sizes=sorted(self.batch_sizes))
        if self.target_loss is not None and study == "critical-batch":
            cfg = replace(cfg, target_loss=self.target_loss)
        return cfg


@dataclass
class Outcome:
    """What one study on one task produced."""

    study: str
    task: str
    summary: dict
    seconds: float
    error: Optional[str] = None   # why the study failed on this task (its summary is then {})


def check_studies(names: Sequence[str]) -> List[str]:
    """The names, each one of :data:`STUDIES` (all of them when empty), in that order."""
    for n in names:
        if n not in STUDIES:
            raise ValueError(f"unknown study {n!r}; choose from {', '.join(STUDIES)}")
    return [s for s in STUDIES if not names or s in names]


def run_studies(names: Sequence[str], task_specs: Sequence[str], out, seed: int = 0, size: str = "default",
                quiet: bool = False, overrides: Optional[Overrides] = None,
                run_files: Sequence[str] = (), keep_going: bool = True) -> List[Outcome]:
    """Run the studies; every file lands in ``out``. Returns one :class:`Outcome` per
    study and task, in the order run.

    A study that fails on a task (e.g. a model the per-sample engine refuses) is recorded
    with its error and the others go on, unless ``keep_going`` is False.

    Raises:
        ValueError: an unknown study, an unknown or duplicate task, a task that fails
            to load, or ``recommend`` with no run file to read.
    """
    studies = check_studies(names)
    overrides = overrides or Overrides()
    default = not task_specs
    tasks: List[Task] = [load(spec, seed) for spec in (task_specs or DEFAULT_TASKS)]
    names_seen = [t.name for t in tasks]
    if len(set(names_seen)) < len(names_seen):
        raise ValueError(f"two tasks share a name ({', '.join(names_seen)}); their files would overwrite "
                         "each other")
    out = Path(out)
    outcomes: List[Outcome] = []
    for study in studies:
        if study == "recommend":
            continue
        for i, task in enumerate(tasks):
            if not (default and study in SWEEPS and i > 0):
                outcomes.append(_one(study, task.name, keep_going, RUNNERS[study], task, out, seed=seed,
                                     size=size, quiet=quiet, config=overrides.config(study, size)))
    if "recommend" in studies:
        for f in run_files or _trajectory_runs(out, tasks):
            outcomes.append(_one("recommend", recommend.run_name(f), keep_going, recommend.run, f, out,
                                 seed=seed, size=size))
    return outcomes


def _one(study: str, task: str, keep_going: bool, fn: Callable, *args, **kwargs) -> Outcome:
    """Run one study on one task, timing it; a failure becomes the outcome's error."""
    t0 = time.perf_counter()
    try:
        summary = fn(*args, **kwargs)
    except Exception as e:
        if not keep_going:
            raise
        why = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        return Outcome(study, task, {}, time.perf_counter() - t0, why)
    return Outcome(study, task, summary, time.perf_counter() - t0)


def _trajectory_runs(out: Path, tasks: Sequence[Task]) -> List[Path]:
    runs = [out / f"trajectory-{t.name}.run.jsonl" for t in tasks]
    found = [p for p in runs if p.exists()]
    if not found:
        raise ValueError("recommend needs a run file: pass --run RUN.jsonl, or run it together with "
                         "trajectory (gradnoise study trajectory recommend)")
    return found


def study_files(out) -> List[Path]:
    """The study files in ``out`` (the report's inputs): ``<study>-<task>.jsonl`` for
    every study, not the monitor's ``*.run.jsonl`` (the trajectory files name those)
    and not other files that may share the folder."""
    found = {p for study in STUDIES for p in Path(out).glob(f"{study}-*.jsonl")}
    return sorted(p for p in found if not p.name.endswith(".run.jsonl"))
