"""Sections built from monitor run files: the trajectory study (its losses from the
study file, its noise from the run file beside it) and each run file given directly."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..stats.advice import advise
from . import html as h
from .figures import Plot
from .files import Input
from .fmt import floats, fmt_count, fmt_num, fmt_share, fmt_text, fmt_with_interval
from .noise_figures import noise_figure
from .sections import advice, section, subheading, summary_of, task_of
from .layers import LayerNoise
from .series import NoiseSeries, StepCounts, b_simple_marks, last_finite, noise_series, step_counts

Items = Sequence[Tuple[str, Input]]

TRAJECTORY_TEXT = (
    "One training run, step by step. tr(Σ) = E‖g_i − G‖² is the variance of a single sample's "
    "gradient around the true gradient G and |G|² the squared norm of G; both are debiased moving "
    "averages of unbiased per-step estimates, and they are additive over layers. Their ratio, the "
    "noise scale B_simple = tr(Σ)/|G|², is the batch size at which noise and signal are equal; the "
    "shaded band is its 95 % interval, unbounded while the signal is not clearly above the noise."
)
RUN_TEXT = (
    "A monitor run file: tr(Σ), |G|² and B_simple = tr(Σ)/|G|² of every measured step, smoothed "
    "with debiased moving averages and shown with 95 % bands, and the advice computed from its "
    "last measured steps. A run file holds no losses, so there is no loss panel."
)


def _noise_rows(series: NoiseSeries, counts: StepCounts) -> List[Tuple[str, str]]:
    """Key numbers of a run file: its steps (:class:`StepCounts`), and the first, lowest
    and last smoothed ``B_simple`` the verdict quotes (:func:`b_simple_marks`)."""
    b = series.smoothed["b_simple"]
    marks = b_simple_marks(series)
    low, high = series.b_band

    def at(i: Optional[int]) -> str:
        if i is None:
            return f"{fmt_num(None)} (undefined at every step)"
        return f"{fmt_with_interval(b[i], [low[i], high[i]])} at step {fmt_count(series.step[i])}"

    end = len(series.step) - 1
    rows = [
        ("measured steps", counts.text()),
        ("first smoothed B_simple with a bounded 95 % interval", at(marks.first)),
    ]
    if marks.low not in (marks.first, marks.last):
        rows.append(("lowest smoothed B_simple with a bounded 95 % interval", at(marks.low)))
    return rows + [
        ("last smoothed B_simple, 95 % interval", at(marks.last)),
        ("last smoothed tr(Σ)", fmt_num(series.smoothed["trace_cov"][end] if end >= 0 else None)),
        ("last smoothed |G|²", fmt_num(series.smoothed["grad_sq_norm"][end] if end >= 0 else None)),
    ]


def _layer_row(series: NoiseSeries, layer: LayerNoise, plotted: bool) -> Tuple[str, ...]:
    """One layer's cells: its values at its last defined step, or dashes with the reason."""
    where = "plotted" if plotted else ""
    i = last_finite(layer.b_simple)
    if i is None:
        dash = fmt_num(None)
        return (layer.label, dash, dash, f"{dash} ({layer.reason})", dash, dash, where)
    low, high = layer.band
    return (layer.label, fmt_share(layer.share), fmt_count(series.step[i]),
            fmt_with_interval(layer.b_simple[i], [low[i], high[i]]),
            fmt_num(layer.trace_cov[i]), fmt_num(layer.grad_sq_norm[i]), where)


def _layer_table(series: NoiseSeries) -> str:
    """Every layer, largest share of the noise first: its smoothed values at the last
    step where its ``B_simple`` is defined, with the 95 % interval drawn as its band
    (``""`` when there is no layer); a layer without any says why."""
    plotted = {id(layer) for layer in series.plotted}
    rows = [_layer_row(series, layer, id(layer) in plotted) for layer in series.layers]
    if not rows:
        return ""
    header = ("layer (type)", "share of tr(Σ)", "step", "smoothed B_simple, 95 % interval", "smoothed tr(Σ)",
              "smoothed |G|²", "in the plot")
    caption = h.para(f"Every layer at its last measured step, the largest share of the noise first; the "
                     f"per-layer panel draws the {len(series.plotted)} largest, with these 95 % intervals "
                     "(Fieller, from the monitor) as faint bands.")
    return caption + h.table(header, rows)


def _loss(inp: Input) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = inp.of_type("step")
    return (floats([r.get("step") for r in rows]), floats([r.get("loss") for r in rows]),
            floats([r.get("full_loss") for r in rows]))


def _trajectory_part(stem: str, inp: Input) -> Tuple[str, List[Plot]]:
    summary = summary_of(inp)
    parts = [subheading(inp)]
    if inp.run is not None:
        series = noise_series(*inp.run)
    else:
        series = noise_series({}, [])
        parts.append(h.note(f"Noise panels are empty: {inp.note}."))
    plot = noise_figure(series, f"{stem}-trajectory", f"task {task_of(inp)}", loss=_loss(inp))
    parts.append(h.figure(plot))
    pairs = [("run file", fmt_text(inp.run_path.name if inp.run_path is not None else None)),
             ("final loss", fmt_num(summary.get("final_loss")))]
    if inp.run is not None:  # the run file's own numbers, as the verdict quotes them
        pairs += _noise_rows(series, step_counts(inp.run[1]))
    else:  # the study's summary of the run file that is missing
        pairs += [
            (f"first smoothed B_simple with a bounded 95 % interval (step "
             f"{fmt_count(summary.get('b_simple_first_step'))})",
             fmt_with_interval(summary.get("b_simple_first"), summary.get("b_simple_first_interval"))),
            ("last smoothed B_simple, 95 % interval",
             fmt_with_interval(summary.get("b_simple_last"), summary.get("b_simple_interval"))),
        ]
    parts += [h.key_values(pairs), _layer_table(series)]
    return "".join(parts), [plot]


def trajectory_section(items: Items) -> h.Section:
    """Loss and noise over one training run (study ``trajectory``)."""
    return section("trajectory", "Trajectory: noise over training", TRAJECTORY_TEXT, items, _trajectory_part)


def _run_header(header: Dict[str, Any]) -> List[Tuple[str, str]]:
    params = header.get("params") if isinstance(header.get("params"), list) else []
    return [("source", fmt_text(header.get("source"))), ("measured every", fmt_count(header.get("every"))),
            ("EMA decay β", fmt_num(header.get("beta"))), ("parameters", fmt_count(len(params))),
            ("created", fmt_text(header.get("created")))]


def run_section(stem: str, inp: Input, anchor: str) -> h.Section:
    """The noise panels and the advice of one monitor run file."""
    title = f"Run file {inp.path.name}"
    body = [h.para(RUN_TEXT)]
    if not inp.lines:
        body += [h.key_values(_run_header(inp.header)), h.note("The run file has no steps yet.")]
        return h.Section(anchor, title, "".join(body))
    series, counts = noise_series(inp.header, inp.lines), step_counts(inp.lines)
    plot = noise_figure(series, f"{stem}-noise", f"run file {inp.path.name}")
    body += [h.figure(plot), h.key_values(_run_header(inp.header) + _noise_rows(series, counts)),
             _layer_table(series)]
    body.append("<h3>Recommendation</h3>\n" + h.para(
        "Critical batch size from the smoothed B_simple of the last measured step, and the "
        "learning-rate multiplier of each rule for a new batch size B′ (— where a rule is undefined)."))
    try:
        rec = advise(inp.lines)
    except (ValueError, TypeError, KeyError) as e:  # a step without a usable batch_size
        body.append(h.note(f"No recommendation: {e}"))
        return h.Section(anchor, title, "".join(body), [plot])
    text, plots = advice(rec, f"{stem}-rules", f"run file {inp.path.name}", measured=counts.measured)
    body.append(text)
    return h.Section(anchor, title, "".join(body), [plot] + plots)
