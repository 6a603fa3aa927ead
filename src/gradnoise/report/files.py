"""Reading the report's inputs: ``gradnoise-study`` and ``gradnoise-run`` files.

The report reads files, never objects (DESIGN.md §3). Each input is told apart by the
``format`` of its first line; a trajectory study also brings the monitor's run file it
names in ``header["config"]["run_file"]`` (relative to the study file's folder).

Both formats are JSON Lines written line by line and flushed, so a file may end in a
half-written line while its writer runs or after it was killed: that last line (no
trailing newline, not a JSON object) is skipped with a warning. Every other problem is a
``ValueError`` whose one-line message names the file and, where there is one, the line.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..monitor.record import FORMAT as RUN_FORMAT
from ..monitor.sinks import KNOWN_VERSIONS as RUN_VERSIONS
from ..monitor.sinks import read_jsonl, read_run
from ..studies.output import FORMAT as STUDY_FORMAT
from ..studies.output import STUDIES
from ..studies.output import VERSION as STUDY_VERSION

STUDY_VERSIONS = (STUDY_VERSION,)
FORMATS = {STUDY_FORMAT: STUDY_VERSIONS, RUN_FORMAT: RUN_VERSIONS}

Lines = List[Dict[str, Any]]


@dataclass(frozen=True)
class Input:
    """One file given to the report, read and validated.

    Attributes:
        path: the file.
        format: ``"gradnoise-study"`` or ``"gradnoise-run"``.
        header: its header line.
        lines: the later lines (study lines, or a run file's step lines), in file order.
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


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from None


def _parse(raw: bytes) -> Tuple[Any, Optional[Exception]]:
    try:
        return json.loads(raw.decode("utf-8")), None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        return None, e


def _check_format(obj: Any, path: str, lineno: int, expected: Optional[str] = None) -> str:
    """The header's format after checking it is a known format and version."""
    if not isinstance(obj, dict) or obj.get("type") != "header" or "format" not in obj:
        raise ValueError(f"{path}, line {lineno}: no header line (expected "
                         f"{{\"type\": \"header\", \"format\": ...}}, got {str(obj)[:60]!r})")
    fmt = obj["format"]
    if fmt not in FORMATS:
        raise ValueError(f"{path}: unknown format {fmt!r}; expected {expected or ' or '.join(FORMATS)}")
    if expected is not None and fmt != expected:
        raise ValueError(f"{path}: this is a {fmt} file, not a {expected} file")
    version = obj.get("version")
    if version not in FORMATS[fmt]:
        raise ValueError(f"{path}: version {version!r} of {fmt} is not supported by this gradnoise "
                         f"(it reads version {', '.join(map(str, FORMATS[fmt]))}); upgrade gradnoise")
    return fmt


def _check_study_header(obj: Any, path: str, lineno: int) -> None:
    _check_format(obj, path, lineno, STUDY_FORMAT)
    if obj.get("study") not in STUDIES:
        raise ValueError(f"{path}: unknown study {obj.get('study')!r}; expected one of {', '.join(STUDIES)}")


def read_study(path: "os.PathLike[str] | str") -> Tuple[Dict[str, Any], Lines]:
    """Read and validate a ``gradnoise-study`` file.

    Args:
        path: the study's ``.jsonl`` file.

    Returns:
        ``(header, lines)``: the header dict and every later line (dicts with a
        ``type``) in file order, as written (undefined numbers ``None``, unbounded
        interval ends ``"inf"``/``"-inf"``).

    Raises:
        ValueError: naming the file (and line) when it is missing, empty, not JSON, has
            no header, is of another format, an unknown version or an unknown study, or
            has a corrupt line before the last.
    """
    return read_jsonl(path, _check_study_header, lambda obj: isinstance(obj.get("type"), str),
                      "an object with a 'type'")


def sniff(path: "os.PathLike[str] | str") -> str:
    """The format of a file, from its first non-blank line (checked, version included).

    Raises:
        ValueError: naming the file when it is missing, empty, not JSON, has no header
            line, or is of an unknown format or version.
    """
    path = os.fspath(path)
    data = _read_bytes(path)
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if raw.strip():
            obj, err = _parse(raw)
            if err is not None:
                raise ValueError(f"{path}, line {lineno}: not JSON, so neither a {STUDY_FORMAT} "
                                 f"nor a {RUN_FORMAT} file ({err})")
            return _check_format(obj, path, lineno)
    raise ValueError(f"{path}: the file is empty (no header line)")


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


def load(path: "os.PathLike[str] | str") -> Input:
    """Read one input of the report: a study file (with its run file, for a trajectory
    study) or a monitor run file.

    A trajectory study whose run file is missing is still read: the report then shows
    its losses with a note (and this warns). A run file that exists but is corrupt is an
    error like any other input.

    Raises:
        ValueError: as :func:`read_study` and :func:`gradnoise.read_run`.
    """
    path = Path(path)
    fmt = sniff(path)
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
    first = _first_object(run_path)
    if isinstance(first, dict):  # the same message as for inputs; read_run checks the rest
        _check_format(first, os.fspath(run_path), 1, RUN_FORMAT)
    return Input(path, fmt, header, lines, read_run(run_path), run_path)


def _first_object(path: Path) -> Any:
    """The parsed first non-blank line (None when absent or not JSON; read_run says why)."""
    try:
        with open(path, "rb") as f:
            for raw in f:
                if raw.strip():
                    return _parse(raw)[0]
    except OSError:
        return None
    return None
