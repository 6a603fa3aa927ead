"""The page agrees with itself (issue 19): one count of measured steps, one precision per
quantity, the rules figure's legend in the text's terms, a reason beside every row of
dashes, contents and back-to-top links, tables in their own box, and light figures."""
import json
import math
import re
from html.parser import HTMLParser

import pytest

from gradnoise.formats import run_header
from gradnoise.report import build_report
from gradnoise.report import study_figures
from gradnoise.report.sections import RECOMMEND_TEXT
from gradnoise.studies.output import StudyWriter
from report_synth import LAYERS, PARAMS, critical_study, law_study, records, recommend_study, write_run


class Rows(HTMLParser):
    """Visible text, table rows (lists of cell texts), ids and local links of a page."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.rows, self.ids, self.links, self.text = [], set(), [], []
        self._row, self._cell, self._style = None, None, False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "a" and a.get("href", "").startswith("#"):
            self.links.append(a["href"][1:])
        if tag == "tr":
            self._row = []
        if tag in ("td", "th"):
            self._cell = []
        self._style = tag == "style"

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        if tag == "tr":
            self.rows.append(self._row)
            self._row = None
        self._style = False

    def handle_data(self, data):
        if self._style:
            return
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    @property
    def visible(self):
        return "".join(self.text)


def page_of(files, tmp_path):
    index = build_report(files, tmp_path / "report")
    return index, Rows(index.read_text(encoding="utf-8"))


def _write_lines(path, head, steps):
    path.write_text("".join(json.dumps(x) + "\n" for x in [head] + steps), encoding="utf-8")
    return path


# ------------------------------------------------------------------ measured steps
def test_one_count_of_measured_steps(tmp_path):
    run = write_run(tmp_path / "run.jsonl", records(n=30, skip_at=(5, 6)))
    _, page = page_of([run], tmp_path)
    counted = [r for r in page.rows if r and any("measured steps" in c for c in r)]
    assert len(counted) >= 2  # the run's key numbers and the advice both say how many
    for row in counted:
        value = row[-1]
        assert re.search(r"\b30\b", value), row       # every 'measured steps' is the file's 30 step lines
        first = int(re.search(r"\d+", value).group())
        if first != 30:                                # a different count says what it counts
            assert f"{first} of the 30 measured steps" in value and "defined smoothed B_simple" in value, row
    assert "28 with a defined smoothed B_simple" in page.visible   # the 2 skipped steps are not read
    assert "2 skipped" in page.visible


def _growing_run(tmp_path):
    """A run file whose smoothed B_simple is unbounded at first, falls to 4 at step 10 and
    grows to 20 by step 29: the verdict says 'up from 4 at step 10'."""
    steps = []
    for i, r in enumerate(records(n=30)):
        d = r.to_dict()
        v = 50.0 if i < 2 else (8.0 - 0.5 * (i - 2) if i <= 10 else 4.0 + 16.0 * (i - 10) / 19)
        d["smoothed"]["b_simple"] = v
        d["b_simple_interval"] = [0.5 * v, "inf"] if i < 2 else [0.7 * v, 1.5 * v]
        steps.append(d)
    return _write_lines(tmp_path / "grow.jsonl", run_header("per_sample", 1, 0.9, PARAMS, LAYERS), steps)


def test_the_b_simple_values_the_verdict_quotes_are_in_the_run_table(tmp_path):
    _, page = page_of([_growing_run(tmp_path)], tmp_path)
    verdict = page.visible.split("Created ")[0]
    quoted = re.findall(r"up from (\S+) at step (\d+)", verdict)
    assert quoted == [("4", "10")], verdict
    last = re.search(r"\(step (\d+)[^)]*\)(?: the noise scale)? is B_simple ≈ (\S+)", verdict)
    assert last, verdict
    quoted.append((last.group(2), last.group(1)))
    values = [r[-1] for r in page.rows if r and "B_simple" in r[0]]
    for value, step in quoted:
        assert any(v.startswith(value + " ") and v.endswith(f"at step {step}") for v in values), (value, step, values)


# ------------------------------------------------------------------ one precision per quantity
def _law(out, z):
    path = law_study(out)  # points and checkpoints; the summary line is replaced below
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[-1] = json.dumps({"type": "summary", "max_abs_z": z, "checkpoint": "init", "batch_size": 4, "points": 8})
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_the_law_deviation_reads_the_same_in_the_verdict_and_its_section(tmp_path):
    out = tmp_path / "studies"
    _, page = page_of([_law(out, 2.3349), critical_study(out)], tmp_path)
    in_section = re.search(r"Largest deviation: (\S+) standard errors", page.visible)
    assert in_section and in_section.group(1) == "2.33"
    # the verdict keeps to its answer: the law's check is said once, in its own section
    assert "largest deviation" not in page.visible.split("Input files")[0].lower()


def _adaptive(out):
    def part(steps, examples, reached=2):
        return {"reached": reached, "runs": 2, "steps": {"mean": steps, "interval": [steps * 0.9, steps * 1.1]},
                "examples": {"mean": examples, "interval": [examples * 0.9, examples * 1.1]},
                "seconds": {"mean": 1.0, "interval": [0.9, 1.1]}, "steps_vs_small": steps / 56.0}
    methods = {"fixed small": part(56.0, 896.0), "fixed large": part(50.0, 3200.0),
               "AdaScale": part(20.0, 1288.0), "adaptive batch": part(52.0, 920.0),
               "Adam + AdaScale (√ gain)": part(28.0, 1792.0)}
    with StudyWriter(out, "adaptive", "digits-mlp", 0, "tiny", {}) as w:
        w.write("summary", target_loss=0.3, base_batch=16, large_batch=64, methods=methods)
    return w.path


def test_a_factor_reads_the_same_in_the_verdict_and_the_table(tmp_path):
    out = tmp_path / "studies"
    _, page = page_of([_adaptive(out), critical_study(out)], tmp_path)
    said = re.search(r"AdaScale took ×(\S+) the steps", page.visible)
    row = next(r for r in page.rows if r and r[0] == "AdaScale")
    assert said and row[-1] == said.group(1) == "0.36"   # 20/56 = 0.357…, shown once, one way


# ------------------------------------------------------------------ the rules figure
def test_the_rules_legend_uses_the_texts_b_simple(monkeypatch):
    seen = []

    def capture(fig, name, alt, caption=""):
        for ax in fig.axes:
            if ax.get_legend() is not None:
                seen.extend(t.get_text() for t in ax.get_legend().get_texts())
        return study_figures.Plot(name, b"", alt, caption)

    monkeypatch.setattr(study_figures, "finish", capture)
    rules = [{"to_batch": b, "linear": b / 32, "sqrt": math.sqrt(b / 32),
              "adascale": (1 + 20 / 32) / (1 + 20 / b)} for b in (8, 16, 64, 128)]
    plot = study_figures.rules_figure(rules, 32, 20.0, "rules", "a run")
    adascale = [t for t in seen if t.startswith("AdaScale")]
    assert adascale and not any("B_noise" in t for t in seen), seen
    formula = adascale[0].split(None, 1)[1]
    assert formula in RECOMMEND_TEXT and formula in plot.alt   # the text's formula, verbatim
    assert any("B_simple" in t for t in seen if not t.startswith("AdaScale"))  # the marked noise scale


# ------------------------------------------------------------------ a dash with its reason
def test_a_row_of_dashes_says_why(tmp_path):
    layers = dict(LAYERS, lm_head={"type": "Linear", "params": ["lm_head.weight"]})  # tied: not measured
    steps = [r.to_dict() for r in records(n=10)]
    run = _write_lines(tmp_path / "tied.jsonl", run_header("per_sample", 1, 0.9, PARAMS, layers), steps)
    _, page = page_of([run], tmp_path)
    row = next(r for r in page.rows if r and r[0].startswith("lm_head"))
    dashes = [c for c in row if c.startswith("—")]
    assert len(dashes) >= 3
    assert any("not measured" in c and "lm_head.weight" in c and "tied" in c for c in row), row
    for r in page.rows:  # no other row of nothing but dashes
        if r and r[0] and len(r) > 2:
            assert not all(c in ("—", "") for c in r[1:]), r


# ------------------------------------------------------------------ navigation and tables
def test_contents_and_back_to_top(tmp_path):
    out = tmp_path / "studies"
    files = [law_study(out), critical_study(out), recommend_study(out),
             write_run(tmp_path / "run.jsonl", records())]
    index, page = page_of(files, tmp_path)
    text = index.read_text(encoding="utf-8")
    nav = text[text.index('<nav class="contents"'):text.index("</nav>")]
    assert text.index("</nav>") < text.index('id="verdict"')           # the contents come first
    sections = re.findall(r'<section id="([^"]+)"', text)
    linked = re.findall(r'href="#([^"]+)"', nav)
    assert set(sections) <= set(linked) and {"verdict", "inputs", "how-to-read"} <= set(linked)
    assert all(target in page.ids for target in page.links), set(page.links) - page.ids  # no dead link
    main = text[text.index("<main>"):]
    assert main.count('href="#top"') == main.count("<section ") >= 4 and "top" in page.ids


def test_every_table_sits_in_its_own_scroll_box(tmp_path):
    out = tmp_path / "studies"
    index, _ = page_of([law_study(out), critical_study(out), write_run(tmp_path / "run.jsonl", records())], tmp_path)
    text = index.read_text(encoding="utf-8")
    assert text.count("<table>") == text.count('<div class="table-box"><table>') > 0
    css = re.search(r"\.table-box \{([^}]*)\}", text).group(1)
    assert "overflow-x: auto" in css and "max-width: 100%" in css
    assert re.search(r"th, td \{[^}]*overflow-wrap: anywhere", text)   # long names wrap instead of widening


# ------------------------------------------------------------------ a lighter page
def test_figures_are_indexed_colour_pngs(tmp_path):
    out = tmp_path / "studies"
    index, _ = page_of([law_study(out), critical_study(out), write_run(tmp_path / "run.jsonl", records())], tmp_path)
    pngs = sorted((index.parent / "figures").glob("*.png"))
    assert len(pngs) == 4
    for p in pngs:
        data = p.read_bytes()
        assert data[25] == 3, p.name          # IHDR colour type 3: a palette of at most 256 colours
        assert len(data) < 40_000, (p.name, len(data))
    assert index.stat().st_size < 200_000


def test_the_optimizers_finding_names_sgd_once():
    """Finding 5: "SGD's the most (10.6), SGD's 10.6"."""
    from gradnoise.report.optimizers_section import optimizers_finding
    opts = {"SGD": {"median_ratio": 10.6, "final_loss": 0.5}, "Adam": {"median_ratio": 2.0, "final_loss": 0.3},
            "MARS": {"median_ratio": 4.0, "final_loss": 0.4}}
    text = optimizers_finding({"optimizers": opts})
    assert text.count("SGD") == 1 and "SGD's the most (10.6)" in text
    opts["SGD"]["median_ratio"] = 3.0
    assert "SGD's 3" in optimizers_finding({"optimizers": opts})
