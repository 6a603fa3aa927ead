"""Sinks: the run file round-trips and is only ever appended to; readers refuse what they
do not know; CSV, TensorBoard and logger adapters carry the same numbers."""
import csv
import json
import math
import os
import sys

import pytest

from gradnoise import stats
from gradnoise.formats import run_header as header
from gradnoise.monitor.record import StepRecord
from gradnoise.monitor.sinks import (
    CSV_COLUMNS,
    CsvSink,
    JsonlSink,
    MetricsLoggerSink,
    TensorBoardSink,
    as_sink,
    read_run,
)

PARAMS = ["fc.weight", "fc.bias"]
INF = math.inf


def _stats(aw, cw, ab, cb, batch=8):
    return stats.total({"fc.weight": stats.from_moments(aw, cw, batch, batch),
                        "fc.bias": stats.from_moments(ab, cb, batch, batch)})


def _records():
    """Three steps: two measured, then a flagged (NaN gradients) skipped one."""
    s1 = _stats(2.0, 0.5, 0.3, 0.1)
    s2 = _stats(3.0, 0.9, 0.4, 0.2)
    sm = _stats(2.5, 0.7, 0.35, 0.15)
    bad = _stats(math.nan, 0.5, 0.3, 0.1)
    assert s1.ok and s2.ok and bad.flag == stats.FLAG_NON_FINITE
    return [
        StepRecord(0, "per_sample", s1, s1, (1.5, 9.0)),
        StepRecord(1, "per_sample", s2, sm, (2.0, INF)),
        StepRecord(2, "per_sample", bad, sm, (-INF, INF), skipped=True, flag=bad.flag, loss_scale=65536.0),
    ]


def _header(source="per_sample"):
    return header(source, 1, 0.95, PARAMS)


def _write(sink, records, head=None):
    sink.open(head or _header())
    for r in records:
        sink.write(r)
    sink.close()


def test_jsonl_round_trip(tmp_path):
    path = tmp_path / "run.jsonl"
    recs = _records()
    _write(JsonlSink(path), recs)
    head, steps = read_run(path)
    assert head["format"] == "gradnoise-run" and head["version"] == 2
    assert head["source"] == "per_sample" and head["params"] == PARAMS and head["beta"] == 0.95
    assert [s["step"] for s in steps] == [0, 1, 2]
    s1 = steps[1]
    assert s1["raw"]["trace_cov"] == recs[1].raw.trace_cov
    assert s1["smoothed"]["b_simple"] == recs[1].smoothed.b_simple
    assert s1["by_param"]["fc.bias"]["raw"]["grad_sq_norm"] == recs[1].raw.by_param["fc.bias"].grad_sq_norm
    assert s1["b_simple_interval"] == [2.0, "inf"]
    bad = steps[2]
    assert bad["skipped"] is True and bad["flag"] == "non_finite" and bad["loss_scale"] == 65536.0
    assert bad["raw"] == {"trace_cov": None, "grad_sq_norm": None, "b_simple": None, "flag": "non_finite"}
    assert bad["b_simple_interval"] == ["-inf", "inf"]
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()


def test_jsonl_append_never_rewrites(tmp_path):
    path = tmp_path / "run.jsonl"
    recs = _records()
    _write(JsonlSink(path), recs[:2])
    before = path.read_bytes()
    _write(JsonlSink(path), recs[2:])
    after = path.read_bytes()
    assert after.startswith(before) and len(after) > len(before)
    head, steps = read_run(path)
    assert [s["step"] for s in steps] == [0, 1, 2]
    assert after.count(b'"type": "header"') == 1


def test_jsonl_lines_are_visible_while_open(tmp_path):
    path = tmp_path / "run.jsonl"
    sink = JsonlSink(path)
    sink.open(_header())
    for i, r in enumerate(_records()):
        sink.write(r)
        _, steps = read_run(path)
        assert len(steps) == i + 1
    sink.close()


@pytest.mark.parametrize("first, match", [
    ({"type": "header", "format": "other-run", "version": 1, "source": "per_sample"}, "format"),
    ({"type": "header", "format": "gradnoise-run", "version": 1, "source": "per_sample"}, "version 1"),
    ({"type": "header", "format": "gradnoise-run", "version": 3, "source": "per_sample"}, "version 3"),
    ({"type": "step", "step": 0}, "header"),
    ({"type": "header", "format": "gradnoise-run", "version": 2, "source": "ddp"}, "source"),
    ("plain text, not json", "line 1"),
])
def test_jsonl_refuses_to_append_to_a_foreign_file(tmp_path, first, match):
    path = tmp_path / "run.jsonl"
    path.write_text((first if isinstance(first, str) else json.dumps(first)) + "\n")
    before = path.read_bytes()
    sink = JsonlSink(path)
    with pytest.raises(ValueError, match=match) as info:
        sink.open(_header())
    assert "run.jsonl" in str(info.value)
    assert path.read_bytes() == before


def test_jsonl_refuses_to_append_after_a_partial_line(tmp_path):
    path = tmp_path / "run.jsonl"
    _write(JsonlSink(path), _records()[:1])
    with open(path, "a") as f:
        f.write('{"type": "step", "st')
    before = path.read_bytes()
    with pytest.raises(ValueError, match="incomplete"):
        JsonlSink(path).open(_header())
    assert path.read_bytes() == before


def test_jsonl_write_before_open_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="before open"):
        JsonlSink(tmp_path / "run.jsonl").write(_records()[0])


def test_read_run_corrupt_middle_line_names_line(tmp_path):
    path = tmp_path / "run.jsonl"
    _write(JsonlSink(path), _records())
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = lines[2][: len(lines[2]) // 2] + "\n"  # line 3 cut in half, line 4 intact
    path.write_text("".join(lines))
    with pytest.raises(ValueError, match=r"run\.jsonl, line 3: corrupt"):
        read_run(path)


def test_read_run_truncated_last_line_warns(tmp_path):
    path = tmp_path / "run.jsonl"
    _write(JsonlSink(path), _records())
    text = path.read_text()
    path.write_text(text[: len(text) - 40])  # killed mid-way through the last step
    with pytest.warns(UserWarning, match="line 4: incomplete"):
        head, steps = read_run(path)
    assert head["source"] == "per_sample"
    assert [s["step"] for s in steps] == [0, 1]


@pytest.mark.parametrize("content, match", [
    (None, "no such file"),
    ("", "empty"),
    ('{"type": "step", "step": 0}\n', "line 1: no header line"),
    ('{"type": "header", "format": "gradnoise-run", "version": 7}\n', "version 7 of gradnoise-run is not supported"),
    ('{"type": "header", "format": "csv-run", "version": 1}\n', "unknown format 'csv-run'"),
])
def test_read_run_refuses_bad_files(tmp_path, content, match):
    path = tmp_path / "run.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        read_run(path)
    assert "run.jsonl" in str(info.value)


def test_read_run_refuses_a_second_header(tmp_path):
    path = tmp_path / "run.jsonl"
    _write(JsonlSink(path), _records()[:1])
    with open(path, "a") as f:
        f.write(json.dumps(_header()) + "\n")
    with pytest.raises(ValueError, match="line 3: expected a step"):
        read_run(path)


def test_csv_round_trip_and_append(tmp_path):
    path = tmp_path / "run.csv"
    recs = _records()
    _write(CsvSink(path), recs[:2])
    before = path.read_bytes()
    _write(CsvSink(path), recs[2:])
    assert path.read_bytes().startswith(before)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 3
    r0, r1, r2 = rows
    assert int(r1["step"]) == 1 and int(r1["batch_size"]) == 8 and int(r1["n_groups"]) == 8
    assert float(r1["trace_cov"]) == recs[1].smoothed.trace_cov
    assert float(r1["raw_b_simple"]) == recs[1].raw.b_simple
    assert float(r0["b_simple_low"]) == 1.5 and float(r1["b_simple_high"]) == INF
    assert r0["skipped"] == "false" and r0["flag"] == "" and r0["loss_scale"] == ""
    assert r2["skipped"] == "true" and r2["flag"] == "non_finite" and float(r2["loss_scale"]) == 65536.0
    assert r2["raw_trace_cov"] == "" and r2["raw_b_simple"] == ""
    assert float(r2["b_simple_low"]) == -INF


def test_csv_refuses_another_header_row(tmp_path):
    path = tmp_path / "run.csv"
    path.write_text("step,loss\n0,1.5\n")
    with pytest.raises(ValueError, match="run.csv: header row"):
        CsvSink(path).open(_header())
    assert path.read_text() == "step,loss\n0,1.5\n"


class _FakeLogger:
    def __init__(self):
        self.calls = []

    def log_metrics(self, metrics, step):
        self.calls.append((step, dict(metrics)))


def test_metrics_logger_sink(tmp_path):
    logger = _FakeLogger()
    recs = _records()
    _write(MetricsLoggerSink(logger), recs)
    assert [step for step, _ in logger.calls] == [0, 1, 2]
    step, m = logger.calls[1]
    assert m["noise/b_simple"] == recs[1].smoothed.b_simple
    assert m["noise/trace_cov/fc.weight"] == recs[1].smoothed.by_param["fc.weight"].trace_cov
    assert "noise/b_simple_high" not in m  # infinite: left out
    assert "noise/raw/b_simple" not in logger.calls[2][1]  # NaN: left out
    quiet = _FakeLogger()
    _write(MetricsLoggerSink(quiet, per_param=False), recs[:1])
    assert not any(k.endswith("fc.weight") for k in quiet.calls[0][1])


def test_tensorboard_sink_with_a_given_writer():
    class Writer:
        def __init__(self):
            self.scalars, self.flushed = [], False

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

        def flush(self):
            self.flushed = True

    w = Writer()
    recs = _records()
    _write(TensorBoardSink(writer=w), recs[:2])
    assert ("noise/b_simple", recs[1].smoothed.b_simple, 1) in w.scalars
    assert ("noise/grad_sq_norm/fc.bias", recs[0].smoothed.by_param["fc.bias"].grad_sq_norm, 0) in w.scalars
    assert w.flushed


def test_tensorboard_sink_without_tensorboard_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails
    with pytest.raises(ImportError, match=r"pip install gradnoise\[tensorboard\]"):
        TensorBoardSink(log_dir="unused")


def test_tensorboard_sink_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    _write(TensorBoardSink(log_dir=str(tmp_path / "tb")), _records())
    events = [f for f in os.listdir(tmp_path / "tb") if f.startswith("events.out.tfevents")]
    assert events and os.path.getsize(tmp_path / "tb" / events[0]) > 0


def test_as_sink_dispatch(tmp_path):
    js = JsonlSink(tmp_path / "a.jsonl")
    assert as_sink(js) is js
    assert isinstance(as_sink(str(tmp_path / "a.jsonl")), JsonlSink)
    assert isinstance(as_sink(tmp_path / "b.CSV"), CsvSink)
    logger = _FakeLogger()
    wrapped = as_sink(logger)
    assert isinstance(wrapped, MetricsLoggerSink) and wrapped.logger is logger


@pytest.mark.parametrize("obj, match", [
    (42, "from a int"),
    ("run.txt", r"must end in \.jsonl or \.csv"),
    (object(), "log_metrics"),
])
def test_as_sink_refuses_the_rest(obj, match):
    with pytest.raises(TypeError, match=match):
        as_sink(obj)
