"""Reading the report's inputs: ``gradnoise-study``, ``gradnoise-run`` and
``gradnoise-probe`` files.

The report reads files, never objects (DESIGN.md §3). Each input is told apart by the
``format`` of its first line (of its one object, for a probe file); a trajectory study also
brings the monitor's run file it names in ``header["config"]["run_file"]`` (relative to the
study file's folder).

Both formats are JSON Lines written line by line and flushed, so a file may end in a
half-written line while its writer runs or after it was killed: that last line (no
trailing newline, not a JSON object) is skipped with a warning. Every other problem is a
``ValueError`` whose one-line message names the file and, where there is one, the line.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..formats import (FORMATS, PROBE_FORMAT, RUN_FORMAT, STUDY_FORMAT, check_header, first_object, read_probe,
                       read_run, read_study, sniff, top_object)

Lines = List[Dict[str, Any]]

WRITERS = ("a gradnoise run file is written by a NoiseMonitor with a JSONL sink "
           "(gradnoise.NoiseMonitor(model, sinks=[\"run.jsonl\"]) in your training loop), a study file by "
           "gradnoise study, a probe file by gradnoise probe")


@dataclass(frozen=True)
class Input:
    """One file given to the report, read and validated.

    Attributes:
        path: the file.
        format: ``"gradnoise-study"``, ``"gradnoise-run"`` or ``"gradnoise-probe"``.
        header: its header line (a probe file's whole object).
        lines: the later lines (study lines, or a run file's step lines), in file order
            (none for a probe file).
        run: for a trajectory study, ``(header, steps)`` of the run file it names, or None.
        run_path: that run file's path, or None.
        note: why the run file of a trajectory study could not be shown, or None.
    """

    path: Path
    format: str
    header: Dict[str, Any]
    lines: Lines
    run: Optional[Tuple[Dict[str, Any], Lines]] = None
    run_path: Optional[Path] = None
    note: Optional[str] = None

    @property
    def study(self) -> Optional[str]:
        """The study's name (``"law"``, …) or None for a run file."""
        return self.header.get("study") if self.format == STUDY_FORMAT else None

    def of_type(self, type_: str) -> Lines:
        """The lines whose ``type`` is ``type_``."""
        return [ln for ln in self.lines if ln.get("type") == type_]


def _run_of(path: Path, header: Dict[str, Any]) -> Tuple[Optional[Path], Optional[str]]:
    """The run file a trajectory study names, or a note saying why there is none."""
    config = header.get("config") if isinstance(header.get("config"), dict) else {}
    name = config.get("run_file")
    if not isinstance(name, str) or not name:
        return None, "the study file names no run file (config.run_file)"
    run_path = path.parent / name
    if not run_path.exists():
        return run_path, f"its run file {name} is not beside the study file"
    return run_path, None


def _sniff(path: Path) -> str:
    """:func:`sniff`, whose message, for a JSON file of another tool, also says what
    writes the files gradnoise reads."""
    try:
        return sniff(path)
    except ValueError as e:
        first = top_object(path)
        ours = isinstance(first, dict) and first.get("format") in FORMATS
        if first is None or ours:  # missing, empty or not JSON, or ours with another fault: sniff says it
            raise
        raise ValueError(f"{e}: not a gradnoise file; {WRITERS}") from None


def load(path: "os.PathLike[str] | str") -> Input:
    """Read one input of the report: a study file (with its run file, for a trajectory
    study), a monitor run file or a probe file.

    A trajectory study whose run file is missing is still read: the report then shows
    its losses with a note (and this warns). A run file that exists but is corrupt is an
    error like any other input.

    Raises:
        ValueError: as :func:`read_study`, :func:`gradnoise.read_run` and
            :func:`~gradnoise.formats.read_probe`.
    """
    path = Path(path)
    fmt = _sniff(path)
    if fmt == PROBE_FORMAT:
        return Input(path, fmt, read_probe(path), [])
    if fmt == RUN_FORMAT:
        header, steps = read_run(path)
        return Input(path, fmt, header, steps)
    header, lines = read_study(path)
    if header.get("study") != "trajectory":
        return Input(path, fmt, header, lines)
    run_path, note = _run_of(path, header)
    if note is not None:
        warnings.warn(f"{path}: {note}; the report shows its losses only", stacklevel=2)
        return Input(path, fmt, header, lines, None, run_path, note)
    first = first_object(run_path)
    if isinstance(first, dict):  # the same message as for inputs; read_run checks the rest
        check_header(first, os.fspath(run_path), 1, RUN_FORMAT)
    return Input(path, fmt, header, lines, read_run(run_path), run_path)


__all__ = ["Input", "PROBE_FORMAT", "RUN_FORMAT", "STUDY_FORMAT", "load", "read_probe", "read_run", "read_study",
           "sniff"]
