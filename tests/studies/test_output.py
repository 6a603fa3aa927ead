"""Study files are swapped in only on success (``gradnoise.studies.output``), and the
folders beside them stay small: one earlier version in ``previous/``, no stale partial
files in ``failed/`` once the study has succeeded."""
import pytest

from gradnoise.studies.output import StudyWriter


def _run(out, task="t", value=0, fail=False, companion=False):
    with StudyWriter(out, "law", task, 0, "tiny", {}) as w:
        if companion:
            w.companion(f"law-{task}.run.jsonl").write_text(f"run {value}\n")
        w.write("point", value=value)
        if fail:
            raise RuntimeError("boom")


def test_a_successful_rerun_clears_the_failed_partial_files_of_its_name_only(tmp_path):
    for task, companion in (("t", True), ("other", False)):
        with pytest.raises(RuntimeError):
            _run(tmp_path, task=task, fail=True, companion=companion)
    assert len(list((tmp_path / "failed").iterdir())) == 3
    _run(tmp_path, value=1, companion=True)
    assert [p.name.split(".")[0] for p in (tmp_path / "failed").iterdir()] == ["law-other"]
    assert '"value": 1' in (tmp_path / "law-t.jsonl").read_text()


def test_a_failed_run_keeps_its_partial_file_beside_the_last_good_result(tmp_path):
    _run(tmp_path, value=1)
    with pytest.raises(RuntimeError):
        _run(tmp_path, value=2, fail=True)
    assert '"value": 1' in (tmp_path / "law-t.jsonl").read_text()
    assert len(list((tmp_path / "failed").glob("law-t.*.jsonl"))) == 1
    assert not (tmp_path / "previous").exists()


def test_previous_keeps_only_the_version_the_last_commit_replaced(tmp_path):
    for value in range(4):
        _run(tmp_path, value=value, companion=True)
    kept = sorted(p.name.split(".")[0] + (".run" if ".run." in p.name else "")
                  for p in (tmp_path / "previous").iterdir())
    assert kept == ["law-t", "law-t.run"]
    study = next(p for p in (tmp_path / "previous").iterdir() if ".run." not in p.name)
    assert '"value": 2' in study.read_text()
    assert (tmp_path / "previous" / next(p.name for p in (tmp_path / "previous").iterdir()
                                         if ".run." in p.name)).read_text() == "run 2\n"
