"""The command line, driven as a user drives it: through a subprocess."""
import html.parser
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def gradnoise(*args, cwd=None, timeout=300):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "gradnoise", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


class Images(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs).get("src", ""))


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "rep"
    r = gradnoise("study", "law", "trajectory", "recommend", "--task", "digits-mlp", "--size", "tiny",
                  "--seed", "1", "--out", out)
    return r, out


def test_study_writes_the_report_and_a_summary(tiny_study):
    r, out = tiny_study
    assert r.returncode == 0, r.stderr
    assert f"report: {out / 'index.html'}" in r.stdout
    for name in ("law", "trajectory", "recommend"):
        assert name in r.stdout
    assert r.stderr == ""  # not a terminal: no progress bars
    files = sorted(p.name for p in out.glob("*.jsonl"))
    assert files == ["law-digits-mlp.jsonl", "recommend-trajectory-digits-mlp.jsonl",
                     "trajectory-digits-mlp.jsonl", "trajectory-digits-mlp.run.jsonl"]
    assert json.loads((out / "law-digits-mlp.jsonl").read_text().splitlines()[0])["seed"] == 1
    page = Images()
    page.feed((out / "index.html").read_text())
    assert len(page.srcs) >= 3 and all(s.startswith("data:image/png;base64,") for s in page.srcs)


def test_same_seed_same_numbers(tiny_study, tmp_path):
    r, out = tiny_study
    again = tmp_path / "again"
    r2 = gradnoise("study", "law", "--task", "digits-mlp", "--size", "tiny", "--seed", "1", "--out", again,
                   "--quiet")
    assert r2.returncode == 0 and r2.stdout.strip() == f"report: {again / 'index.html'}"

    def points(p):
        return [json.loads(s) for s in p.read_text().splitlines() if '"point"' in s]
    assert points(again / "law-digits-mlp.jsonl") == points(out / "law-digits-mlp.jsonl")


def test_report_from_a_users_run_file(tiny_study, tmp_path):
    _, out = tiny_study
    run = tmp_path / "mine.jsonl"
    shutil.copy(out / "trajectory-digits-mlp.run.jsonl", run)
    r = gradnoise("report", run, "--out", tmp_path / "rep")
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "rep" / "index.html").read_text()
    assert "mine.jsonl" in text


def _one_line(stderr: str, needle: str) -> None:
    lines = [s for s in stderr.splitlines() if s.strip()]
    assert len(lines) == 1 and lines[0].startswith("gradnoise: error:") and needle in lines[0], stderr
    assert "Traceback" not in stderr


def test_bad_input_through_a_subprocess(tmp_path):
    r = gradnoise("study", "nosuchstudy", "--out", tmp_path / "o")
    assert r.returncode == 2
    _one_line(r.stderr, "unknown study")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    debug = gradnoise("--debug", "report", empty, "--out", tmp_path / "o")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


BAD_FILES = {
    "empty.jsonl": ("", "empty"),
    "corrupt.jsonl": ('{"type": "header", "format": "gradnoise-run", "version": 1}\nnot json\n{"a": 1}\n', "line 2"),
    "future.jsonl": ('{"type": "header", "format": "gradnoise-run", "version": 99}\n', "version"),
    "other.jsonl": ('{"type": "header", "format": "something-else", "version": 1}\n', "format"),
}


@pytest.mark.parametrize("argv, needle", [
    (["report", "{tmp}/empty.jsonl"], "empty"),
    (["report", "{tmp}/corrupt.jsonl"], "line 2"),
    (["report", "{tmp}/future.jsonl"], "version"),
    (["report", "{tmp}/other.jsonl"], "format"),
    (["report", "{tmp}/missing.jsonl"], "missing.jsonl"),
    (["study", "law", "--task", "nosuchpkg.mod:fn"], "cannot import"),
    (["study", "law", "--task", "digits-rnn"], "unknown task"),
    (["study", "recommend"], "run file"),
    (["study", "recommend", "--run", "{tmp}/future.jsonl"], "version"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, needle):
    """The same entry point in-process (each subprocess costs seconds of imports)."""
    from gradnoise.cli import main

    for name, (text, _) in BAD_FILES.items():
        (tmp_path / name).write_text(text)
    argv = [a.format(tmp=tmp_path) for a in argv] + ["--out", str(tmp_path / "out")]
    assert main(argv) == 2
    _one_line(capsys.readouterr().err, needle)


def test_user_task_from_the_example_file(tmp_path):
    r = gradnoise("study", "lr-batch", "--task", ROOT / "examples" / "my_task.py:task", "--size", "tiny",
                  "--out", tmp_path / "o", "--batch-sizes", "8,32", "--lrs", "0.1,1")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o" / "lr-batch-my_task.jsonl").exists()


def test_a_failing_study_does_not_lose_the_others(tmp_path, capsys, monkeypatch):
    """A model the per-sample engine refuses (BatchNorm in training mode): every study
    that needs per-sample norms fails with a line naming it; the exit code says so."""
    from gradnoise.cli import main

    (tmp_path / "bn_task.py").write_text(
        "import torch\n"
        "def task():\n"
        "    x = torch.randn(64, 4); y = (x[:, 0] > 0).long()\n"
        "    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))\n"
        "    return m, (x, y), torch.nn.functional.cross_entropy\n")
    rc = main(["study", "law", "trajectory", "--task", f"{tmp_path / 'bn_task.py'}:task", "--size", "tiny",
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 2
    assert err[0].startswith("gradnoise: error: law on bn_task:") and "BatchNorm" in err[0]
    assert err[1].startswith("gradnoise: error: trajectory on bn_task:")
    out = tmp_path / "o"  # nothing half-written is left where the report reads: all in failed/
    assert not list(out.glob("*.jsonl")) and not list((out / ".partial").iterdir())
    assert {p.name.split(".")[0] for p in (out / "failed").iterdir()} == {"law-bn_task", "trajectory-bn_task"}
    assert list((out / "failed").glob("trajectory-bn_task.run.*.jsonl"))  # the run file went with its study


def test_debug_after_the_subcommand(tmp_path):
    from gradnoise.cli import _parser

    assert _parser().parse_args(["study", "--debug"]).debug is True
    assert _parser().parse_args(["--debug", "report", "x.jsonl"]).debug is True
    assert _parser().parse_args(["report", "x.jsonl"]).debug is False


@pytest.mark.parametrize("argv, needle", [
    (["study", "law", "--lr", "0"], "--lr"),
    (["study", "law", "--lr", "nan"], "--lr"),
    (["study", "law", "--lr", "-1"], "--lr"),
    (["study", "law", "--lr", "0.1,0.2"], "--lr"),
    (["study", "lr-batch", "--lrs", "0.1,inf"], "--lrs"),
    (["study", "critical-batch", "--batch-sizes", "8,0"], "--batch-sizes"),
    (["study", "critical-batch", "--target-loss", "inf"], "--target-loss"),
    (["measure", "--batch-size", "1"], "--batch-size"),
])
def test_bad_options_fail_before_any_work(tmp_path, capsys, argv, needle):
    """Options are checked when parsed: argparse's usage and one error line naming the
    option, exit 2, and no output folder is made."""
    from gradnoise.cli import main

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        main(argv + (["--out", str(out)] if argv[0] == "study" else []))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage:") and "error: argument" in err[-1] and needle in err[-1], err
    assert sum("error" in line for line in err) == 1
    assert not out.exists()


def test_warnings_have_one_prefix(capsys):
    import warnings as w

    from gradnoise.cli import _show_warning

    _show_warning(w.WarningMessage("gradnoise: this batch has NaN", RuntimeWarning, "f", 1).message,
                  RuntimeWarning, "f", 1)
    assert capsys.readouterr().err == "gradnoise: warning: this batch has NaN\n"


def test_measure_a_users_task_with_layer_types_and_a_footer(capsys):
    from gradnoise.cli import main

    assert main(["measure", "--task", f"{ROOT / 'examples' / 'my_task.py'}:task", "--batch-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "one batch of 32 of 569 samples" in out and "0 (Linear)" in out and "2 (Linear)" in out
    assert "layer (type): the module that owns the parameters" in out and "noise share:" in out
    assert main(["measure", "--model", "mlp", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["layers"]
    assert [r["layer"] for r in rows] == ["fc1 (Linear)", "fc2 (Linear)", "head (Linear)"]
    assert main(["measure", "--task", f"{ROOT / 'examples' / 'my_task.py'}:task", "--batch-size", "5000"]) == 2
    assert "larger than the task's 569 samples" in capsys.readouterr().err


def test_version(capsys):
    from gradnoise import __version__
    from gradnoise.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"gradnoise {__version__}"


def test_options_reach_every_study_with_a_field_of_that_name():
    from gradnoise.studies import registry
    from gradnoise.studies.runner import Overrides

    o = Overrides(lr=0.3, target_loss=0.5, batch_sizes=[8, 64])
    cfg = {s.name: o.config(s, "default") for s in registry.STUDIES}
    assert cfg["critical-batch"].target_loss == cfg["adaptive"].target_loss == 0.5
    assert cfg["law"].lr == cfg["trajectory"].lr == 0.3
    assert cfg["escape"].solution_lr == 0.4 and cfg["optimizers"].sgd_lr == 0.1  # other fields: untouched
    assert cfg["lr-batch"].batch_sizes == cfg["critical-batch"].batch_sizes == [8, 64]
    assert cfg["recommend"] is None


# ------------------------------------------------------------------------- issue 19
SMALL_TASK = (
    "import torch\n"
    "def task():\n"
    "    x = torch.randn(64, 4); y = (x[:, 0] > 0).long()\n"
    "    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))\n"
    "    return m, (x, y), torch.nn.functional.cross_entropy\n"
)


def test_the_readme_task_skips_the_studies_it_cannot_carry_and_exits_0(tmp_path, capsys):
    """examples/my_task.py (two classes, 569 samples) exited 2: online's five phases and
    federated's Dirichlet(0.1) split over ten clients cannot run on it. They are skipped
    with a note, before they run."""
    from gradnoise.cli import main

    rc = main(["study", "online", "federated", "--task", f"{ROOT / 'examples' / 'my_task.py'}:task",
               "--out", str(tmp_path / "o")])
    printed, err = capsys.readouterr()
    assert rc == 0 and err == ""
    notes = [s for s in printed.splitlines() if "skipped:" in s]
    assert len(notes) == 2 and "federated on my_task" in notes[0] and "online on my_task" in notes[1]
    assert not (tmp_path / "o" / "failed").exists()  # nothing ran


def test_ctrl_c_rebuilds_the_page_from_the_studies_that_finished(tmp_path, capsys, monkeypatch):
    """Ctrl-C used to leave the page of the run before (or none): now the page is rebuilt
    from the files present, the interrupted study listed as missing; exit 130."""
    import dataclasses

    from gradnoise.cli import main
    from gradnoise.studies import registry

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    escape = dataclasses.replace(registry.BY_NAME["escape"], run=interrupted)
    monkeypatch.setattr(registry, "STUDIES", tuple(escape if s.name == "escape" else s for s in registry.STUDIES))
    monkeypatch.setitem(registry.BY_NAME, "escape", escape)
    (tmp_path / "small.py").write_text(SMALL_TASK)
    out = tmp_path / "o"
    rc = main(["study", "law", "escape", "--task", f"{tmp_path / 'small.py'}:task", "--size", "tiny",
               "--out", str(out)])
    printed, err = capsys.readouterr()
    assert rc == 130
    assert "escape on small: interrupted" in err and "rebuilt from the studies that finished" in err
    page = (out / "index.html").read_text()
    assert "law-small.jsonl" in page and "escape on small: interrupted" in page
    assert f"report: {out / 'index.html'}" in printed


def test_help_and_errors_show_the_file_form_of_task(tmp_path, capsys):
    from gradnoise.cli import _parser, main

    assert "path/to/file.py:function" in _parser()._subparsers._group_actions[0].choices["study"].format_help()
    assert main(["study", "law", "--task", "nosuch", "--out", str(tmp_path / "o")]) == 2
    assert "path/to/file.py:function" in capsys.readouterr().err
    assert main(["study", "law", "--task", "examples/my_task.py", "--out", str(tmp_path / "o")]) == 2
    assert "examples/my_task.py:task" in capsys.readouterr().err


from test_user_findings import BN_TASK as BN_OR_NOT  # noqa: E402  (a task with BatchNorm or not)


def test_skipped_studies_are_notes_on_the_page_not_failures(tmp_path, capsys):
    from gradnoise.cli import main

    rc = main(["study", "law", "online", "--task", f"{ROOT / 'examples' / 'my_task.py'}:task", "--size", "tiny",
               "--out", str(tmp_path / "o")])
    assert rc == 0
    page = (tmp_path / "o" / "index.html").read_text()
    assert "Not run" in page and "online on my_task" in page and "incomplete" not in page


def test_an_incomplete_run_names_an_earlier_run_only_where_its_file_is_there(tmp_path, capsys, monkeypatch):
    """The page said "a section of theirs shown below is from an earlier run" in a folder
    that had none."""
    from gradnoise.cli import main

    (tmp_path / "t.py").write_text(BN_OR_NOT)
    spec, out = f"{tmp_path / 't.py'}:task", tmp_path / "o"
    assert main(["study", "trajectory", "--task", spec, "--size", "tiny", "--out", str(out)]) == 0
    monkeypatch.setenv("GRADNOISE_TEST_BN", "1")
    assert main(["study", "law", "trajectory", "--task", spec, "--size", "tiny", "--out", str(out)]) == 2
    page = (out / "index.html").read_text()
    assert "This run is incomplete" in page
    assert "shown below for trajectory on t is from an earlier run" in page and "for law on t" not in page


# ------------------------------------------------------------------ gradnoise schedule
def _schedule_run(path, values, family="adam", tps=128):
    """A gradnoise-run file whose smoothed (preconditioned, for Adam) B_simple is ``values``."""
    from gradnoise.formats import json_safe, run_header

    lines = [run_header("per_sample", 1, 0.95, ["w"], optimizer={"class": "AdamW", "family": family, "lr": 1e-3})]
    for t, v in enumerate(values):
        noise = {"smoothed": {"b_simple": v}, "b_simple_interval": [None if v is None else 0.5 * v, "inf"]}
        lines.append({"type": "step", "step": t, "batch_size": 32, "tokens_per_sample": tps, "lr": 1e-3,
                      "loss": 1.0, **noise, "preconditioned": noise if family == "adam" else None})
    path.write_text("".join(json.dumps(json_safe(x)) + "\n" for x in lines))
    return path


def test_schedule_cli_four_formats(tmp_path):
    import csv
    import re

    run = _schedule_run(tmp_path / "run.jsonl", [20.0 * 1.05 ** t for t in range(120)])
    table = gradnoise("schedule", run, timeout=120)
    assert table.returncode == 0, table.stderr
    assert "preconditioned B_simple" in table.stdout and "sqrt rule for the adam" in table.stdout
    assert "from tokens" in table.stdout and "uncalibrated" in table.stdout
    rows = list(csv.DictReader(gradnoise("schedule", run, "--format", "csv", timeout=120).stdout.splitlines()))
    sizes = [int(r["batch_size"]) for r in rows]
    assert sizes[0] == 32 and len(sizes) > 3 and all(b == 2 * a for a, b in zip(sizes, sizes[1:]))
    assert all(int(r["tokens"]) == 128 * int(r["samples"]) for r in rows)
    obj = json.loads(gradnoise("schedule", run, "--format", "json", "--max", "512", timeout=120).stdout)
    assert obj["format"] == "gradnoise-schedule" and obj["units"]["samples"] and obj["lr_rule"] == "adam_sqrt"
    assert obj["segments"][-1]["batch_size"] == 512 and obj["segments"][-1]["tokens_per_batch"] == 512 * 128
    assert [s["batch_size"] for s in obj["segments"]] == [b for b in sizes if b <= 512]
    meg = gradnoise("schedule", run, "--format", "megatron", "--max", "512", timeout=120)
    m = re.match(r"--rampup-batch-size (\d+) (\d+) (\d+) --global-batch-size (\d+)\n", meg.stdout)
    assert m and int(m.group(1)) == 32 and int(m.group(4)) == 512 and (512 - 32) % int(m.group(2)) == 0


def test_schedule_cli_calibration_and_one_line_errors(tmp_path):
    run = _schedule_run(tmp_path / "run.jsonl", [20.0 * 1.05 ** t for t in range(80)], family="sgd", tps=None)
    from probe_synth import probe_object
    probe = probe_object()
    probe["mccandlish"]["b_noise"] = 160.0
    probe["proxy"].update(b_simple=40.0, ratio=4.0, preconditioned_ratio=None, preconditioned_ratio_interval=[None, None])
    (tmp_path / "probe.json").write_text(json.dumps(probe))
    plain = json.loads(gradnoise("schedule", run, "--format", "json", timeout=120).stdout)
    cal = gradnoise("schedule", run, "--format", "json", "--calibration", tmp_path / "probe.json", timeout=120)
    cal = json.loads(cal.stdout)
    assert cal["calibration"]["ratio"] == 4.0 and cal["lr_rule"] == "adascale"
    assert cal["segments"][-1]["batch_size"] == 4 * plain["segments"][-1]["batch_size"]
    assert cal["segments"][1]["samples"] < plain["segments"][1]["samples"]
    # an Adam run needs the preconditioned ratio: null there is no calibration, said once
    adam = _schedule_run(tmp_path / "adam.jsonl", [20.0 * 1.05 ** t for t in range(80)])
    none = gradnoise("schedule", adam, "--calibration", tmp_path / "probe.json", timeout=120)
    assert none.returncode == 0 and "warning: no calibration: the probe file's proxy.preconditioned_ratio is null" \
        in none.stderr and "no calibration" in none.stdout
    empty = _schedule_run(tmp_path / "empty.jsonl", [None] * 5)
    for args in ([empty], [run, "--factor", "1"], [run, "--factor", "2.5"], [run, "--min", "64", "--max", "32"],
                 [run, "--calibration", run], [run, "--calibration", tmp_path / "missing.json"]):
        r = gradnoise("schedule", *args, timeout=120)
        assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, (args, r.stderr)
        assert r.stderr.startswith("gradnoise: error: ")
