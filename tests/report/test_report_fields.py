"""Per-layer bands, the lr-batch study's ``no_progress`` and ``stable_fit``, seed and size
per file, and multi-note reasons."""
import math

import numpy as np
import pytest

from gradnoise.report import build_report, read_study
from gradnoise.report.build import _mixed_runs
from gradnoise.report.files import load
from gradnoise.report.figures import new_figure
from gradnoise.report.heatmap import NO_PROGRESS, RAN, _grid, _mark_cells, _overlays
from gradnoise.report.layers import layer_of, layer_series
from gradnoise.report.sections import reason_note
from report_synth import PARAMS, STABLE_FIT, critical_study, law_study, lr_batch_study, records, write_run
from test_report_build import check_page


def _filed_ratio(steps, layer):
    """Σ trace / Σ |G|² of the file's smoothed per-parameter values of ``layer``."""
    names = [p for p in PARAMS if layer_of(p) == layer]
    def total(s, key):
        return sum(s["by_param"][p]["smoothed"].get(key) or math.nan for p in names)

    return np.array([total(s, "trace_cov") / total(s, "grad_sq_norm") for s in steps])


@pytest.mark.parametrize("skip_at", [(), (0, 4, 5)])
def test_layers_match_their_parameters_and_the_band_holds_the_line(skip_at):
    """The monitor's per-layer EMAs equal the sums of its per-parameter ones (EMAs are
    linear), and each band, as written, holds its line and is never below 0."""
    recs = records(20, skip_at=skip_at)
    steps = [r.to_dict() for r in recs]
    layers = layer_series({}, steps, 1.0)
    assert {layer.label for layer in layers} == {"body.0", "head"}
    for layer in layers:
        expected = _filed_ratio(steps, layer.label)
        np.testing.assert_allclose(layer.b_simple, expected, rtol=1e-9, equal_nan=True)
        low, high = layer.band
        defined = np.isfinite(layer.b_simple) & ~np.isnan(low)
        assert defined.sum() >= 20 - len(skip_at) - 2  # every step after the second folded in
        assert np.all(low[defined] <= layer.b_simple[defined])
        assert np.all(layer.b_simple[defined] <= high[defined])
        assert np.all(low[defined] >= 0) and np.isfinite(high[defined]).any()


def test_run_section_has_the_layer_table(tmp_path):
    index = build_report([write_run(tmp_path / "run.jsonl", records(12))], tmp_path / "report")
    visible = " ".join(check_page(index).visible)
    assert "these 95 % intervals" in visible and "smoothed B_simple, 95 % interval" in visible
    assert "body.0 (Linear)" in visible and "head (Linear)" in visible and "share of tr(Σ)" in visible


def test_no_progress_cells_keep_their_loss_and_old_cells_still_read():
    cells = [{"batch_size": 8, "lr": 0.1, "final_loss": 2.0, "diverged": False, "no_progress": True,
              "skipped": False},
             {"batch_size": 8, "lr": 0.3, "final_loss": 1.0, "diverged": False, "skipped": False}]
    _, _, loss, status = _grid(cells)
    assert status[:, 0].tolist() == [NO_PROGRESS, RAN]
    assert loss[:, 0].tolist() == [2.0, 1.0]


def test_heat_map_labels_no_progress_and_both_fits(tmp_path):
    path = lr_batch_study(tmp_path)
    _, lines = read_study(path)
    cells = [ln for ln in lines if ln["type"] == "cell"]
    stable = [ln for ln in lines if ln["type"] == "stable"]
    summary = [ln for ln in lines if ln["type"] == "summary"][-1]
    bs, lrs, _, status = _grid(cells)
    fig, (ax,) = new_figure(1, 1)
    ax.set_xlim(-0.5, bs.size - 0.5)
    ax.set_ylim(-0.5, lrs.size - 0.5)
    _mark_cells(ax, status)
    _overlays(ax, bs, lrs, stable, summary)
    labels = ax.get_legend_handles_labels()[1]
    assert "no progress (loss did not fall)" in labels
    assert "fit to the largest stable rate" in labels
    assert any("to the best rate" in label for label in labels)


def test_lr_batch_section_shows_both_fits(tmp_path):
    out = tmp_path / "studies"
    index = build_report([lr_batch_study(out)], tmp_path / "report")
    visible = " ".join(check_page(index).visible)
    assert "fit to the best rate" in visible and "fit to the largest stable rate" in visible
    assert "32 [0, 80]" in visible and "12 (95 % interval ≥ 5)" in visible  # B_noise of each fit
    assert "0.7" in visible and "0.25" in visible and STABLE_FIT["eps_max"] == 0.7
    assert "both fits are shown" in visible and "curvature" in visible


def test_old_lr_batch_file_without_new_fields_builds(tmp_path):
    out = tmp_path / "studies"
    page = check_page(build_report([lr_batch_study(out, new_fields=False)], tmp_path / "report"))
    visible = " ".join(page.visible)
    assert "fit to the largest stable rate" in visible and len(page.images) == 1


def test_subheadings_show_seed_and_size_and_mixed_runs_are_noted(tmp_path):
    out = tmp_path / "studies"
    files = [law_study(out, "task-a", seed=0), law_study(out, "task-b", seed=1, size="default")]
    page = check_page(build_report(files, tmp_path / "report"))
    h3 = [text for tag, text in page.headings if tag == "h3"]
    assert any("law-task-a.jsonl, seed 0, size tiny" in t for t in h3)
    assert any("seed 1, size default" in t for t in h3)
    visible = " ".join(page.visible)
    assert "these files come from different runs: seeds 0, 1; sizes tiny, default" in visible.lower()


def test_files_of_one_run_have_no_mixed_note(tmp_path):
    out = tmp_path / "studies"
    inputs = [load(law_study(out, "a")), load(law_study(out, "b")), load(write_run(tmp_path / "r.jsonl", []))]
    assert _mixed_runs(inputs) == ""
    assert "seeds 0, 3" in _mixed_runs(inputs + [load(law_study(out, "c", seed=3))])


def test_several_reasons_become_a_list(tmp_path):
    html = reason_note({"reason": "only 2 batch sizes reached the target; B_crit is above the grid"})
    assert html.count("<li>") == 2 and "Notes from the study:" in html
    assert reason_note({"reason": "one note"}).count("<li>") == 0
    assert reason_note({"reason": None}) == "" and reason_note({}) == ""
    out = tmp_path / "studies"
    path = critical_study(out, reason="first note; second note")
    visible = " ".join(check_page(build_report([path], tmp_path / "report")).visible)
    assert "first note" in visible and "second note" in visible
