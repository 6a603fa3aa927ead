"""The online study's report section and its one-sentence verdict, from hand-made study
files: well-formed page, readable figures, no undefined number shown, and a verdict that
never contradicts the summary it reads."""
import math
import re
import warnings

import pytest

from gradnoise.report import html as h
from gradnoise.report.files import load
from gradnoise.report.online_section import mean_band, online_section, online_verdict_text, ratio_series
from gradnoise.studies.output import StudyWriter
from test_report_build import check_page

NAMES = ("SGD B=1", "SGD B=8", "Adam B=1", "averaged SGD")


def _iv(mean, half, low=0.0):
    return {"mean": mean, "interval": [max(low, mean - half), mean + half], "n": 3}


def summary(**over):
    methods = {
        "SGD B=1": dict(acc_current=_iv(0.98, 0.02), acc_earlier=_iv(0.67, 0.2), acc_all=_iv(0.73, 0.17),
                        forgetting=_iv(0.33, 0.2), noise_to_signal=_iv(12.3, 3.0), b_simple=_iv(12.3, 3.0)),
        "SGD B=8": dict(acc_current=_iv(0.95, 0.1), acc_earlier=_iv(0.58, 0.2), acc_all=_iv(0.65, 0.2),
                        forgetting=_iv(0.41, 0.2), noise_to_signal=_iv(1.4, 1.5), b_simple=_iv(11.0, 5.0)),
        "Adam B=1": dict(acc_current=_iv(0.97, 0.1), acc_earlier=_iv(0.72, 0.1), acc_all=_iv(0.77, 0.06),
                         forgetting=_iv(0.27, 0.08), noise_to_signal=_iv(0.12, 0.09), b_simple=_iv(64.0, 60.0)),
        "averaged SGD": dict(acc_current=_iv(0.14, 0.4), acc_earlier=_iv(0.87, 0.1), acc_all=_iv(0.72, 0.05),
                             forgetting=_iv(0.015, 0.03), noise_to_signal=_iv(0.004, 0.003), b_simple=_iv(12.3, 3.0)),
    }
    for name, m in methods.items():
        m.update(lr=0.05, batch=8 if name == "SGD B=8" else 1, runs=3, seconds=_iv(1.0, 0.5),
                 mean_trace_cov=_iv(6.0, 1.0), mean_update_noise=_iv(0.01, 0.005),
                 mean_iterate_update_noise=_iv(0.01, 0.005))
    out = {"groups": [[0, 1], [2, 3], [4, 5]], "phases": 3, "phase_samples": 40, "stream_samples": 120,
           "focus": 0.9, "window": 8, "minibatch": 8, "test_size": 90, "seeds": 3, "methods": methods}
    out.update(over)
    return out


def checkpoint(method, seed, position, phase, acc_current, acc_earlier, trace_cov=5.0, grad_sq_norm=0.5,
               noise=0.01, signal=0.001):
    return dict(method=method, seed=seed, position=position, phase=phase, step=position,
                acc_groups=[acc_current, acc_earlier, None], acc_current=acc_current, acc_earlier=acc_earlier,
                acc_all=acc_current, forgetting=None if phase == 0 else 0.1, window=8, trace_cov=trace_cov,
                grad_sq_norm=grad_sq_norm, b_simple=None if grad_sq_norm is None or grad_sq_norm <= 0
                else trace_cov / grad_sq_norm, window_flag=None, update_noise=noise, update_signal=signal,
                update_noise_method="draws", iterate_update_noise=noise)


def study(out, lines, summ):
    with StudyWriter(out, "online", "toy", 0, "tiny", {"phases": 3, "phase_samples": 40}) as w:
        for ln in lines:
            w.write("checkpoint", **ln)
        if summ is not None:
            w.write("summary", **summ)
    return out / "online-toy.jsonl"


def page_of(tmp_path, paths):
    items = [(f"s{i}", load(p)) for i, p in enumerate(paths)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sec = online_section(items)
    index = tmp_path / "index.html"
    index.write_text(h.page("online", "", [sec]), encoding="utf-8")
    return sec, check_page(index)


def test_section_from_a_full_file(tmp_path):
    lines = []
    for seed in range(3):
        for k, pos in enumerate((20, 40, 60, 80, 100, 120)):
            phase = (pos - 1) // 40
            for i, name in enumerate(NAMES):
                lines.append(checkpoint(name, seed, pos, phase, 0.9 - 0.05 * i + 0.01 * seed,
                                        None if phase == 0 else 0.5 + 0.02 * seed,
                                        # one seed of one method has |G|² ≤ 0 at one checkpoint
                                        grad_sq_norm=-0.1 if (seed, k, i) == (0, 2, 1) else 0.5 + 0.1 * k))
    sec, page = page_of(tmp_path, [study(tmp_path / "a", lines, summary())])
    assert sec.anchor == "online" and len(sec.plots) == 3 and len(page.images) == 3
    assert len({p.name for p in sec.plots}) == 3
    visible = " ".join(page.visible)
    for word in ("forgetting", "current classes", "update noise-to-signal", "window B_simple",
                 "On this drifting stream", "Polyak–Ruppert", "0–1, then 2–3, then 4–5"):
        assert word in visible, word
    # the table shows the numbers with their intervals
    assert "0.77 [0.71, 0.83]" in visible and "0.015 [0, 0.045]" in visible


def test_section_of_a_file_without_checkpoints_or_summary(tmp_path):
    sec, page = page_of(tmp_path, [study(tmp_path / "a", [], None)])
    assert len(page.images) == 3
    assert "no checkpoints yet" in " ".join(page.visible)


def test_section_with_one_seed_and_undefined_values(tmp_path):
    one = {k: {"mean": None, "interval": [math.nan, math.nan], "n": 0} for k in
           ("acc_current", "acc_earlier", "acc_all", "forgetting", "noise_to_signal", "b_simple", "seconds")}
    summ = summary(methods={"SGD B=1": {**one, "lr": 0.05, "batch": 1},
                            "Adam B=1": {**summary()["methods"]["Adam B=1"],
                                         "acc_all": {"mean": 0.5, "interval": [math.nan, math.nan], "n": 1}}})
    lines = [checkpoint("SGD B=1", 0, 40, 0, None, None, trace_cov=None, grad_sq_norm=None, noise=None),
             checkpoint("Adam B=1", 0, 40, 0, 0.9, None, grad_sq_norm=-1.0, signal=-1.0)]
    sec, page = page_of(tmp_path, [study(tmp_path / "a", lines, summ)])
    assert "—" in " ".join(page.visible)
    assert online_verdict_text(summ).count("Adam B=1") >= 1 and "SGD B=1" not in online_verdict_text(summ)


def test_series_helpers():
    rows = [dict(position=10, acc=0.5, t=4.0, g=1.0), dict(position=10, acc=0.7, t=2.0, g=-1.0),
            dict(position=20, acc=None, t=1.0, g=None), dict(position=20, acc=1.0, t=3.0, g=1.0)]
    x, mean, lo, hi = mean_band(rows, "acc", 0.0, 1.0)
    assert list(x) == [10, 20] and mean[0] == pytest.approx(0.6) and mean[1] == 1.0
    assert 0.0 <= lo[0] < 0.6 < hi[0] <= 1.0 and math.isnan(lo[1])  # one seed: no band
    x, r = ratio_series(rows, "t", "g")
    assert math.isnan(r[0])                  # Σ|G|² = 0: undefined, not a huge number
    assert r[1] == pytest.approx(3.0)        # the seed without |G|² is left out of both sums


# ------------------------------------------------------------------------- verdict
def _named(text, role):
    m = re.search(role, text)
    return m.group(1) if m else None


def test_verdict_names_the_methods_the_numbers_single_out():
    s = summary()
    text = online_verdict_text(s)
    m = s["methods"]
    least = min(m, key=lambda k: m[k]["forgetting"]["mean"])
    quiet = min(m, key=lambda k: m[k]["noise_to_signal"]["mean"])
    best = max(m, key=lambda k: m[k]["acc_all"]["mean"])
    assert text.startswith("On this drifting stream, ") and text.endswith(".") and text.count(". ") == 0
    assert f"{least} forgot least" in text and f"use {best}," in text
    assert f"{quiet} had the least noisy updates" in text or f"{quiet} forgot least" in text
    assert "lagged the drift" in text        # averaged SGD: 0.14 on the current classes against 0.98
    assert "not separated from SGD B=1" in text  # 0.77 [0.71, 0.83] overlaps 0.73 [0.56, 0.90]
    assert not re.search(r"\b(nan|None|inf)\b", text)


def test_verdict_when_the_best_is_separated_and_nothing_lags():
    s = summary()
    s["methods"]["Adam B=1"]["acc_all"] = _iv(0.95, 0.01)
    s["methods"]["averaged SGD"]["acc_current"] = _iv(0.9, 0.05)
    text = online_verdict_text(s)
    assert "not separated" not in text and "lagged" not in text and "use Adam B=1" in text
    assert "averaged SGD forgot least (forgetting 0.015 [0, 0.045]) and had the least noisy updates" in text


def test_verdict_without_numbers_is_none():
    assert online_verdict_text({}) is None
    assert online_verdict_text({"methods": {}}) is None
    assert online_verdict_text({"methods": {"SGD B=1": {"acc_all": {"mean": None}}}}) is None
