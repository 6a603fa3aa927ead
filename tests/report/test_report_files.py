"""Reading the report's inputs: every malformed file is a one-line ValueError naming the
file (and line); a half-written last line is skipped with a warning."""
import re

import pytest

from gradnoise.report import build_report, read_study
from gradnoise.report.files import load, sniff

HEADER = {"type": "header", "format": "gradnoise-study", "version": 1, "study": "law", "task": "t",
          "seed": 0, "size": "tiny", "config": {}, "created": "2026-01-01T00:00:00+00:00"}
RUN_HEADER = {"type": "header", "format": "gradnoise-run", "version": 1, "source": "per_sample", "every": 1,
              "beta": 0.9, "params": ["w"], "created": "2026-01-01T00:00:00+00:00"}
POINT = {"type": "point", "checkpoint": "init", "batch_size": 4, "batches": 10, "mse": 1.0, "mse_se": 0.1,
         "predicted": 1.02, "z": -0.2}


def _step(i):
    return {"type": "step", "step": i, "source": "per_sample", "skipped": False, "flag": None, "loss_scale": None,
            "batch_size": 8, "n_groups": 8, "raw": {"trace_cov": 2.0, "grad_sq_norm": 0.5, "b_simple": 4.0,
                                                    "flag": None},
            "smoothed": {"trace_cov": 2.0, "grad_sq_norm": 0.5, "b_simple": 4.0},
            "b_simple_interval": ["-inf", "inf"], "by_param": {}}


def _raises(path, *patterns):
    """build_report fails with a one-line message naming ``path`` and matching ``patterns``."""
    with pytest.raises(ValueError) as info:
        build_report([path], path.parent / "out")
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    for p in patterns:
        assert re.search(p, message), message
    assert not (path.parent / "out" / "index.html").exists()
    return message


BAD = {
    "empty": ([], "", "empty"),
    "blank": (["", "  "], "\n", "empty"),
    "not-json": (["hello, world"], "\n", "line 1: not JSON"),
    "array": (["[1, 2]"], "\n", "no header"),
    "no-header": ([POINT], "\n", "no header"),
    "unknown-format": ([{"type": "header", "format": "tensorboard", "version": 1}], "\n",
                       "unknown format 'tensorboard'"),
    "study-v3": ([dict(HEADER, version=3)], "\n",
                 "version 3 of gradnoise-study is not supported by this gradnoise.*upgrade"),
    "run-v3": ([dict(RUN_HEADER, version=3)], "\n",
               "version 3 of gradnoise-run is not supported by this gradnoise.*upgrade"),
    "unknown-study": ([dict(HEADER, study="magic")], "\n", "unknown study 'magic'"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_inputs_name_the_file(lines_file, name):
    lines, end, pattern = BAD[name]
    _raises(lines_file(f"{name}.jsonl", lines, end=end), pattern)


def test_missing_file_and_no_files(tmp_path):
    _raises(tmp_path / "absent.jsonl", "no such file")
    with pytest.raises(ValueError, match="at least one"):
        build_report([], tmp_path / "out")


@pytest.mark.parametrize("header,body", [(HEADER, POINT), (RUN_HEADER, _step(0))])
def test_corrupt_middle_line_names_the_line(lines_file, header, body):
    path = lines_file("middle.jsonl", [header, body, '{"type": "po', body])
    _raises(path, "line 3", "corrupt")


def test_middle_line_without_type(lines_file):
    path = lines_file("untyped.jsonl", [HEADER, {"no": "type"}, POINT])
    with pytest.raises(ValueError, match=r"untyped\.jsonl, line 2"):
        read_study(path)


def test_read_study_round_trip_and_blank_lines(lines_file):
    path = lines_file("ok.jsonl", [HEADER, POINT, "", dict(POINT, batch_size=8, mse_se=None, z="inf")])
    header, lines = read_study(path)
    assert header["study"] == "law" and [ln["batch_size"] for ln in lines] == [4, 8]
    assert lines[1]["mse_se"] is None and lines[1]["z"] == "inf"


def test_read_study_refuses_a_run_file(lines_file):
    path = lines_file("run.jsonl", [RUN_HEADER, _step(0)])
    with pytest.raises(ValueError, match="gradnoise-run file, not a gradnoise-study"):
        read_study(path)
    assert sniff(path) == "gradnoise-run"


def test_incomplete_last_line_warns_and_builds(lines_file, tmp_path):
    study = lines_file("law-t.jsonl", [HEADER, POINT, '{"type": "point", "checkpoint": "in'], end="")
    with pytest.warns(UserWarning, match=r"law-t\.jsonl, line 3: incomplete last line"):
        header, lines = read_study(study)
    assert len(lines) == 1
    run = lines_file("run.jsonl", [RUN_HEADER, _step(0), _step(1), '{"type": "step", "st'], end="")
    with pytest.warns(UserWarning, match="incomplete last line"):
        index = build_report([study, run], tmp_path / "out")
    assert index.exists() and "Run file run.jsonl" in index.read_text(encoding="utf-8")


def test_complete_last_line_that_is_corrupt_is_an_error(lines_file):
    path = lines_file("law-t.jsonl", [HEADER, POINT, '{"type": "po'], end="\n")
    with pytest.raises(ValueError, match="line 3"):
        read_study(path)


def test_trajectory_run_file_missing_warns(lines_file):
    header = dict(HEADER, study="trajectory", config={"run_file": "gone.run.jsonl"})
    path = lines_file("trajectory-t.jsonl", [header, {"type": "step", "step": 0, "loss": 1.0, "full_loss": None}])
    with pytest.warns(UserWarning, match="gone.run.jsonl is not beside"):
        inp = load(path)
    assert inp.run is None and "gone.run.jsonl" in inp.note


def test_trajectory_run_file_of_unknown_version_is_an_error(lines_file):
    lines_file("traj.run.jsonl", [dict(RUN_HEADER, version=7)])
    header = dict(HEADER, study="trajectory", config={"run_file": "traj.run.jsonl"})
    path = lines_file("trajectory-t.jsonl", [header])
    with pytest.raises(ValueError, match=r"traj\.run\.jsonl: version 7 of gradnoise-run"):
        load(path)


def test_undefined_numbers_are_read_as_written(lines_file):
    path = lines_file("nulls.jsonl", [HEADER, dict(POINT, mse=None, z="-inf")])
    _, lines = read_study(path)
    assert lines[0]["mse"] is None and lines[0]["z"] == "-inf"
