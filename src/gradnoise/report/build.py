"""``build_report``: one self-contained HTML page from study, run and probe files."""
from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, List, Mapping, Optional, Sequence

from .. import __version__
from . import html as h
from .files import PROBE_FORMAT, RUN_FORMAT, STUDY_FORMAT, Input, load
from .fmt import fmt_text, slug
from .noise_sections import run_section
from .section_table import FORMAT_SECTIONS, SECTIONS
from .verdict import TaskVerdict, text_lines, verdicts

Sections = Mapping[str, Callable]

HOW_TO_READ = (
    "Every quantity is about the gradient of one optimizer step. g_i is the gradient of one sample's "
    "loss and G the true gradient over the data. tr(Σ) = E‖g_i − G‖² is the noise: how far a single "
    "sample's gradient scatters around G (a batch of B samples has noise tr(Σ)/B). |G|² is the "
    "signal: the squared norm of the true gradient. B_simple = tr(Σ)/|G|² is the noise scale, the "
    "batch size at which noise and signal are equal: batches well below it spend steps on noise, "
    "batches well above it buy little per extra sample (McCandlish et al., 2018). Smoothed values are "
    "debiased moving averages of tr(Σ) and |G|² taken separately; intervals are 95 %. A dash (—) marks "
    "a value that is undefined or was not recorded."
)


HEAD_PARTS = (("verdict", "Verdict"), ("inputs", "Input files"), ("how-to-read", "How to read this report"))


def _stems(inputs: Sequence[Input]) -> List[str]:
    """A unique file stem per input, for its figures: ``01-law-digits``, …"""
    return [f"{i:02d}-{slug(inp.path.stem)}" for i, inp in enumerate(inputs, start=1)]


def _sections(inputs: Sequence[Input], table: Sections) -> List[h.Section]:
    """Study sections in the table's order, then a section per other format (probe files),
    then one section per run file."""
    stems = _stems(inputs)
    sections = []
    for study, make in table.items():
        items = [(stem, inp) for stem, inp in zip(stems, inputs) if inp.study == study]
        if items:
            sections.append(make(items))
    for fmt, make in FORMAT_SECTIONS.items():
        items = [(stem, inp) for stem, inp in zip(stems, inputs) if inp.format == fmt]
        if items:
            sections.append(make(items))
    for stem, inp in zip(stems, inputs):
        if inp.format == RUN_FORMAT:
            sections.append(run_section(stem, inp, anchor=f"run-{stem}"))
    return sections


def _kind(inp: Input) -> str:
    if inp.format == PROBE_FORMAT:
        return "branch probe"
    return "monitor run file" if inp.format == RUN_FORMAT else f"{inp.study} study"


def _mixed_runs(inputs: Sequence[Input]) -> str:
    """A note when the study files disagree in seed or size (``""`` when they agree)."""
    studies = [inp for inp in inputs if inp.format == STUDY_FORMAT]
    parts = []
    for key, plural in (("seed", "seeds"), ("size", "sizes")):
        values = []
        for inp in studies:
            text = fmt_text(inp.header.get(key))
            if text not in values:
                values.append(text)
        if len(values) > 1:
            parts.append(f"{plural} {', '.join(values)}")
    return h.note(f"These files come from different runs: {'; '.join(parts)}.") if parts else ""


def _earlier(failures: Sequence[str], inputs: Sequence[Input]) -> List[str]:
    """The failures (``"<study> on <task>: …"``) whose study file is among the inputs: a
    file that an earlier run left, since a failed study never replaces it."""
    present = {f"{inp.study} on {inp.header.get('task')}:" for inp in inputs if inp.study is not None}
    return [f for f in failures if any(f.startswith(p) for p in present)]


def _verdict_html(found: Sequence[TaskVerdict], failures: Sequence[str], skipped: Sequence[str] = (),
                  earlier: Sequence[str] = ()) -> str:
    """The verdict block at the top of the page; every number links to its section."""
    def html_of(line) -> str:
        return "".join(f'<a href="#{h.esc(a)}">{h.esc(t)}</a>' if a else h.esc(t) for t, a in line.pieces)

    parts = ['<section id="verdict" class="verdict">\n<h2>Verdict</h2>\n']
    if failures:
        items = "".join(f"<li>{h.esc(f)}</li>" for f in failures)
        old = (f"; the section{'s' if len(earlier) > 1 else ''} shown below for "
               f"{', '.join(f.split(':', 1)[0] for f in earlier)} {'are' if len(earlier) > 1 else 'is'} from an "
               "earlier run (see its creation time)") if earlier else ""
        parts.append(f'<div class="note failed"><strong>This run is incomplete</strong>: these studies failed, so '
                     f"their answers are missing from the verdict{h.esc(old)}.<ul>{items}</ul></div>\n")
    if skipped:
        items = "".join(f"<li>{h.esc(s)}</li>" for s in skipped)
        parts.append(f'<div class="note"><strong>Not run</strong> (they do not apply to these tasks; not a '
                     f"failure):<ul>{items}</ul></div>\n")
    if not found:
        parts.append(h.para("No study on this page can answer the batch-size question: run gradnoise study "
                            "trajectory critical-batch lr-batch, or give a monitor run file."))
    for v in found:
        because = "".join(f"<li>{html_of(b)}</li>" for b in v.because)
        parts.append(f"<h3>{h.esc(v.name)}</h3>\n<p class=\"answer\"><strong>{html_of(v.headline)}</strong></p>\n"
                     f"<ul>{because}</ul>\n<p>{html_of(v.next_step)}</p>\n")
    parts.append("</section>\n")
    return "".join(parts)


def _head(given: Sequence[str], inputs: Sequence[Input], created: str) -> str:
    """The block under the verdict: inputs, time, version and how to read the page."""
    items = []
    for text, inp in zip(given, inputs):
        extra = f", noise from {h.esc(inp.run_path.name)}" if inp.run is not None and inp.run_path else ""
        items.append(f"<li><span class=\"mono\">{h.esc(text)}</span> ({h.esc(_kind(inp))}{extra})</li>")
    return (
        f'<p class="meta">Created {h.esc(created)} with gradnoise {h.esc(__version__)}.</p>\n'
        f'<section id="inputs">\n<h2>Input files</h2>\n<ul>{"".join(items)}</ul>\n{_mixed_runs(inputs)}</section>\n'
        f'<section id="how-to-read">\n<h2>How to read this report</h2>\n{h.para(HOW_TO_READ)}</section>\n'
    )


def _write_figures(sections: Sequence[h.Section], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for section in sections:
        for plot in section.plots:
            (folder / f"{plot.name}.png").write_bytes(plot.png)


def _table(sections: Optional[Sections]) -> Sections:
    return SECTIONS if sections is None else sections


def _load_all(files: Sequence["os.PathLike[str] | str"], table: Sections) -> List[Input]:
    given = [os.fspath(f) for f in files]
    if not given:
        raise ValueError("build_report needs at least one study or run file")
    inputs = [load(path) for path in given]
    for inp in inputs:
        if inp.format == STUDY_FORMAT and inp.study not in table:
            raise ValueError(f"{inp.path}: unknown study {inp.study!r}; expected one of {', '.join(table)}")
    return inputs


def verdict_lines(files: Sequence["os.PathLike[str] | str"], failures: Sequence[str] = (),
                  sections: Optional[Sections] = None, width: Optional[int] = None) -> List[str]:
    """The page's verdict as plain-text lines (what ``gradnoise study`` and ``gradnoise
    report`` print last, folded to ``width`` columns; one line per sentence without it);
    ``failures`` are ``"<study> on <task>: <error>"`` lines.

    Raises:
        ValueError: as :func:`build_report`.
    """
    inputs = _load_all(files, _table(sections))
    return text_lines(verdicts(inputs, _stems(inputs)), failures, width)


def build_report(files: Sequence["os.PathLike[str] | str"], out_dir: "os.PathLike[str] | str",
                 title: str = "gradnoise report", sections: Optional[Sections] = None,
                 failures: Sequence[str] = (), skipped: Sequence[str] = ()) -> Path:
    """Build the HTML report of study files and monitor run files.

    Every input is read and checked before anything is written. The page,
    ``out_dir/index.html``, is self-contained (inline CSS, figures embedded as PNG data
    URIs, no script, no external address); each figure is also written to
    ``out_dir/figures/<name>.png`` for use elsewhere, but the page does not need them.

    Args:
        files: paths of ``gradnoise-study`` files (one per study and task; a trajectory
            study's run file is found through its header) and ``gradnoise-run`` files.
        out_dir: the output folder (created if missing).
        title: the page's title.
        sections: study name -> section builder, in the page's order (default: the
            report's own table, :data:`gradnoise.report.section_table.SECTIONS`).
        failures: ``"<study> on <task>: <error>"`` for each study that failed in the run
            that produced the files: the page says it is incomplete (and, for those whose
            file is among ``files``, that it is from an earlier run).
        skipped: ``"<study> on <task>: <why>"`` for each study left out because it does
            not apply to the task (:func:`gradnoise.studies.runner.skip_reason`): listed
            as notes, not failures.

    Returns:
        The path of ``index.html``.

    Raises:
        ValueError: with a one-line message naming the file when an input is missing,
            empty, not JSON, of an unknown format or version, or corrupt before its last
            line; or when ``files`` is empty.
    """
    table = _table(sections)
    inputs = _load_all(files, table)
    parts = _sections(inputs, table)
    out = Path(out_dir)
    _write_figures(parts, out / "figures")
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    top = _verdict_html(verdicts(inputs, _stems(inputs)), failures, skipped, _earlier(failures, inputs))
    text = h.page(title, top + _head([os.fspath(f) for f in files], inputs, created), parts, HEAD_PARTS)
    index = out / "index.html"
    partial = out / "index.html.partial"
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, index)  # a reader never sees a half-written page
    return index


__all__ = ["build_report", "verdict_lines"]
