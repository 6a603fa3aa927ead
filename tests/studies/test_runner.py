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


# ------------------------------------------------------------------ skips (issue 19)
def test_a_study_the_task_cannot_carry_is_skipped_with_its_reason_before_it_runs(jobs, tmp_path, monkeypatch, toy64):
    """Two classes: too few for online's five phases, and no Dirichlet(0.1) split gives
    ten clients eight samples each. Both are skipped (no job runs), not failed; lm is
    skipped through the same outcome field."""
    monkeypatch.setattr(runner, "load", lambda spec, seed: toy64(400, classes=2))
    outcomes = runner.run_studies([], ["two"], tmp_path, quiet=True)
    ran = {s for s, _ in jobs}
    assert "online" not in ran and "federated" not in ran and "law" in ran
    skipped = {o.study: o.skipped for o in outcomes if o.skipped is not None}
    assert set(skipped) == {"lm", "online", "federated"}
    assert "5 phases" in skipped["online"] and "2" in skipped["online"]
    assert "Dirichlet(α=0.1)" in skipped["federated"] and "10 clients" in skipped["federated"]
    assert "gradnoise study lm --task" in skipped["lm"]
    assert all(o.error is None for o in outcomes if o.study != "recommend")  # (no trajectory file: faked)


def test_the_federated_check_is_exact(toy64):
    """``fits`` replays the splits the study draws from the class sizes alone: it says no
    exactly when a split of the run would fail."""
    import math
    from dataclasses import replace

    from gradnoise.studies import federated

    cfg = replace(federated.FederatedConfig.for_size("tiny"), alphas=[math.inf, 0.05])
    answers = set()
    for n, classes in ((60, 2), (90, 2), (200, 3), (400, 2), (120, 6)):
        task = toy64(n, classes=classes)
        for seed in range(3):
            why = federated.fits(task, cfg, seed)
            try:
                for r in range(cfg.seeds):
                    for alpha in cfg.alphas:
                        federated.partition(task, cfg, alpha, seed, seed + r)
                ok = True
            except ValueError:
                ok = False
            assert (why is None) == ok, (n, classes, seed, why)
            answers.add(ok)
    assert answers == {True, False}  # both cases were met


def test_the_online_check_counts_classes_against_phases(toy64):
    from dataclasses import replace

    from gradnoise.studies import online

    cfg = replace(online.OnlineConfig(), phases=3)
    assert online.fits(toy64(classes=3), cfg) is None
    assert "3 phases" in online.fits(toy64(classes=2), cfg)


def test_the_overall_line_names_each_study_once(monkeypatch, tmp_path):
    """The overall line was redrawn after each study with that study's text (tqdm's
    update refreshes the old description), so ``study 13/14`` showed twice."""
    import io
    import sys
    import time

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    def slow(job, out, seed, size, keep_going):
        time.sleep(0.15)  # past tqdm's refresh interval
        return runner.Outcome(job.study.name, job.name, {}, 0.15)

    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    monkeypatch.setattr(runner, "_one", slow)
    runner.run_studies(["law"], ["digits-mlp"], tmp_path)
    runner.run_studies(["law", "escape"], ["digits-mlp"], tmp_path)
    text = screen.getvalue()
    assert text.count("study 1/1: law on digits-mlp") == 1
    assert text.count("study 1/2: law on digits-mlp") == 1 and text.count("study 2/2: escape on digits-mlp") == 1
