"""``build_report``: one self-contained HTML page from study and run files."""
from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, List, Sequence, Tuple

from .. import __version__
from . import html as h
from .files import RUN_FORMAT, Input, load
from .fmt import fmt_text, slug
from .noise_sections import run_section, trajectory_section
from .sections import critical_section, law_section, lr_batch_section, recommend_section

SECTIONS: Tuple[Tuple[str, Callable], ...] = (
    ("law", law_section),
    ("trajectory", trajectory_section),
    ("critical-batch", critical_section),
    ("lr-batch", lr_batch_section),
    ("recommend", recommend_section),
)

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


def _stems(inputs: Sequence[Input]) -> List[str]:
    """A unique file stem per input, for its figures: ``01-law-digits``, …"""
    return [f"{i:02d}-{slug(inp.path.stem)}" for i, inp in enumerate(inputs, start=1)]


def _sections(inputs: Sequence[Input]) -> List[h.Section]:
    """Study sections in the fixed order, then one section per run file."""
    stems = _stems(inputs)
    sections = []
    for study, make in SECTIONS:
        items = [(stem, inp) for stem, inp in zip(stems, inputs) if inp.study == study]
        if items:
            sections.append(make(items))
    for stem, inp in zip(stems, inputs):
        if inp.format == RUN_FORMAT:
            sections.append(run_section(stem, inp, anchor=f"run-{stem}"))
    return sections


def _kind(inp: Input) -> str:
    return "monitor run file" if inp.format == RUN_FORMAT else f"{inp.study} study"


def _mixed_runs(inputs: Sequence[Input]) -> str:
    """A note when the study files disagree in seed or size (``""`` when they agree)."""
    studies = [inp for inp in inputs if inp.format != RUN_FORMAT]
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


def _head(given: Sequence[str], inputs: Sequence[Input], created: str) -> str:
    """The block under the title: inputs, time, version and how to read the page."""
    items = []
    for text, inp in zip(given, inputs):
        extra = f", noise from {h.esc(inp.run_path.name)}" if inp.run is not None and inp.run_path else ""
        items.append(f"<li><span class=\"mono\">{h.esc(text)}</span> ({h.esc(_kind(inp))}{extra})</li>")
    return (
        f'<p class="meta">Created {h.esc(created)} with gradnoise {h.esc(__version__)}.</p>\n'
        f"<h2>Input files</h2>\n<ul>{''.join(items)}</ul>\n{_mixed_runs(inputs)}"
        f"<h2>How to read this report</h2>\n{h.para(HOW_TO_READ)}"
    )


def _write_figures(sections: Sequence[h.Section], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for section in sections:
        for plot in section.plots:
            (folder / f"{plot.name}.png").write_bytes(plot.png)


def build_report(files: Sequence["os.PathLike[str] | str"], out_dir: "os.PathLike[str] | str",
                 title: str = "gradnoise report") -> Path:
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

    Returns:
        The path of ``index.html``.

    Raises:
        ValueError: with a one-line message naming the file when an input is missing,
            empty, not JSON, of an unknown format or version, or corrupt before its last
            line; or when ``files`` is empty.
    """
    given = [os.fspath(f) for f in files]
    if not given:
        raise ValueError("build_report needs at least one study or run file")
    inputs = [load(path) for path in given]
    sections = _sections(inputs)
    out = Path(out_dir)
    _write_figures(sections, out / "figures")
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    text = h.page(title, _head(given, inputs, created), sections)
    index = out / "index.html"
    partial = out / "index.html.partial"
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, index)  # a reader never sees a half-written page
    return index


__all__ = ["build_report"]
