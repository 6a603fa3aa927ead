"""The verdict at the top of the page (issue 9, finding 1): one answer per task that
agrees with every number below it, says why two critical batch sizes differ, and says
so when the data cannot answer."""
import json
from pathlib import Path
import re

import pytest

from gradnoise.formats import run_header
from gradnoise.report import build_report, verdict_lines
from gradnoise.report.verdict import rule_fits, supported_rule
from gradnoise.studies.output import StudyWriter
from test_report_build import check_page

INF = float("inf")


def _run_file(path, values, optimizer=None, extra=None):
    """A v2 run file whose steps have the smoothed B_simple and intervals ``values``:
    ``[(step, b_simple, (low, high)), ...]``, batch 32; ``optimizer`` the header's entry,
    ``extra(i)`` more fields of step ``i`` (loss, lr, preconditioned, flags)."""
    lines = [run_header("per_sample", 2, 0.95, ["fc.weight"], {"fc": {"type": "Linear", "params": ["fc.weight"]}},
                        optimizer)]
    for i, (step, b, iv) in enumerate(values):
        sm = {"trace_cov": b, "grad_sq_norm": 1.0, "b_simple": b, "trace_cov_interval": [0.5 * b, 2 * b],
              "grad_sq_norm_interval": [0.5, 2.0]}
        lines.append({"type": "step", "step": step, "source": "per_sample", "skipped": False, "flag": None,
                      "loss_scale": None, "batch_size": 32, "n_groups": 32,
                      "raw": {"trace_cov": b, "grad_sq_norm": 1.0, "b_simple": b, "flag": None}, "smoothed": sm,
                      "b_simple_interval": [iv[0], "inf" if iv[1] == INF else iv[1]],
                      "by_param": {"fc.weight": {"raw": dict(sm), "smoothed": dict(sm)}},
                      "by_layer": {"fc": {"smoothed": dict(sm), "b_simple_interval": [iv[0], "inf" if iv[1] == INF
                                                                                      else iv[1]]}}})
        lines[-1].update(extra(i) if extra else {})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def _trajectory(out, values, final_loss=0.119):
    name = "trajectory-digits-mlp.run.jsonl"
    with StudyWriter(out, "trajectory", "digits-mlp", 0, "default", {"run_file": name, "batch_size": 32}) as w:
        for i in range(0, 600, 25):
            w.write("step", step=i, loss=1.0, full_loss=2.3 * (1 - i / 650) if i < 575 else final_loss)
        w.write("step", step=599, loss=0.1, full_loss=final_loss)
        w.write("summary", final_loss=final_loss, b_simple_first=values[0][1], b_simple_last=values[-1][1],
                b_simple_interval=list(values[-1][2]))
    _run_file(out / name, values)
    return w.path


def _critical(out, b_crit=22.6, interval=(17.5, 28.8), reason=None, along=14.1):
    with StudyWriter(out, "critical-batch", "digits-mlp", 0, "default", {"target_loss": 0.2}) as w:
        w.write("summary", target_loss=0.2, s_min=40.0, e_min=40.0 * (b_crit or 1), b_crit=b_crit,
                b_crit_interval=list(interval), b_crit_bound=None, b_simple=along, b_simple_interval=[5.7, 37.0],
                points=14, runs=14, reason=reason)
    return w.path


BEST = [[8, 0.28], [16, 0.4], [32, 0.4], [64, 0.57], [128, 0.57], [256, 0.8], [512, 0.8]]


def _lr_batch(out):
    with StudyWriter(out, "lr-batch", "digits-mlp", 0, "default", {}) as w:
        for b, lr in BEST:
            w.write("stable", batch_size=b, lr_max=2 * lr, lr_best=lr, best_loss=0.3)
        w.write("summary", eps_max=0.7, b_noise=12.5, b_noise_interval=[4.8, 24.0], rms=0.1, stable_fit=None,
                b_simple=110.0, best=BEST, points=7, reason=None)
    return w.path


@pytest.fixture
def studies(tmp_path):
    out = tmp_path / "studies"
    growing = [(s, 10 + s / 5, (5 + s / 10, 30 + s * 3)) for s in range(0, 598, 2)] + [(598, 129.0, (66.0, 1750.0))]
    return out, [_trajectory(out, growing), _critical(out), _lr_batch(out)]


def test_two_critical_batch_sizes_are_reconciled(studies, tmp_path):
    """Finding 1: critical-batch's 22.6 and the trajectory's 129 were both labelled
    B_crit with no word on why they differ."""
    out, files = studies
    text = "\n".join(verdict_lines(files))
    assert "digits-mlp: Batch size ≈ 23 and learning rate ≈ 0.454 for the stage up to the loss 0.2." in text
    assert "B_crit ≈ 22.6 (95 % interval [17.5, 28.8])" in text
    assert "B_simple measured along those runs, 14.1, agrees with it" in text
    assert "B_simple ≈ 129 (95 % interval [66, 1750])" in text
    assert "larger than B_crit because it is measured later, at a lower loss (0.119 < target 0.2)" in text
    assert "grow the batch as B_simple grows" in text
    # the learning rate for that batch is lr-batch's law, beside the best rate measured nearby
    assert "ε(B) = 0.7/(1 + 12.5/B) gives ε ≈ 0.454; the best rate measured at B=32 was 0.4" in text
    # the next step quotes B_simple as the reasons do, not a rounded batch that looks like it
    assert "B_simple ≈ 129 by the end of this run" in text
    assert len([x for x in text.splitlines() if x.startswith("    - ")]) == 3
    page = build_report(files, tmp_path / "report")
    html = page.read_text()
    assert html.index('id="verdict"') < html.index("<h2>Input files</h2>") < html.index('id="law"' if 'id="law"'
                                                                                         in html else "<main>")
    # every number in the verdict links to a part of the page that exists
    links = set(re.findall(r'<a href="#([^"]+)">', html[html.index('id="verdict"'):html.index("</section>")]))
    assert {"critical-batch-digits-mlp", "trajectory-digits-mlp", "lr-batch-digits-mlp"} <= links
    assert all(f'id="{a}"' in html for a in links)
    check_page(page)


def test_the_rule_the_best_rates_support():
    linear = [(b, 0.01 * b) for b in (8, 16, 32, 64)]
    assert supported_rule(rule_fits(linear, None), 4) == "linear"
    sqrt = [(b, 0.05 * b ** 0.5) for b in (8, 16, 32, 64)]
    assert supported_rule(rule_fits(sqrt, None), 4) == "sqrt"
    flat = [(b, 0.7 / (1 + 12 / b)) for b in (4, 8, 16, 32, 64, 128, 256, 512)]
    fits = rule_fits(flat, 0.001)
    assert supported_rule(fits, 8) == "law" and fits["law"] < min(fits["linear"], fits["sqrt"])
    # a law that fits no better than a one-parameter rule does not win on its extra parameter
    assert supported_rule(rule_fits(linear, rule_fits(linear, None)["linear"]), 4) == "linear"


def test_no_answer_when_the_data_cannot_support_one(tmp_path):
    out = tmp_path / "studies"
    crit = _critical(out, b_crit=None, interval=(float("nan"), float("nan")), along=None,
                     reason="B=8, 16 reached the target at the first evaluation, so S is only the evaluation "
                            "spacing there (left out of the fit: set a lower --target-loss); no B_crit: 0 usable runs")
    text = "\n".join(verdict_lines([crit]))
    assert "No batch-size answer: these data cannot support one." in text
    assert "--target-loss" in text and "gradnoise study trajectory" in text
    assert "≈" not in text.split("Run instead")[0].split("No batch-size answer")[1]  # no number presented as answer


def test_a_run_file_alone_gives_a_stage_answer_or_says_it_is_not_determined(tmp_path):
    known = tmp_path / "known.jsonl"
    _run_file(known, [(0, 50.0, (float("nan"), float("nan"))), (10, 80.0, (60.0, 110.0))])
    text = "\n".join(verdict_lines([known]))
    assert "known.jsonl: Batch size ≈ 80 at the stage this run reached." in text
    assert "AdaScale's gain" in text
    bound = tmp_path / "bound.jsonl"
    _run_file(bound, [(0, 50.0, (float("nan"), float("nan"))), (10, 84.2, (66.0, INF))])
    text = "\n".join(verdict_lines([bound]))
    assert "Batch size of at least ≈ 66" in text and "not determined" in text
    unknown = tmp_path / "unknown.jsonl"
    _run_file(unknown, [(0, 50.0, (float("nan"), float("nan"))), (10, 84.2, (0.0, INF))])
    text = "\n".join(verdict_lines([unknown]))
    assert "No batch-size answer" in text and "not determined from these steps" in text
    assert "84.2 [" not in text  # never a number with a confident interval


def test_failures_make_the_page_say_it_is_incomplete(studies, tmp_path):
    out, files = studies
    page = build_report(files, tmp_path / "report", failures=["lr-batch on digits-mlp: boom"])
    visible = " ".join(check_page(page).visible)
    assert "This run is incomplete" in visible and "lr-batch on digits-mlp: boom" in visible
    assert verdict_lines(files, ["lr-batch on digits-mlp: boom"])[-1] == \
        "  not in this verdict: lr-batch on digits-mlp: boom"


def test_the_next_step_follows_what_the_noise_scale_did(tmp_path):
    """Rose from its low: grow the batch; fell and never rose: a batch chosen early is too
    large later; flat: past it a larger batch mostly costs examples; B_crit without a run:
    measure it later in training too."""
    def next_line(values):
        path = tmp_path / f"r{len(list(tmp_path.iterdir()))}.jsonl"
        _run_file(path, values)
        return verdict_lines([path])[-1]

    nan = float("nan")
    rose = [(0, 50.0, (nan, nan)), (10, 20.0, (10.0, 40.0)), (20, 60.0, (40.0, 90.0))]
    fell = [(0, 50.0, (nan, nan)), (10, 200.0, (100.0, 400.0)), (20, 60.0, (40.0, 90.0))]
    flat = [(0, 50.0, (nan, nan)), (10, 60.0, (40.0, 90.0)), (20, 62.0, (41.0, 92.0))]
    assert "grew along this run, so grow the batch with it" in next_line(rose)
    assert "fell along this run, so a batch chosen from early steps is too large later" in next_line(fell)
    assert "past it a larger batch mostly costs examples" in next_line(flat)
    crit = _critical(tmp_path / "c")
    assert "measure it later in training too" in verdict_lines([crit])[-1]


ADAMW = {"class": "AdamW", "family": "adam", "groups": 1, "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8,
         "weight_decay": 0.01}
SGD = {"class": "SGD", "family": "sgd", "groups": 1, "lr": 0.1, "momentum": 0.9}
NAN = float("nan")


def _one(path):
    """The decision object of one run file."""
    from gradnoise.report.files import load
    from gradnoise.report.verdict import verdicts
    (v,) = verdicts([load(path)], [path.stem])
    return v


def test_an_adam_run_gets_the_noise_of_its_update_and_the_square_root_rule(tmp_path):
    """Finding 2: an AdamW run was given SGD's AdaScale gain and a growth 'as the loss
    falls' the file could not show. Its batch now follows the preconditioned noise scale,
    its rate the square root of AdaScale's gain from the run's own rate."""
    path = tmp_path / "adam.jsonl"
    values = [(0, 50.0, (NAN, NAN)), (10, 20.0, (10.0, 40.0)), (20, 60.0, (40.0, 90.0))]
    pre = [None, {"smoothed": {"trace_cov": 1.0, "grad_sq_norm": 1.0, "b_simple": 12.0},
                  "b_simple_interval": [6.0, 30.0]},
           {"smoothed": {"trace_cov": 1.0, "grad_sq_norm": 1.0, "b_simple": 16.0}, "b_simple_interval": [9.0, 28.0]}]
    _run_file(path, values, ADAMW, lambda i: {"lr": 1e-3 / (i + 1), "preconditioned": pre[i]})
    v = _one(path)
    gain = (1 + 16 / 32) / (1 + 16 / 16)
    assert (v.answered, v.batch, v.basis, v.lr_rule, v.optimizer) == (True, 16, "preconditioned B_simple",
                                                                      "adam-sqrt", "AdamW")
    assert v.lr_factor == pytest.approx(gain ** 0.5) and v.lr == pytest.approx(1e-3 / 3 * gain ** 0.5)
    text = "\n".join(verdict_lines([path]))
    assert "(AdamW: the square root of AdaScale's gain)" in text and "B_simple ≈ 60" in text
    assert "as the loss fell" not in text and "lr-batch" not in text and "gradnoise study" not in text
    assert len(v.because) <= 3 and len(text.splitlines()) <= 8


def test_an_sgd_run_keeps_adascale_and_says_growth_with_the_loss_only_where_logged(tmp_path):
    path = tmp_path / "sgd.jsonl"
    values = [(0, 50.0, (NAN, NAN)), (10, 20.0, (10.0, 40.0)), (20, 60.0, (40.0, 90.0))]
    _run_file(path, values, SGD, lambda i: {"lr": 0.1, "loss": [2.0, 1.5, 0.9][i]})
    v = _one(path)
    gain = (1 + 60 / 32) / (1 + 60 / 60)
    assert (v.batch, v.basis, v.lr_rule) == (60, "B_simple", "adascale")
    assert v.lr == pytest.approx(0.1 * gain) and v.lr_factor == pytest.approx(gain)
    text = "\n".join(verdict_lines([path]))
    assert "it grew as the loss fell (1.5 → 0.9)" in text and "(SGD: AdaScale's gain)" in text
    # an Adam run whose file has no preconditioned values says so and falls back to the raw one
    _run_file(path, values, ADAMW)
    v = _one(path)
    assert v.basis == "B_simple" and v.lr_rule == "adam-sqrt" and "preconditioned noise is not in the file" in \
        v.because[0].text


def test_runs_that_cannot_answer_say_why(tmp_path):
    """A header-only file, a run whose every step is single_group, and one with some
    flagged steps: the reason and the flag counts, and a next step on the user's run."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps(run_header("microbatch", 1, 0.95, ["w"], {}, SGD)) + "\n")
    v = _one(empty)
    assert not v.answered and v.why_not == "the run file has no measured step"

    single = tmp_path / "single.jsonl"
    _run_file(single, [(i, 1.0, (NAN, NAN)) for i in range(5)], SGD,
              lambda i: {"skipped": True, "flag": "single_group",
                         "smoothed": {"trace_cov": None, "grad_sq_norm": None, "b_simple": None}})
    v = _one(single)
    assert not v.answered and "every measured step was flagged (single_group ×5" in v.why_not
    assert "micro-batches" in v.next_step.text
    text = "\n".join(verdict_lines([single]))
    assert "No batch-size answer: every measured step was flagged" in text

    some = tmp_path / "some.jsonl"
    _run_file(some, [(0, 50.0, (NAN, NAN)), (10, 20.0, (10.0, 40.0)), (20, 60.0, (40.0, 90.0))], SGD,
              lambda i: {"skipped": True, "flag": "non_finite"} if i == 0 else {})
    v = _one(some)
    assert v.answered and "1 of 3 measured steps have no defined value: non_finite ×1" in v.because[1].text


def test_batch_below_two_is_said_as_it_is(tmp_path):
    """Finding 5: "Batch size ≈ 2" for B_simple 0.934."""
    path = tmp_path / "low.jsonl"
    _run_file(path, [(0, 0.9, (NAN, NAN)), (10, 0.934, (0.5, 1.6))], SGD)
    assert _one(path).batch == 1


def _probe_file(tmp_path, **overrides):
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from probe_synth import probe_object
    from gradnoise.formats import write_probe
    return Path(write_probe(tmp_path / "probe-digits-mlp.json", probe_object(**overrides)))


def test_a_probe_file_answers_with_the_measured_critical_batch(tmp_path):
    """Issue 20: the branch-measured B_crit is the answer, the rate follows the rule the
    branches used, and the calibration factor is said."""
    path = _probe_file(tmp_path)
    v = _one(path)
    assert (v.answered, v.batch, v.basis, v.lr_rule, v.optimizer) == (True, 120, "branch B_crit", "sqrt", "AdamW")
    assert v.lr == pytest.approx(1e-3 * (120 / 32) ** 0.5)
    text = "\n".join(verdict_lines([path]))
    assert "B_crit ≈ 120 [80, 200]" in text and "×1.3 [0.6, 3.3]" in text  # Adam: the preconditioned factor


def test_a_run_beside_a_probe_is_calibrated_by_it(tmp_path):
    run = tmp_path / "sgd.jsonl"
    _run_file(run, [(0, 50.0, (NAN, NAN)), (10, 20.0, (10.0, 40.0)), (20, 60.0, (40.0, 90.0))], SGD,
              lambda i: {"lr": 0.1})
    probe = _probe_file(tmp_path)
    from gradnoise.report.files import load
    from gradnoise.report.verdict import verdicts
    found = {v.name: v for v in verdicts([load(run), load(probe)], ["sgd", "probe"])}
    v = found["sgd.jsonl"]
    assert v.basis == "calibrated B_simple" and v.batch == 180  # 60 × the raw ratio 3
    assert "Calibrated by the branch probe on this page: ×3" in v.because[0].text
