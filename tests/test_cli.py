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


def _one_line_error(r, needle):
    assert r.returncode != 0
    lines = [s for s in r.stderr.splitlines() if s.strip()]
    assert len(lines) == 1 and lines[0].startswith("gradnoise: error:") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_bad_input_is_one_line(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text('{"type": "header", "format": "gradnoise-run", "version": 1}\nnot json\n{"a": 1}\n')
    future = tmp_path / "future.jsonl"
    future.write_text('{"type": "header", "format": "gradnoise-run", "version": 99}\n')
    _one_line_error(gradnoise("study", "nosuchstudy", "--out", tmp_path / "o"), "unknown study")
    _one_line_error(gradnoise("study", "law", "--task", "nosuchpkg.mod:fn", "--out", tmp_path / "o"),
                    "cannot import")
    _one_line_error(gradnoise("report", empty, "--out", tmp_path / "o"), "empty")
    _one_line_error(gradnoise("report", corrupt, "--out", tmp_path / "o"), "line 2")
    _one_line_error(gradnoise("report", future, "--out", tmp_path / "o"), "version")
    _one_line_error(gradnoise("report", tmp_path / "missing.jsonl", "--out", tmp_path / "o"), "missing.jsonl")
    _one_line_error(gradnoise("study", "recommend", "--out", tmp_path / "nothing"), "run file")
    debug = gradnoise("--debug", "report", empty, "--out", tmp_path / "o")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_user_task_from_the_example_file(tmp_path):
    r = gradnoise("study", "lr-batch", "--task", ROOT / "examples" / "my_task.py:task", "--size", "tiny",
                  "--out", tmp_path / "o", "--batch-sizes", "8,32", "--lrs", "0.1,1")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o" / "lr-batch-my_task.jsonl").exists()


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="headless Chromium is not installed")
def test_chromium_renders_the_report(tiny_study, tmp_path):
    _, out = tiny_study
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,3000", (out / "index.html").as_uri()], capture_output=True, timeout=120)
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
