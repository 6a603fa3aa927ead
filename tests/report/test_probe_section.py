"""The probe's section of the report: built from a probe file alone or beside study files,
its numbers at the page's precision, every missing number a dash with its reason, its
figure embedded; ``gradnoise report probe.json`` exits 0."""
import json
import warnings

import pytest

from gradnoise.cli import main
from gradnoise.formats import write_probe
from gradnoise.report import build_report
from gradnoise.report.probe_section import TITLE
from probe_synth import probe_object, undetermined_probe
from report_synth import law_study
from test_report_build import check_page


def _page(tmp_path, files):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning (missing glyph, log of zero, …) on good input
        index = build_report(files, tmp_path / "report")
    page = check_page(index)
    return page, " ".join(page.visible)


def _probe_file(tmp_path, obj, name="probe-digits-mlp.json"):
    return write_probe(tmp_path / name, obj)


def test_the_page_shows_the_calibration(tmp_path):
    page, visible = _page(tmp_path, [_probe_file(tmp_path, probe_object())])
    assert ("h2", TITLE) in page.headings
    assert any(tag == "h3" and "digits-mlp" in t and "checkpoint step 300" in t for tag, t in page.headings)
    assert len(page.images) == 1 and "branch probe on task digits-mlp" in page.images[0]["alt"]
    assert list((tmp_path / "report" / "figures").glob("*-probe.png"))
    for shown in ("120 [80, 200]",        # branch B_crit (McCandlish) with its interval
                  "128 [64, 256]",        # Merrill's b_crit
                  "40 [30, 55]",          # raw B_simple
                  "90 [60, 140]",         # preconditioned B_simple
                  "×3 [1.5, 6.7]",        # B_crit / raw B_simple, two significant digits as every factor
                  "×1.3 [0.6, 3.3]",      # B_crit / preconditioned B_simple
                  "at target loss 0.36", "within 0.05 of the best loss after 8192 samples",
                  "on 8 batches of 32", "AdamW (adam family)", "12, 1440"):
        assert shown in visible, shown
    assert "(branch probe)" in visible  # the inputs list says what the file is


def test_the_table_per_batch_size(tmp_path):
    page, visible = _page(tmp_path, [_probe_file(tmp_path, probe_object())])
    # B = 64: median steps 12·(1 + 120/64)·1.05 = 36.225 → 36.2, examples 64 × that = 2318.4 → 2320
    assert "64 0.00141 3 of 3 36.2 2320 0.316 [0.311, 0.324] 0 of 3" in visible
    # B = 512 never reached the target and one seed diverged
    assert "512 0.004 0 of 3 — (no seed reached the target loss) — 0.361 [0.356, 0.369] 1 of 3" in visible


def test_every_missing_number_is_a_dash_with_its_reason(tmp_path):
    page, visible = _page(tmp_path, [_probe_file(tmp_path, undetermined_probe())])
    for shown in ("— (every batch size took the same steps)",
                  "— (the bend lies beyond the sweep)",
                  "— (not defined on the batches measured)",
                  "— (only for Adam-family optimizers; the optimizer is SGD)",
                  "— (no branch B_crit: every batch size took the same steps)",
                  "— (not recorded), 0.41",
                  "Notes from the probe:"):
        assert shown in visible, shown
    assert len(page.images) == 1


def test_a_ratio_missing_for_want_of_the_proxy_says_so(tmp_path):
    obj = probe_object()
    obj["proxy"].update(b_simple=None, b_simple_interval=None, ratio=None, ratio_interval=None)
    _, visible = _page(tmp_path, [_probe_file(tmp_path, obj)])
    assert "— (no raw B_simple)" in visible and "×1.3 [0.6, 3.3]" in visible


def test_a_probe_without_reached_targets_or_curves_builds(tmp_path):
    obj = probe_object()
    for br in obj["branches"]:
        br.update(curve=[], steps_to_target=None, examples_to_target=None, loss_at_budget=None, diverged=True)
    obj["mccandlish"].update(points=[], b_noise=None, interval=None, s_min=None, e_min=None,
                             reason="no batch size reached the target loss")
    obj["merrill"].update(losses=[], b_crit=None, interval=None, best_loss=None, reason="every branch diverged")
    page, visible = _page(tmp_path, [_probe_file(tmp_path, obj)])
    assert len(page.images) == 1 and "— (every seed diverged)" in visible


def test_beside_study_files_and_a_second_checkpoint(tmp_path):
    later = probe_object(checkpoint={"step": 900, "loss": 0.3})
    files = [law_study(tmp_path / "studies"), _probe_file(tmp_path, probe_object()),
             _probe_file(tmp_path, later, "probe-later.json")]
    page, visible = _page(tmp_path, files)
    h2 = [t for tag, t in page.headings if tag == "h2"]
    assert h2.index("Law: gradient noise against batch size") < h2.index(TITLE) and h2.count(TITLE) == 1
    assert len(page.images) == 3
    text = (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
    assert 'id="probe-digits-mlp"' in text and text.count('id="probe-digits-mlp"') == 1  # ids stay unique
    assert "These files come from different runs" not in visible


def test_a_pretty_printed_probe_file_is_read(tmp_path):
    path = tmp_path / "probe.json"
    path.write_text(json.dumps(probe_object(), indent=2))
    _, visible = _page(tmp_path, [path])
    assert "120 [80, 200]" in visible


def test_a_broken_probe_file_is_one_line_naming_it(tmp_path):
    obj = probe_object()
    del obj["proxy"]["batches"]
    path = tmp_path / "probe.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(ValueError) as info:
        build_report([path], tmp_path / "report")
    assert str(path) in str(info.value) and "'proxy.batches' is missing" in str(info.value)
    assert "\n" not in str(info.value)


def test_the_report_command_on_a_probe_file(tmp_path, capsys):
    path = _probe_file(tmp_path, probe_object())
    assert main(["report", str(path), "--out", str(tmp_path / "rep"), "--quiet"]) == 0
    check_page(tmp_path / "rep" / "index.html")
    assert "index.html" in capsys.readouterr().out


def test_a_learning_rate_grid_shows_the_rate_each_reading_chose(tmp_path):
    obj = probe_object(lr_grid=[0.5, 1.0])
    slow = []
    for br in obj["branches"]:
        br["lr_multiplier"] = 1.0
        other = dict(br, lr_multiplier=0.5, lr=br["lr"] / 2, diverged=True, steps_to_target=None)
        slow.append(other)
    obj["branches"] += slow
    obj["mccandlish"]["multipliers"] = [[b, 1.0] for b in obj["batch_sizes"]]
    obj["merrill"]["multipliers"] = [[b, 1.0] for b in obj["batch_sizes"]]
    page, visible = _page(tmp_path, [_probe_file(tmp_path, obj)])
    assert "64 0.00141 3 of 3 36.2 2320" in visible  # the chosen rate only, its three seeds
    assert "the rule's learning rate times 0.5, 1" in visible
