"""Writing study files (format ``gradnoise-study``, :mod:`gradnoise.formats`) so that a
failed study never costs the last good one.

A study on one task writes ``<out>/<study>-<task>.jsonl``. While it runs, its lines go to
``<out>/.partial/<study>-<task>.jsonl`` (appended and flushed as produced); only when the
study succeeds is the earlier file of that name moved into ``<out>/previous/`` and the
new one moved into place (:meth:`StudyWriter.commit`). A study that fails leaves the
earlier result where it was and its own partial file in ``<out>/failed/`` for a look;
the report, which reads ``<out>/*.jsonl``, never shows a half-finished study as done.
Companion files (the trajectory study's monitor run file) are staged and swapped the
same way, together with the study file.
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List

from ..formats import json_safe, num, study_header

__all__ = ["StudyWriter", "num", "set_aside"]


def set_aside(path: Path, folder: Path) -> None:
    """Move an existing ``path`` into ``folder``, named with its time of last change, so
    nothing is ever overwritten or deleted."""
    if not path.exists():
        return
    stamp = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).strftime("%Y%m%dT%H%M%S")
    name = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.name
    dest = folder / f"{name}.{stamp}.jsonl"
    dest.parent.mkdir(parents=True, exist_ok=True)
    i = 1
    while dest.exists():  # two studies within one second
        dest = dest.with_name(f"{name}.{stamp}-{i}.jsonl")
        i += 1
    os.replace(path, dest)


class StudyWriter:
    """Appends the lines of one study file, flushing each; a context manager that
    commits on success and sets the partial file aside on failure.

    Args:
        out: the output folder (created if missing).
        study: the study's name; task: the task's name (both in the file name).
        seed, size, config: recorded in the header.

    Attributes:
        path: where the file lands when the study succeeds.
        staged: where it is written meanwhile.
    """

    def __init__(self, out: "os.PathLike[str] | str", study: str, task: str, seed: int, size: str,
                 config: Dict[str, Any]):
        self.out = Path(out)
        self.path = self.out / f"{study}-{task}.jsonl"
        self._companions: List[Path] = []
        self.staged = self._stage(self.path.name)
        self._f = open(self.staged, "x", encoding="utf-8")
        self.write_obj(study_header(study, task, seed, size, config))

    def _stage(self, name: str) -> Path:
        partial = self.out / ".partial"
        partial.mkdir(parents=True, exist_ok=True)
        staged = partial / name
        set_aside(staged, self.out / "failed")  # left by a study that was killed
        return staged

    def companion(self, name: str) -> Path:
        """A staged path for another file of this study (``name`` in ``out``), moved into
        place with the study file by :meth:`commit`."""
        staged = self._stage(name)
        self._companions.append(staged)
        return staged

    def write(self, type_: str, **fields: Any) -> None:
        """One line ``{"type": type_, **fields}``."""
        self.write_obj({"type": type_, **fields})

    def write_obj(self, obj: Dict[str, Any]) -> None:
        self._f.write(json.dumps(json_safe(obj)) + "\n")
        self._f.flush()

    def commit(self) -> None:
        """The study succeeded: earlier files of these names go to ``previous/``, the new
        ones take their place."""
        self._f.close()
        for staged in [self.staged] + self._companions:
            if staged.exists():
                final = self.out / staged.name
                set_aside(final, self.out / "previous")
                os.replace(staged, final)

    def abandon(self) -> None:
        """The study failed: its partial files go to ``failed/``, earlier results stay."""
        self._f.close()
        for staged in [self.staged] + self._companions:
            set_aside(staged, self.out / "failed")

    def close(self) -> None:
        """Commit (for use without ``with``)."""
        if not self._f.closed:
            self.commit()

    def __enter__(self) -> "StudyWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._f.closed:
            return
        if exc_type is None:
            self.commit()
        else:
            self.abandon()
