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

Both folders stay small: ``previous/`` keeps one earlier version of each file (the one
its commit replaced; an older one is deleted then), and a commit deletes the failed
partial files of its names, which the good result has superseded.
"""
from __future__ import annotations

import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List

from ..formats import json_safe, num, study_header

__all__ = ["StudyWriter", "num", "set_aside"]


def _stem(name: str) -> str:
    return name[: -len(".jsonl")] if name.endswith(".jsonl") else name


def set_aside(path: Path, folder: Path) -> None:
    """Move an existing ``path`` into ``folder`` as ``<stem>.<time of last change>.jsonl``
    (never over another file)."""
    if not path.exists():
        return
    stamp = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).strftime("%Y%m%dT%H%M%S")
    name = _stem(path.name)
    dest = folder / f"{name}.{stamp}.jsonl"
    dest.parent.mkdir(parents=True, exist_ok=True)
    i = 1
    while dest.exists():  # two studies within one second
        dest = dest.with_name(f"{name}.{stamp}-{i}.jsonl")
        i += 1
    os.replace(path, dest)


def set_aside_versions(name: str, folder: Path) -> List[Path]:
    """The files :func:`set_aside` made of the file ``name`` in ``folder`` (not those of
    another name that starts the same: ``trajectory-t.run.…`` is not a version of
    ``trajectory-t.jsonl``)."""
    pattern = re.compile(re.escape(_stem(name)) + r"\.\d{8}T\d{6}(-\d+)?\.jsonl")
    return sorted(p for p in folder.glob("*.jsonl") if pattern.fullmatch(p.name)) if folder.is_dir() else []


def _delete(paths: List[Path]) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


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
        """The study succeeded: earlier files of these names go to ``previous/`` (replacing
        the version kept there), the new ones take their place, and the failed partial
        files of these names are deleted."""
        self._f.close()
        for staged in [self.staged] + self._companions:
            if staged.exists():
                final = self.out / staged.name
                if final.exists():
                    _delete(set_aside_versions(staged.name, self.out / "previous"))
                set_aside(final, self.out / "previous")
                os.replace(staged, final)
            _delete(set_aside_versions(staged.name, self.out / "failed"))

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
