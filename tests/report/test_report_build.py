"""The report page: well-formed, self-contained, every figure a readable PNG with alt
text, sections in order, and no 'nan'/'None' anywhere a reader looks."""
import base64
import io
import re
import warnings
from html.parser import HTMLParser

import matplotlib.image
import pytest

import gradnoise
from gradnoise.studies.output import StudyWriter
from gradnoise.report import build_report
from report_synth import (
    critical_study,
    law_study,
    lr_batch_study,
    recommend_study,
    records,
    trajectory_study,
    write_run,
)

PNG = b"\x89PNG\r\n\x1a\n"
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
TITLES = ["Law: gradient noise against batch size", "Trajectory: noise over training", "Critical batch size",
          "Learning rate against batch size", "Recommendation: batch size and learning rate", "Run file run.jsonl"]


class Page(HTMLParser):
    """Tags checked for balance, images, headings and the visible text of a page."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.images, self.headings, self.visible = [], [], [], [], []
        self._heading = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        if tag in ("h1", "h2", "h3"):
            self._heading = []
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
            return
        self.stack.pop()
        if tag in ("h1", "h2", "h3"):
            self.headings.append((tag, "".join(self._heading).strip()))
            self._heading = None

    def handle_data(self, data):
        if self.stack and self.stack[-1] == "style":
            return
        self.visible.append(data)
        if self._heading is not None:
            self._heading.append(data)


def check_page(index):
    """Parse ``index.html`` and check what every report must satisfy; returns the Page."""
    text = index.read_text(encoding="utf-8")
    page = Page(text)
    assert not page.errors and not page.stack, (page.errors, page.stack)
    assert "<script" not in text.lower() and "http://" not in text and "https://" not in text
    assert "figures/" not in text  # the page does not depend on the PNG files beside it
    for img in page.images:
        assert len(img.get("alt", "").strip()) > 20
        src = img["src"]
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png.startswith(PNG)
        pixels = matplotlib.image.imread(io.BytesIO(png), format="png")
        assert pixels.ndim == 3 and pixels.size > 0
    visible = " ".join(page.visible)
    for word in (r"\bnan\b", r"\bNone\b", r"\bnull\b", r"\binf\b"):
        assert not re.search(word, visible, flags=re.IGNORECASE), (word, re.search(word, visible, re.I))
    return page


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """One report of every study (files given out of order) and a run file."""
    tmp = tmp_path_factory.mktemp("full")
    out = tmp / "studies"
    files = [recommend_study(out), lr_batch_study(out), critical_study(out), trajectory_study(out),
             law_study(out), write_run(tmp / "run.jsonl", records())]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning (missing glyph, log of zero, …) on good input
        index = build_report(files, tmp / "report", title="Test <report> & co")
    return index, files


def test_full_report_is_well_formed(full):
    index, _ = full
    assert index.name == "index.html"
    page = check_page(index)
    assert len(page.images) == 7  # law, trajectory, critical, lr-batch, recommend rules, run noise + rules
    pngs = sorted((index.parent / "figures").glob("*.png"))
    assert len(pngs) == len(page.images)
    assert all(p.read_bytes().startswith(PNG) for p in pngs)


def test_sections_in_order_with_header(full):
    index, files = full
    page = check_page(index)
    h2 = [text for tag, text in page.headings if tag == "h2"]
    positions = [h2.index(t) for t in TITLES]
    assert positions == sorted(positions)
    assert ("h1", "Test <report> & co") in page.headings
    visible = " ".join(page.visible)
    assert f"gradnoise {gradnoise.__version__}" in visible
    assert "How to read this report" in h2
    assert all(str(f) in visible for f in files)


def test_key_numbers_are_shown(full):
    visible = " ".join(check_page(full[0]).visible)
    assert "Largest deviation: 0.6 standard errors at B=4" in visible
    assert "16 (95 % interval ≥ 10)" in visible          # B_crit with its (one-sided) interval
    assert "32 [0, 80]" in visible                       # B_noise: the interval clipped to B ≥ 0
    assert not re.search(r"[\[(]−|, −", visible)             # no interval with a negative end anywhere
    assert "—" in visible                                # AdaScale undefined in the recommend study
    assert "last smoothed B_simple, 95 % interval" in visible


def test_two_tasks_of_one_study(tmp_path):
    out = tmp_path / "studies"
    index = build_report([law_study(out, "task-a"), law_study(out, "task-b")], tmp_path / "report")
    page = check_page(index)
    h3 = [text for tag, text in page.headings if tag == "h3"]
    assert any("task-a" in t for t in h3) and any("task-b" in t for t in h3)
    assert len(page.images) == 2
    assert [t for tag, t in page.headings if tag == "h2"].count(TITLES[0]) == 1


@pytest.mark.parametrize("kind", ["skipped", "unbounded", "header-only"])
def test_awkward_run_files_build(tmp_path, kind):
    if kind == "header-only":
        path = write_run(tmp_path / "run.jsonl", [])
    else:
        path = write_run(tmp_path / "run.jsonl", records(6, skip_all=kind == "skipped", unbounded=kind == "unbounded"))
    page = check_page(build_report([path], tmp_path / "report"))
    visible = " ".join(page.visible)
    assert "Run file run.jsonl" in [t for _, t in page.headings]
    if kind == "skipped":
        assert "no step has a defined smoothed B_simple" in visible and len(page.images) == 2
    elif kind == "unbounded":
        assert "not determined from these steps" in visible and "−∞" not in visible and len(page.images) == 2
    else:
        assert "no steps yet" in visible and not page.images


def test_trajectory_without_its_run_file(tmp_path):
    out = tmp_path / "studies"
    path = trajectory_study(out)
    (out / "trajectory-digits-mlp.run.jsonl").unlink()
    with pytest.warns(UserWarning, match="not beside the study file"):
        index = build_report([path], tmp_path / "report")
    page = check_page(index)
    assert len(page.images) == 1
    assert "Noise panels are empty" in " ".join(page.visible)


def test_rebuild_replaces_the_page(tmp_path):
    out = tmp_path / "studies"
    first = build_report([law_study(out)], tmp_path / "report", title="one")
    second = build_report([lr_batch_study(out)], tmp_path / "report", title="two")
    assert first == second
    text = second.read_text(encoding="utf-8")
    assert "<title>two</title>" in text and "Law:" not in text
    assert not list((tmp_path / "report").glob("*.partial"))


def test_unfinished_and_degenerate_studies_build(tmp_path):
    """Header-only files of every study, every cell diverged, no run reaching the target,
    and every number null: each still gives a readable section."""
    out = tmp_path / "studies"
    files = []
    for study in ("law", "critical-batch", "lr-batch", "recommend"):
        with StudyWriter(out, study, "unfinished", 0, "tiny", {}) as w:
            files.append(w.path)
    with StudyWriter(out, "lr-batch", "diverged", 0, "tiny", {}) as w:
        for b, lr in ((8, 0.1), (8, 1.0), (16, 0.1), (16, 1.0)):
            w.write("cell", batch_size=b, lr=lr, final_loss=None, diverged=True, skipped=lr > 0.5)
        w.write("summary", eps_max=None, b_noise=None, b_noise_interval=[None, None], b_simple=None, points=0)
        files.append(w.path)
    with StudyWriter(out, "critical-batch", "unreached", 0, "tiny", {"target_loss": 0.1}) as w:
        w.write("best", batch_size=8, seed=0, lr=None, steps=None, examples=None)
        w.write("summary", target_loss=0.1, s_min=None, e_min=None, b_crit=None,
                b_crit_interval=["-inf", "inf"], b_simple=None, b_simple_interval=None, points=0,
                reason="no batch size reached the target loss")
        files.append(w.path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        page = check_page(build_report(files, tmp_path / "report"))
    visible = " ".join(page.visible)
    assert "no summary line yet" in visible and "no measured points yet" in visible
    assert "Note from the study: no batch size reached the target loss" in visible
    assert len(page.images) == 4  # critical ×2 and lr-batch ×2; law and recommend have no data
