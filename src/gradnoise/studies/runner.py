"""Running several studies on several tasks into one folder, as ``gradnoise study``
does.

By default every study of the registry runs: the quick ones on both built-in tasks
(``digits-mlp``, ``digits-cnn``) and the training sweeps only on the first — the CNN
trains ten times slower, and the sweeps train a hundred models; a study with tasks of
its own (``lm``: ``pydoc-gpt``) on those. With tasks named explicitly, every study runs
on every task (a study that cannot use one says why in its outcome), except that a study
with tasks of its own runs only when it is named too (``gradnoise study --task mine``
leaves ``lm`` out; ``gradnoise study lm --task mine`` runs it on ``mine``). A study that reads run files
(``recommend``) reads those of ``trajectory`` (or the ``run_files`` given).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from . import registry
from .progress import overall
from .recommend import run_name
from .task import DEFAULT_TASKS, Task, load


@dataclass
class Overrides:
    """Settings from the command line: each replaces the config field of the same name
    in every study that has one (None: keep the default)."""

    lr: Optional[float] = None                   # law, trajectory
    lrs: Optional[List[float]] = None            # critical-batch, lr-batch
    batch_sizes: Optional[List[int]] = None      # critical-batch, lr-batch
    target_loss: Optional[float] = None          # critical-batch, adaptive, lm

    def config(self, study: registry.Study, size: str):
        if study.config is None:
            return None
        cfg = study.config.for_size(size)
        names = {f.name for f in fields(cfg)}
        given = {k: v for k, v in vars(self).items() if v is not None and k in names}
        return replace(cfg, **given)


@dataclass
class Outcome:
    """What one study on one task produced."""

    study: str
    task: str
    summary: dict
    seconds: float
    error: Optional[str] = None   # why the study failed on this task (its summary is then {})


@dataclass
class Job:
    """One study on one subject (a task, or a run file)."""

    study: registry.Study
    name: str          # the task's (or run file's) name
    subject: Any
    kwargs: Dict[str, Any] = field(default_factory=dict)


def check_studies(names: Sequence[str]) -> List[registry.Study]:
    """The studies named (all of them when empty), in the registry's order.

    Raises:
        ValueError: an unknown name.
    """
    for n in names:
        registry.get(n)
    return [s for s in registry.STUDIES if not names or s.name in names]


def default_threads() -> int:
    """Torch threads for the studies: 1. Their models are tiny (a 64-128-64 MLP, a
    two-layer CNN on 8×8 images), so a second thread buys little, while on a busy machine
    threads wait for each other. Measured on 2 cores (``gradnoise study law
    critical-batch --task digits-mlp``): idle, 40 s with 1 thread and 37 s with 2; beside
    one CPU-bound process, 42 s with 1 and 138 s with 2."""
    return 1


def set_threads(n: Optional[int]) -> int:
    """``torch.set_num_threads`` to ``n`` (default :func:`default_threads`), at most the
    cores this process may use; returns the number set."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = min(n or default_threads(), cores)
    torch.set_num_threads(n)
    return n


def run_studies(names: Sequence[str], task_specs: Sequence[str], out, seed: int = 0, size: str = "default",
                quiet: bool = False, overrides: Optional[Overrides] = None,
                run_files: Sequence[str] = (), keep_going: bool = True) -> List[Outcome]:
    """Run the studies; every file lands in ``out``. Returns one :class:`Outcome` per
    study and task, in the order run.

    A study that fails on a task (e.g. a model the per-sample engine refuses) is recorded
    with its error and the others go on, unless ``keep_going`` is False; its earlier
    result, if any, stays in ``out`` (:mod:`gradnoise.studies.output`).

    Raises:
        ValueError: an unknown study, an unknown or duplicate task, a task that fails
            to load, or ``recommend`` with no run file to read.
    """
    studies = check_studies(names)
    overrides = overrides or Overrides()
    default = not task_specs
    if not default and not names:  # your tasks: the studies of a task of their own only when named
        studies = [s for s in studies if not s.tasks]
    tasks: List[Task] = [load(spec, seed) for spec in (task_specs or DEFAULT_TASKS)]
    names_seen = [t.name for t in tasks]
    if len(set(names_seen)) < len(names_seen):
        raise ValueError(f"two tasks share a name ({', '.join(names_seen)}); their files would overwrite "
                         "each other")
    own = {name: load(name, seed) for s in studies if default and not s.reads_runs for name in s.tasks}
    out = Path(out)
    jobs = [Job(s, t.name, t, {"quiet": quiet, "config": overrides.config(s, size)})
            for s in studies if not s.reads_runs
            for i, t in enumerate([own[n] for n in s.tasks] if default and s.tasks else tasks)
            if not (default and s.sweep and i > 0)]
    readers = [s for s in studies if s.reads_runs]
    if readers and not run_files and not any(s.name == "trajectory" for s in studies):
        _trajectory_runs(out, tasks)  # fail before any work when there is nothing to read
    outcomes: List[Outcome] = []
    with overall(len(jobs) + len(readers) * max(1, len(run_files) or len(tasks)), quiet) as line:
        def one(job: Job) -> None:
            line.set_description_str(f"study {line.n + 1}/{line.total}: {job.study.name} on {job.name}")
            outcomes.append(_one(job, out, seed, size, keep_going))
            line.update(1)

        for job in jobs:
            one(job)
        for study in readers:
            try:
                files = list(run_files) or _trajectory_runs(out, tasks)
            except ValueError as e:  # the trajectory study failed: nothing to read
                if not keep_going:
                    raise
                outcomes.append(Outcome(study.name, "trajectory run files", {}, 0.0, str(e)))
                continue
            for f in files:
                one(Job(study, run_name(f), f))
    return outcomes


def _one(job: Job, out: Path, seed: int, size: str, keep_going: bool) -> Outcome:
    """Run one job, timing it; a failure becomes the outcome's error."""
    t0 = time.perf_counter()
    try:
        summary = job.study.run(job.subject, out, seed=seed, size=size, **job.kwargs)
    except Exception as e:
        if not keep_going:
            raise
        why = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        return Outcome(job.study.name, job.name, {}, time.perf_counter() - t0, why)
    return Outcome(job.study.name, job.name, summary, time.perf_counter() - t0)


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
    found = {p for study in registry.NAMES for p in Path(out).glob(f"{study}-*.jsonl")}
    return sorted(p for p in found if not p.name.endswith(".run.jsonl"))


