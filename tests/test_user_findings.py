"""What a new user met (issue 9, "What a new user met"), one test per finding; each
failed on the code before that issue. Finding 1 (two critical batch sizes, reconciled by
the verdict) is tests/report/test_verdict.py::test_two_critical_batch_sizes_are_reconciled;
finding 3's fit logic is tested in tests/studies/test_training_studies.py."""
import csv
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradnoise
from gradnoise.cli import main

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "report"))
from report_synth import records, write_run  # noqa: E402

NEG = re.compile(r"[\[(]\s*[−-]|, [−-]|−∞")


def _study(capsys, *argv):
    rc = main(["study", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


# ------------------------------------------------------------------ 2: no negative bounds
def test_2_no_interval_has_a_negative_bound_anywhere(tmp_path, capsys):
    """`84.2 [−∞, ∞] at step 1`, `B_crit ≈ 2.88e+03 [−∞, ∞]` on the command line, and a
    per-layer band below zero: intervals of quantities ≥ 0 now stay in their domain."""
    run = write_run(tmp_path / "run.jsonl", records(8, unbounded=True))
    old = write_run(tmp_path / "v1.jsonl", records(8, unbounded=True), version=1)
    assert main(["report", str(run), str(old), "--out", str(tmp_path / "rep")]) == 0
    printed = capsys.readouterr().out
    assert not NEG.search(printed) and "not determined from these steps" in printed
    page = (tmp_path / "rep" / "index.html").read_text()
    assert not NEG.search(page.split("<main>")[1])
    from gradnoise.report.layers import layer_series
    header, steps = gradnoise.read_run(old)
    for layer in layer_series(header, steps, 1.0):
        assert not np.any(layer.band[0] < 0)  # a v1 file's −inf lower end is shown as 0


def test_2_the_monitor_writes_no_negative_bound(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    with gradnoise.NoiseMonitor(model, sinks=[tmp_path / "r.jsonl"]) as mon:
        for _ in range(6):
            x = torch.randn(4, 3)
            nn.functional.mse_loss(model(x), torch.randn(4, 2)).backward()
            mon.step()
            model.zero_grad()
    text = (tmp_path / "r.jsonl").read_text()
    assert '"-inf"' not in text
    _, steps = gradnoise.read_run(tmp_path / "r.jsonl")
    for s in steps[1:]:
        for iv in [s["b_simple_interval"], s["smoothed"]["trace_cov_interval"],
                   *(v["b_simple_interval"] for v in s["by_layer"].values())]:
            assert iv[0] is None or iv[0] >= 0


# ------------------------------------------------------------------ 3: degenerate fit
def test_3_a_degenerate_critical_batch_fit_shows_no_number(tmp_path, capsys):
    """`gradnoise study critical-batch --task examples/my_task.py:task` printed
    `B_crit 64 [43.3, 95.9]` while its own note said every run met the target at the first
    evaluation with the top rate of the grid."""
    rc, out, _ = _study(capsys, "critical-batch", "--task", ROOT / "examples" / "my_task.py:task",
                        "--out", tmp_path / "o", "--quiet")
    assert rc == 0
    rc, out, _ = _study(capsys, "critical-batch", "--task", ROOT / "examples" / "my_task.py:task",
                        "--out", tmp_path / "o")
    line = next(ln for ln in out.splitlines() if "critical-batch" in ln and "B_crit" in ln)
    assert "B_crit — from 0 usable runs" in line and "first evaluation" in line
    assert "No batch-size answer" in out and "--target-loss" in out
    page = (tmp_path / "o" / "index.html").read_text()
    assert "— (no fit: see the notes)" in page


# ------------------------------------------------------------------ 4: wrong reduction
SUM_TASK = (
    "import torch\n"
    "def task():\n"
    "    torch.manual_seed(0)\n"
    "    x = torch.randn(200, 5); y = (x[:, 0] + 0.3 * x[:, 1] > 0).long()\n"
    "    m = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))\n"
    "    loss = lambda out, t: torch.nn.functional.cross_entropy(out, t, reduction='sum')\n"
    "    return (m, (x, y), loss{declare})\n"
)


def test_4_a_sum_reduced_loss_is_refused_with_advice_that_fits_the_cli(tmp_path, capsys):
    """`gradnoise study law` on a sum-reduced loss ran to exit 0 and reported a deviation
    of 2306 standard errors; trajectory's advice (reduction='sum' to gradnoise.capture)
    did not fit the CLI."""
    (tmp_path / "sum_task.py").write_text(SUM_TASK.format(declare=""))
    for study in ("law", "trajectory", "critical-batch", "lr-batch"):
        rc, _, err = _study(capsys, study, "--task", f"{tmp_path / 'sum_task.py'}:task", "--size", "tiny",
                            "--out", tmp_path / "o")
        assert rc == 2 and "is a sum over the batch" in err and "(model, dataset, loss_fn, 'sum')" in err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    rc = main(["measure", "--task", f"{tmp_path / 'sum_task.py'}:task"])
    assert rc == 2 and "is a sum over the batch" in capsys.readouterr().err
    # declared, it is measured right: the law holds
    (tmp_path / "declared.py").write_text(SUM_TASK.format(declare=", 'sum'"))
    rc, out, err = _study(capsys, "law", "--task", f"{tmp_path / 'declared.py'}:task", "--size", "tiny",
                          "--out", tmp_path / "d")
    assert rc == 0, err
    z = float(re.search(r"largest deviation ([\d.]+) standard errors", out).group(1))
    assert z < 4.0


# ------------------------------------------------------------------ 5: a failing study
BN_TASK = (
    "import os, torch\n"
    "def task():\n"
    "    x = torch.randn(64, 4); y = (x[:, 0] > 0).long()\n"
    "    mid = torch.nn.BatchNorm1d(8) if os.environ.get('GRADNOISE_TEST_BN') else torch.nn.Tanh()\n"
    "    return torch.nn.Sequential(torch.nn.Linear(4, 8), mid, torch.nn.Linear(8, 2)), (x, y), "
    "torch.nn.functional.cross_entropy\n"
)


def test_5_a_failing_study_keeps_the_last_good_run_and_the_page_says_so(tmp_path, capsys, monkeypatch):
    """`--lr -1` failed the study but printed `report: …/index.html`, a page that looked
    complete, and the previous good run had been moved to previous/."""
    (tmp_path / "t.py").write_text(BN_TASK)
    spec, out = f"{tmp_path / 't.py'}:task", tmp_path / "o"
    rc, _, _ = _study(capsys, "law", "--task", spec, "--size", "tiny", "--out", out)
    assert rc == 0
    good = (out / "law-t.jsonl").read_bytes()
    monkeypatch.setenv("GRADNOISE_TEST_BN", "1")
    rc, printed, err = _study(capsys, "law", "--task", spec, "--size", "tiny", "--out", out)
    assert rc == 2 and "gradnoise: error: law on t:" in err
    assert (out / "law-t.jsonl").read_bytes() == good            # the good run stays where it was
    assert not (out / "previous").exists()                        # and nothing was moved away
    assert list((out / "failed").glob("law-t.*.jsonl"))            # the partial file is kept for a look
    assert "incomplete" in printed
    page = (out / "index.html").read_text()
    assert "This run is incomplete" in page and "law on t:" in page


def test_5_options_are_checked_before_any_work(tmp_path, capsys):
    for argv in (["--lr", "0"], ["--lr", "nan"], ["--lr", "-1"], ["--batch-sizes", "1,8"], ["--threads", "0"]):
        with pytest.raises(SystemExit) as stop:
            main(["study", "law", *argv, "--out", str(tmp_path / "o")])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert err.count("gradnoise: warning") == 0 and "error: argument" in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ 6: names, plots, summaries, CSV
def test_6_frontier_labels_each_batch_size_once():
    from gradnoise.report.figures import new_figure
    from gradnoise.report.study_figures import _frontier_panel

    best = [{"batch_size": b, "seed": s, "steps": 100 // b + 3 + s, "examples": (100 // b + 3 + s) * b}
            for b in (8, 64, 512) for s in (0, 1)]
    fig, (ax,) = new_figure(1, 1)
    _frontier_panel(ax, best, {})
    labels = [t.get_text() for t in ax.texts]
    assert sorted(labels) == ["B=512", "B=64", "B=8"]


def test_6_layers_have_path_and_type_the_same_under_ddp(tmp_path):
    import torch.distributed as dist

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(4, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            h = self.embed(x)
            return self.attn(h, h, h)[0]

    def run(wrap, path):
        torch.manual_seed(0)
        model = Net()
        watched = nn.parallel.DistributedDataParallel(model) if wrap else model
        with gradnoise.NoiseMonitor(watched, sinks=[path]) as mon:
            watched(torch.randn(6, 3, 4)).pow(2).mean().backward()
            mon.step()
        return gradnoise.read_run(path)

    plain_head, plain_steps = run(False, tmp_path / "plain.jsonl")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp_head, ddp_steps = run(True, tmp_path / "ddp.jsonl")
    finally:
        dist.destroy_process_group()
    assert plain_head["layers"]["attn"]["type"] == "MultiheadAttention"
    assert plain_head["layers"] == ddp_head["layers"] and plain_head["params"] == ddp_head["params"]
    assert set(plain_steps[0]["by_param"]) == set(ddp_steps[0]["by_param"])
    assert not any(p.startswith("module.") for p in ddp_steps[0]["by_param"])


def test_6_the_per_layer_panel_shows_the_noisiest_and_the_table_all(tmp_path):
    from gradnoise.report.series import PLOTTED, noise_series

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(7)])
    with gradnoise.NoiseMonitor(model, sinks=[tmp_path / "r.jsonl"]) as mon:
        for _ in range(3):
            model(torch.randn(8, 4)).pow(2).mean().backward()
            mon.step()
            model.zero_grad()
    s = noise_series(*gradnoise.read_run(tmp_path / "r.jsonl"))
    assert len(s.layers) == 7 and len(s.plotted) == PLOTTED < 7
    assert s.plotted == s.layers[:PLOTTED] and all(a.share >= b.share for a, b in zip(s.layers, s.layers[1:]))
    gradnoise.report.build_report([tmp_path / "r.jsonl"], tmp_path / "rep")
    page = (tmp_path / "rep" / "index.html").read_text()
    assert all(f"{i} (Linear)" in page for i in range(7))  # the table lists every layer


def test_6_a_one_step_run_file_draws_its_points(tmp_path):
    from gradnoise.report.figures import new_figure
    from gradnoise.report.noise_figures import _b_simple_panel
    from gradnoise.report.series import noise_series

    path = write_run(tmp_path / "one.jsonl", records(1))
    s = noise_series(*gradnoise.read_run(path))
    fig, (ax,) = new_figure(1, 1)
    _b_simple_panel(ax, s)
    line = [ln for ln in ax.get_lines() if ln.get_label() == "smoothed"][0]
    assert line.get_marker() == "o" and np.isfinite(line.get_ydata()).all()


def test_6_report_prints_a_summary_like_study(tmp_path, capsys):
    path = write_run(tmp_path / "run.jsonl", records(20))
    assert main(["report", str(path), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "verdict:" and out[1].startswith("  run.jsonl: ") and out[-1].startswith("report: ")


def test_6_csv_tells_an_infinite_bound_from_an_undefined_one(tmp_path):
    recs = records(3, unbounded=True)
    sink = gradnoise.CsvSink(tmp_path / "r.csv")
    sink.open()
    for r in recs:
        sink.write(r)
    sink.close()
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert rows[0]["b_simple_high"] == "inf"                       # unbounded: inf
    undefined = [r for r in rows if r["raw_b_simple"] == ""]
    assert all(r["raw_b_simple"] != "inf" for r in undefined)
    assert rows[0]["b_simple_low"] == "0.0" and float(rows[0]["b_simple_high"]) == math.inf


# ------------------------------------------------------------------ 7: threads and progress
def test_7_threads_are_set_and_one_overall_progress_line(tmp_path, capsys, monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
        rc, _, err = _study(capsys, "law", "trajectory", "--task", "digits-mlp", "--size", "tiny", "--out",
                            tmp_path / "o", "--threads", "1")
        assert rc == 0 and torch.get_num_threads() == 1
        assert "study 1/2: law on digits-mlp" in err and "study 2/2: trajectory on digits-mlp" in err
    finally:
        torch.set_num_threads(before)
    from gradnoise.studies.runner import set_threads
    assert set_threads(None) == 1 and set_threads(10 ** 6) == len(os.sched_getaffinity(0))
    torch.set_num_threads(before)
