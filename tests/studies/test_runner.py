"""Which study runs on which task in ``gradnoise study`` (no study is run: the runner's
job list is recorded)."""
import pytest

from gradnoise.studies import runner


@pytest.fixture
def jobs(monkeypatch):
    seen = []

    def fake(job, out, seed, size, keep_going):
        seen.append((job.study.name, job.name))
        return runner.Outcome(job.study.name, job.name, {}, 0.0)

    monkeypatch.setattr(runner, "_one", fake)
    return seen


def test_by_default_a_study_with_tasks_of_its_own_runs_on_them(jobs, tmp_path):
    runner.run_studies(["law", "trajectory", "escape", "lm"], [], tmp_path, quiet=True)
    assert jobs == [("law", "digits-mlp"), ("law", "digits-cnn"), ("trajectory", "digits-mlp"),
                    ("trajectory", "digits-cnn"), ("escape", "digits-mlp"), ("lm", "pydoc-gpt")]


def test_named_tasks_leave_out_the_studies_with_tasks_of_their_own_unless_they_are_named(jobs, tmp_path):
    runner.run_studies([], ["digits-mlp"], tmp_path, quiet=True)
    names = [s for s, _ in jobs]
    assert "lm" not in names and "online" in names and "federated" in names
    assert {t for _, t in jobs} == {"digits-mlp"}
    jobs.clear()
    runner.run_studies(["lm"], ["pydoc-gpt", "digits-mlp"], tmp_path, quiet=True)
    assert jobs == [("lm", "pydoc-gpt"), ("lm", "digits-mlp")]
