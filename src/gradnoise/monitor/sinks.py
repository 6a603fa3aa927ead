"""Where :class:`~gradnoise.monitor.record.StepRecord` s go: run files, CSV, loggers.

Every sink follows one protocol: ``open(header)`` once, with the run file's header
(:func:`gradnoise.formats.run_header`), before the first record; ``write(record)`` per
step; ``close()`` at the end. File sinks only ever append and flush each line, so a
reader sees every finished step while the run goes on, and a file is never rewritten.
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Dict, Optional

from ..formats import RUN_FORMAT, RUN_VERSION, check_header, first_object, read_run
from .record import StepRecord

__all__ = ["CsvSink", "JsonlSink", "MetricsLoggerSink", "Sink", "TensorBoardSink", "as_sink", "read_run"]

CSV_COLUMNS = (
    "step", "batch_size", "n_groups", "skipped", "flag", "loss_scale",
    "trace_cov", "grad_sq_norm", "b_simple",
    "raw_trace_cov", "raw_grad_sq_norm", "raw_b_simple",
    "b_simple_low", "b_simple_high",
)


class Sink:
    """Base of the sinks: ``open`` and ``close`` do nothing unless overridden."""

    def open(self, header: Dict[str, Any]) -> None:
        """Called once, before the first record, with :func:`record.header`'s dict."""

    def write(self, record: StepRecord) -> None:
        """Store one step."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the sink holds; safe to call twice."""


class JsonlSink(Sink):
    """The ``gradnoise-run`` file of :mod:`gradnoise.monitor.record`, appended line by line.

    A new or empty file gets the header line. An existing run file is continued only
    when its header is of this format, a known version and the same ``source``;
    otherwise :meth:`open` raises ``ValueError`` and leaves the file untouched.

    Args:
        path: the ``.jsonl`` file.
        fsync: also ``os.fsync`` after each line (durable on power loss, slower).
    """

    def __init__(self, path: "os.PathLike[str] | str", fsync: bool = False):
        self.path = os.fspath(path)
        self.fsync = fsync
        self._file = None

    def open(self, header: Dict[str, Any]) -> None:
        check_header(header, "the header given to JsonlSink.open", 0, RUN_FORMAT)
        if header["version"] != RUN_VERSION:
            raise ValueError(f"JsonlSink writes version {RUN_VERSION}, got a header of version {header['version']}")
        new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        if not new:
            old = _existing_header(self.path)
            if old.get("version") != RUN_VERSION:
                raise ValueError(f"{self.path}: the run file is of version {old.get('version')}, this gradnoise "
                                 f"writes version {RUN_VERSION}; use another file")
            if old.get("source") != header.get("source"):
                raise ValueError(
                    f"{self.path}: the run file holds source {old.get('source')!r}, this monitor "
                    f"writes {header.get('source')!r}; use another file"
                )
        self._file = open(self.path, "a", encoding="utf-8", newline="")
        if new:
            self._line(header)

    def write(self, record: StepRecord) -> None:
        if self._file is None:
            raise RuntimeError(f"JsonlSink({self.path!r}).write called before open(header)")
        self._line(record.to_dict())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _line(self, obj: Dict[str, Any]) -> None:
        text = json.dumps(obj, allow_nan=False) + "\n"  # serialise fully before writing
        self._file.write(text)
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())


def _existing_header(path: str) -> Dict[str, Any]:
    """The validated header of a non-empty run file about to be appended to."""
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        complete = f.read(1) == b"\n"
    obj = first_object(path)
    if obj is None:
        raise ValueError(f"{path}, line 1: not a gradnoise-run header (not JSON); refusing to append")
    check_header(obj, path, 1, RUN_FORMAT)
    if not complete:
        raise ValueError(
            f"{path}: the last line is incomplete (a run killed mid-write?); appending would "
            "corrupt it. Remove the partial line or write to another file"
        )
    return obj


class CsvSink(Sink):
    """One CSV row per step, columns :data:`CSV_COLUMNS` (smoothed values unprefixed).

    Undefined numbers are empty cells, unbounded interval ends ``inf``/``-inf``,
    ``skipped`` is ``true``/``false``. A new or empty file gets the header row; an existing
    file is appended to only when its header row is exactly :data:`CSV_COLUMNS`.

    Args:
        path: the ``.csv`` file.
    """

    def __init__(self, path: "os.PathLike[str] | str"):
        self.path = os.fspath(path)
        self._file = None
        self._writer = None

    def open(self, header: Optional[Dict[str, Any]] = None) -> None:
        new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        if not new:
            with open(self.path, newline="", encoding="utf-8") as f:
                first = next(csv.reader(f), [])
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                complete = f.read(1) == b"\n"
            if tuple(first) != CSV_COLUMNS:
                raise ValueError(
                    f"{self.path}: header row {first} differs from {list(CSV_COLUMNS)}; refusing to append"
                )
            if not complete:
                raise ValueError(f"{self.path}: the last row is incomplete; refusing to append")
        self._file = open(self.path, "a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file, lineterminator="\n")
        if new:
            self._row(CSV_COLUMNS)

    def write(self, record: StepRecord) -> None:
        if self._writer is None:
            raise RuntimeError(f"CsvSink({self.path!r}).write called before open(header)")
        r, s = record.raw, record.smoothed
        low, high = record.b_simple_interval
        self._row((
            record.step, r.batch_size, r.n_groups, "true" if record.skipped else "false",
            record.flag or "", _cell(record.loss_scale),
            _cell(s.trace_cov), _cell(s.grad_sq_norm), _cell(s.b_simple),
            _cell(r.trace_cov), _cell(r.grad_sq_norm), _cell(r.b_simple),
            _cell(low), _cell(high),
        ))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file, self._writer = None, None

    def _row(self, row) -> None:
        self._writer.writerow(row)
        self._file.flush()


def _cell(v: Optional[float]) -> str:
    """``""`` for None/NaN, else ``repr`` (exact round trip; ``inf``/``-inf``)."""
    return "" if v is None or math.isnan(v) else repr(float(v))


class TensorBoardSink(Sink):
    """Scalars of :meth:`StepRecord.metrics` to TensorBoard, at ``global_step = record.step``.

    Args:
        log_dir: directory for a new ``torch.utils.tensorboard.SummaryWriter`` (its
            default ``runs/…`` when None); ignored when ``writer`` is given.
        writer: an existing writer (anything with ``add_scalar``); it is flushed, not
            closed, by :meth:`close`.
        per_param: also log ``noise/<stat>/<param>``.

    Raises:
        ImportError: when no writer is given and ``tensorboard`` is not installed.
    """

    def __init__(self, log_dir: Optional[str] = None, writer: Any = None, per_param: bool = True):
        self.per_param = per_param
        self._owned = writer is None
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError(
                    "TensorBoardSink needs the tensorboard package: pip install gradnoise[tensorboard]"
                ) from e
            writer = SummaryWriter(log_dir=log_dir)
        self.writer = writer

    def write(self, record: StepRecord) -> None:
        for tag, value in record.metrics(self.per_param).items():
            self.writer.add_scalar(tag, value, record.step)

    def close(self) -> None:
        if self.writer is None:
            return
        if self._owned:
            self.writer.close()
        elif hasattr(self.writer, "flush"):
            self.writer.flush()
        self.writer = None


class MetricsLoggerSink(Sink):
    """Any logger with ``log_metrics(metrics: dict, step: int)`` (Lightning loggers,
    W&B-style adapters). The logger is neither opened nor closed here.

    Args:
        logger: the logger.
        per_param: also log ``noise/<stat>/<param>``.
    """

    def __init__(self, logger: Any, per_param: bool = True):
        if not callable(getattr(logger, "log_metrics", None)):
            raise TypeError(f"{type(logger).__name__} has no log_metrics(metrics, step) method")
        self.logger = logger
        self.per_param = per_param

    def write(self, record: StepRecord) -> None:
        self.logger.log_metrics(record.metrics(self.per_param), step=record.step)


def as_sink(obj: Any) -> Any:
    """A sink from what the user passed.

    Returns ``obj`` itself when it has ``write``; wraps an object with ``log_metrics`` in
    :class:`MetricsLoggerSink` and one with ``add_scalar`` (a ``SummaryWriter``) in
    :class:`TensorBoardSink`; a path ending in ``.jsonl`` gives :class:`JsonlSink`, in
    ``.csv`` :class:`CsvSink`.

    Raises:
        TypeError: for anything else, including a path with another suffix.
    """
    if callable(getattr(obj, "write", None)):
        return obj
    if callable(getattr(obj, "log_metrics", None)):
        return MetricsLoggerSink(obj)
    if callable(getattr(obj, "add_scalar", None)):
        return TensorBoardSink(writer=obj)
    if isinstance(obj, (str, os.PathLike)):
        path = os.fspath(obj)
        suffix = os.path.splitext(path)[1].lower()
        if suffix == ".jsonl":
            return JsonlSink(path)
        if suffix == ".csv":
            return CsvSink(path)
        raise TypeError(f"cannot make a sink from the path {path!r}: it must end in .jsonl or .csv")
    raise TypeError(
        f"cannot make a sink from a {type(obj).__name__}: pass an object with write(record), "
        "a logger with log_metrics(metrics, step), a SummaryWriter, or a path ending in .jsonl or .csv"
    )
