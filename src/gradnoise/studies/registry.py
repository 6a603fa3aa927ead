"""The studies, one entry each: name, options, how to run it and its summary line.
``gradnoise study`` and the runner take the list from here; the report keeps its own table
of sections keyed by the same names (:data:`gradnoise.report.section_table.SECTIONS`), so
the studies never import the report.

A study's ``run(subject, out, seed=, size=, quiet=, config=)`` writes its study file(s)
into ``out`` and returns its summary dict; ``subject`` is a
:class:`~gradnoise.studies.task.Task`, or a run file for a study with
``reads_runs=True``. Its ``config`` is a dataclass with ``for_size(size)``; a command-line
option (``--lr``, ``--lrs``, ``--batch-sizes``, ``--target-loss``) replaces the field of
the same name in every study whose config has one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from . import adaptive, critical, escape, federated, law, lm, lrbatch, online, optimizers, recommend, summary, trajectory


@dataclass(frozen=True)
class Study:
    """One study.

    Attributes:
        name: as typed on the command line and written in its files.
        run: see the module docstring.
        config: its configuration dataclass (None: it has no options).
        line: ``line(summary) -> str``, one readable line for the end of the command.
        sweep: a training sweep (hundreds of runs): by default on the first task only.
        reads_runs: runs on monitor run files (``recommend``) instead of tasks.
        tasks: the built-in tasks it runs on when none is named (empty: the default
            tasks, :data:`gradnoise.studies.task.DEFAULT_TASKS`).
        fits: ``fits(task, config, seed) -> str | None``: why the task's labels and
            sizes cannot carry the study (None: they can), asked before it runs; the
            runner then skips it with that note (:func:`gradnoise.studies.runner.skip_reason`).
    """

    name: str
    run: Callable
    config: Optional[type]
    line: Callable[[dict], str]
    sweep: bool = False
    reads_runs: bool = False
    tasks: Tuple[str, ...] = ()
    fits: Optional[Callable] = None


STUDIES: Tuple[Study, ...] = (
    Study("law", law.run, law.LawConfig, summary.law_line),
    Study("trajectory", trajectory.run, trajectory.TrajectoryConfig, summary.trajectory_line),
    Study("critical-batch", critical.run, critical.CriticalConfig, summary.critical_line, sweep=True),
    Study("lr-batch", lrbatch.run, lrbatch.LrBatchConfig, summary.lr_batch_line, sweep=True),
    Study("optimizers", optimizers.run, optimizers.OptimizersConfig, summary.optimizers_line, sweep=True),
    Study("adaptive", adaptive.run, adaptive.AdaptiveConfig, summary.adaptive_line, sweep=True),
    Study("escape", escape.run, escape.EscapeConfig, summary.escape_line, sweep=True),
    Study("lm", lm.run, lm.LmConfig, lm.summary_line, tasks=("pydoc-gpt",)),
    Study("federated", federated.run, federated.FederatedConfig, federated.summary_line,
          sweep=True, fits=federated.fits),
    Study("online", online.run, online.OnlineConfig, online.summary_line, sweep=True, fits=online.fits),
    Study("recommend", recommend.run, None, summary.recommend_line, reads_runs=True),
)
BY_NAME: Dict[str, Study] = {s.name: s for s in STUDIES}
NAMES = tuple(BY_NAME)


def get(name: str) -> Study:
    """The study called ``name``.

    Raises:
        ValueError: no such study.
    """
    if name not in BY_NAME:
        raise ValueError(f"unknown study {name!r}; choose from {', '.join(NAMES)}")
    return BY_NAME[name]
