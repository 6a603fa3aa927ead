"""Running several studies on several tasks into one folder, as ``gradnoise study``
does.

By default every study of the registry runs: the quick ones on both built-in tasks
(``digits-mlp``, ``digits-cnn``) and the training sweeps only on the first — the CNN
trains ten times slower, and the sweeps train a hundred models; a study with tasks of
its own (``lm``: ``pydoc-gpt``) on those. With tasks named explicitly, every study runs
on every task (a study that fails on one says why in its outcome), except those skipped.

A study is skipped on a task, before anything runs, with a one-line reason in its
outcome (:func:`skip_reason`): a study with tasks of its own when tasks are named but
it is not (``gradnoise study --task mine`` leaves ``lm`` out; ``gradnoise study lm --task
mine`` runs it on ``mine``), and a study whose ``fits`` says the task's sizes cannot
carry it (two classes for five online phases; too few samples for every federated
client). A skip is not a failure. A study that reads run files (``recommend``) reads
those of ``trajectory`` (or the ``run_files`` given).

Ctrl-C stops the run after the study it interrupts (whose partial file goes to
``failed/``); the outcomes so far come back, that study's marked ``interrupted``.
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
    error: Optional[str] = None    # why the study failed on this task (its summary is then {})
    skipped: Optional[str] = None  # why it did not run on this task (decided before it ran)
    interrupted: bool = False      # Ctrl-C stopped it (its error says so) and the run after it


@dataclass
class Job:
    """One study on one subject (a task, or a run file)."""

    study: registry.Study
    name: str          # the task's (or run file's) name
    subject: Any
    kwargs: Dict[str, Any] = field(default_factory=dict)
    skip: Optional[str] = None  # why it does not run (:func:`skip_reason`)


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


def skip_reason(study: registry.Study, task: Task, config, seed: int, named: bool, default: bool
                ) -> Optional[str]:
    """Why ``study`` does not run on ``task`` (None: it runs), decided from the request and
    the task's sizes before anything runs.

    Args:
        named: the study was named on the command line; default: no task was.
    """
    if not default and study.tasks and not named:
        return (f"it runs on its own task ({', '.join(study.tasks)}) unless it is named "
                f"(gradnoise study {study.name} --task SPEC runs it on yours)")
    return study.fits(task, config, seed) if study.fits is not None else None


def run_studies(names: Sequence[str], task_specs: Sequence[str], out, seed: int = 0, size: str = "default",
                quiet: bool = False, overrides: Optional[Overrides] = None,
                run_files: Sequence[str] = (), keep_going: bool = True) -> List[Outcome]:
    """Run the studies; every file lands in ``out``. Returns one :class:`Outcome` per
    study and task, in the order run (skipped ones with their reason, in their place).

    A study that fails on a task (e.g. a model the per-sample engine refuses) is recorded
    with its error and the others go on, unless ``keep_going`` is False; its earlier
    result, if any, stays in ``out`` (:mod:`gradnoise.studies.output`). Ctrl-C ends the
    run there: the outcomes so far are returned, the last one ``interrupted`` (with
    ``keep_going`` False, the ``KeyboardInterrupt`` propagates).

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
    jobs = _plan(studies, names, tasks, seed, size, quiet, overrides, default)
    readers = [s for s in studies if s.reads_runs]
    if readers and not run_files and not any(s.name == "trajectory" for s in studies):
        _trajectory_runs(out, tasks)  # fail before any work when there is nothing to read
    outcomes: List[Outcome] = []
    runs = [j for j in jobs if j.skip is None]
    with overall(len(runs) + len(readers) * max(1, len(run_files) or len(tasks)), quiet) as line:
        def one(job: Job) -> None:
            if job.skip is not None:
                outcomes.append(Outcome(job.study.name, job.name, {}, 0.0, skipped=job.skip))
                return
            line.start(f"{job.study.name} on {job.name}")
            t0 = time.perf_counter()
            try:
                outcomes.append(_one(job, out, seed, size, keep_going))
            except KeyboardInterrupt:
                if not keep_going:
                    raise
                outcomes.append(Outcome(job.study.name, job.name, {}, time.perf_counter() - t0,
                                        "interrupted (Ctrl-C) before it finished; the studies after it did not run",
                                        interrupted=True))
                raise

        try:
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
        except KeyboardInterrupt:
            if not keep_going:
                raise
            if not (outcomes and outcomes[-1].interrupted):  # between two studies
                outcomes.append(Outcome("the run", "its remaining studies", {}, 0.0,
                                        "interrupted (Ctrl-C); they did not run", interrupted=True))
    return outcomes


def _plan(studies: Sequence[registry.Study], names: Sequence[str], tasks: Sequence[Task], seed: int, size: str,
          quiet: bool, overrides: Overrides, default: bool) -> List[Job]:
    """The jobs of the studies that run on tasks, each with its skip reason (or None)."""
    own = {name: load(name, seed) for s in studies if default and not s.reads_runs for name in s.tasks}
    jobs = []
    for s in studies:
        if s.reads_runs:
            continue
        config = overrides.config(s, size)
        for i, t in enumerate([own[n] for n in s.tasks] if default and s.tasks else tasks):
            if not (default and s.sweep and i > 0):
                why = skip_reason(s, t, config, seed, s.name in names, default)
                jobs.append(Job(s, t.name, t, {"quiet": quiet, "config": config}, why))
    return jobs


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


