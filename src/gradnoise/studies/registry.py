"""The studies, one entry each: name, options, how to run it, its summary line and its
report section. ``gradnoise study``, the runner and the report take the list from here.

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

from ..report.adaptive_section import adaptive_section
from ..report.escape_section import escape_section
from ..report.federated_section import federated_section
from ..report.lm_section import lm_section
from ..report.noise_sections import trajectory_section
from ..report.online_section import online_section
from ..report.optimizers_section import optimizers_section
from ..report.sections import critical_section, law_section, lr_batch_section, recommend_section
from . import adaptive, critical, escape, federated, law, lm, lrbatch, online, optimizers, recommend, summary, trajectory


@dataclass(frozen=True)
class Study:
    """One study.

    Attributes:
        name: as typed on the command line and written in its files.
        run: see the module docstring.
        config: its configuration dataclass (None: it has no options).
        line: ``line(summary) -> str``, one readable line for the end of the command.
        section: the report section of its files (``section(items) -> Section``).
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
    section: Callable
    sweep: bool = False
    reads_runs: bool = False
    tasks: Tuple[str, ...] = ()
    fits: Optional[Callable] = None


STUDIES: Tuple[Study, ...] = (
    Study("law", law.run, law.LawConfig, summary.law_line, law_section),
    Study("trajectory", trajectory.run, trajectory.TrajectoryConfig, summary.trajectory_line, trajectory_section),
    Study("critical-batch", critical.run, critical.CriticalConfig, summary.critical_line, critical_section,
          sweep=True),
    Study("lr-batch", lrbatch.run, lrbatch.LrBatchConfig, summary.lr_batch_line, lr_batch_section, sweep=True),
    Study("optimizers", optimizers.run, optimizers.OptimizersConfig, summary.optimizers_line, optimizers_section,
          sweep=True),
    Study("adaptive", adaptive.run, adaptive.AdaptiveConfig, summary.adaptive_line, adaptive_section, sweep=True),
    Study("escape", escape.run, escape.EscapeConfig, summary.escape_line, escape_section, sweep=True),
    Study("lm", lm.run, lm.LmConfig, lm.summary_line, lm_section, tasks=("pydoc-gpt",)),
    Study("federated", federated.run, federated.FederatedConfig, federated.summary_line, federated_section,
          sweep=True, fits=federated.fits),
    Study("online", online.run, online.OnlineConfig, online.summary_line, online_section, sweep=True,
          fits=online.fits),
    Study("recommend", recommend.run, None, summary.recommend_line, recommend_section, reads_runs=True),
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


def sections() -> Dict[str, Callable]:
    """Study name -> report section, in the page's order (for
    :func:`gradnoise.report.build_report`)."""
    return {s.name: s.section for s in STUDIES}
