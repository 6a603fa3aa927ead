"""Sections of the law, critical-batch, lr-batch and recommend studies.

Each ``*_section`` takes the study files of one study as ``(stem, Input)`` pairs —
``stem`` the unique file stem its figures get — and returns one
:class:`~gradnoise.report.html.Section` with a sub-part per file (task).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import html as h
from .figures import Plot
from .files import Input
from .fmt import fmt_count, fmt_lr, fmt_num, fmt_text, fmt_with_interval, fmt_z, to_float
from .heatmap import lr_batch_figure
from .study_figures import critical_figure, law_figure, rules_figure
from .line import anchor

Items = Sequence[Tuple[str, Input]]

LAW_TEXT = (
    "Each point is the mean squared error ‖ĝ_B − ∇J‖² of mini-batch gradients of size B, drawn "
    "without replacement from the N training samples at fixed parameters, with a 95 % error bar "
    "(±1.96 standard errors). The dashed line is the prediction tr(Σ)/B · (N − B)/(N − 1) from the "
    "per-sample covariance trace measured on the full data. Points on the line confirm that the "
    "noise falls as 1/B; the deviations z = (measured − predicted)/s.e. should mostly lie within ±2."
)
CRITICAL_TEXT = (
    "For every batch size B the model was trained at several learning rates until the loss reached "
    "the target; each point is the learning rate that needed the fewest steps. McCandlish et al. "
    "(2018) predict that steps S and examples E = B·S follow (S/S_min − 1)(E/E_min − 1) = 1, that is "
    "S(B) = S_min(1 + B_crit/B) with the critical batch size B_crit = E_min/S_min. Below B_crit a "
    "larger batch saves steps almost for free; above it, it mostly costs examples. If the noise "
    "scale is a good guide, the B_simple measured at the end of the best runs lies near B_crit."
)
LR_BATCH_TEXT = (
    "Final training loss for each (batch size, learning rate) pair of the grid; grey hatched cells "
    "with a cross diverged, lighter hatched cells were not run (counted as diverged), and cells marked "
    "with a dash stayed finite but their loss did not fall. The white line follows the largest "
    "learning rate that did not diverge at each batch size and the stars the rate with the lowest "
    "final loss. Both are fitted with ε(B) = ε_max/(1 + B_noise/B), and both fits are shown: the "
    "dashed curve is the fit to the best rates, the white dotted one the fit to the largest stable "
    "rates. The best step grows linearly with B while B ≪ B_noise and levels off at ε_max beyond it. "
    "The largest stable rate is often set by the curvature of the loss rather than by the gradient "
    "noise, so its fit need not give the noise scale; the fitted B_noise of the best rates is the one "
    "to compare with the B_simple measured at initialisation."
)
RECOMMEND_TEXT = (
    "The noise scale B_simple = tr(Σ)/|G|² of the run's last measured step, smoothed, with its 95 % "
    "interval: the critical batch size at that stage of training (it grows as the loss falls, so it "
    "can exceed a B_crit fitted at an earlier target loss — the verdict at the top compares them). The "
    "table gives the factor to multiply the run's learning rate by when the batch size changes from "
    "the run's B to B′: linear B′/B, square root √(B′/B), and AdaScale (1 + B_simple/B)/(1 + B_simple/B′), "
    "which follows the linear rule well below B_simple and levels off above it. These are factors for "
    "the run's own rate, which was not tuned; the learning rate itself is the lr-batch study's."
)


def run_of(inp: Input) -> str:
    """``"seed 0, size default"`` from a study header (parts it lacks are left out)."""
    parts = [f"{key} {fmt_text(inp.header.get(key))}" for key in ("seed", "size")
             if inp.header.get(key) is not None]
    return ", ".join(parts)


def subheading(inp: Input) -> str:
    """``<h3>`` naming a study file's task, file, seed, size and creation time, with the
    id the verdict links to (:func:`gradnoise.report.verdict.anchor`)."""
    task = fmt_text(inp.header.get("task"))
    created = f"created {fmt_text(inp.header.get('created'))}" if inp.header.get("created") else ""
    where = ", ".join(x for x in (inp.path.name, run_of(inp), created) if x)
    return (f'<h3 id="{h.esc(anchor(fmt_text(inp.study), task))}">Task {h.esc(task)} '
            f'<span class="meta">({h.esc(where)})</span></h3>\n')


def task_of(inp: Input) -> str:
    """The task's name for alt texts."""
    return fmt_text(inp.header.get("task"))


def summary_of(inp: Input) -> Dict[str, Any]:
    """The last ``summary`` line of a study file ({} when it has none yet)."""
    found = inp.of_type("summary")
    return found[-1] if found else {}


def reason_note(summary: Dict[str, Any]) -> str:
    """A note with the summary's ``reason`` (why a fit is missing or doubtful; several
    notes joined by ``"; "`` become a list), or ``""``."""
    reason = summary.get("reason")
    items = [r.strip() for r in reason.split("; ") if r.strip()] if isinstance(reason, str) else []
    if len(items) > 1:
        return h.notes("Notes from the study:", items)
    return h.note(f"Note from the study: {items[0]}") if items else ""


def _law_part(stem: str, inp: Input) -> Tuple[str, List[Plot]]:
    points = inp.of_type("point")
    summary = summary_of(inp)
    parts = [subheading(inp)]
    plots: List[Plot] = []
    if points:
        plots.append(law_figure(points, f"{stem}-law", task_of(inp)))
        parts.append(h.figure(plots[-1]))
    else:
        parts.append(h.note("This file has no measured points yet."))
    if summary:
        parts.append(h.para(
            f"Largest deviation: {fmt_z(summary.get('max_abs_z'))} standard errors at "
            f"B={fmt_count(summary.get('batch_size'))} (checkpoint {fmt_text(summary.get('checkpoint'))}), "
            f"over {fmt_count(summary.get('points'))} points."))
    rows = []
    for c in inp.of_type("checkpoint"):
        t, g = to_float(c.get("trace_cov")), to_float(c.get("grad_sq_norm"))
        b_simple = t / g if math.isfinite(t) and math.isfinite(g) and g > 0 else math.nan
        rows.append((fmt_text(c.get("checkpoint")), fmt_count(c.get("step")), fmt_count(c.get("population")),
                     fmt_num(c.get("loss")), fmt_num(t), fmt_num(g), fmt_num(b_simple)))
    if rows:
        header = ("checkpoint", "step", "samples N", "loss", "tr(Σ)", "|G|²", "B_simple = tr(Σ)/|G|²")
        parts.append(h.table(header, rows))
    return "".join(parts), plots


def law_section(items: Items) -> h.Section:
    """Measured mini-batch gradient error against ``tr(Σ)/B`` (study ``law``)."""
    return section("law", "Law: gradient noise against batch size", LAW_TEXT, items, _law_part)


def _critical_part(stem: str, inp: Input) -> Tuple[str, List[Plot]]:
    summary, best = summary_of(inp), inp.of_type("best")
    plot = critical_figure(inp.of_type("run"), best, summary, f"{stem}-critical-batch", task_of(inp))
    target = summary.get("target_loss", (inp.header.get("config") or {}).get("target_loss"))
    pairs = [
        ("target loss", fmt_num(target)),
        ("S_min (steps)", fmt_num(summary.get("s_min"))),
        ("E_min (examples)", fmt_num(summary.get("e_min"))),
        ("B_crit = E_min/S_min, 95 % interval", _b_crit_text(summary)),
        ("B_simple measured at the end of the best runs, interval",
         fmt_with_interval(summary.get("b_simple"), summary.get("b_simple_interval"))),
        ("best runs usable in the fit", f"{fmt_count(summary.get('points'))} of "
                                          f"{fmt_count(summary.get('runs', len(best)))}"),
    ]
    rows = [(fmt_count(b.get("batch_size")), fmt_count(b.get("seed")), fmt_lr(b.get("lr")),
             fmt_count(b.get("steps")), fmt_count(b.get("examples"))) for b in best]
    body = [subheading(inp), h.figure(plot), h.key_values(pairs), reason_note(summary)]
    if not summary:
        body.append(h.note("This file has no summary line yet (the study did not finish)."))
    if rows:
        body.append(h.table(("batch size", "seed", "learning rate", "steps", "examples"), rows, numeric_from=0))
    return "".join(body), [plot]


def _b_crit_text(summary: Dict[str, Any]) -> str:
    """``B_crit`` with its interval, or "—" and why (the fit's premises failed)."""
    if summary.get("b_crit") is not None:
        return fmt_with_interval(summary.get("b_crit"), summary.get("b_crit_interval"))
    if summary.get("b_crit_bound"):
        return f"— (beyond the sweep: {summary['b_crit_bound']})"
    return "— (no fit: see the notes)"


def critical_section(items: Items) -> h.Section:
    """Steps and examples to a target loss against batch size (study ``critical-batch``)."""
    return section("critical-batch", "Critical batch size", CRITICAL_TEXT, items, _critical_part)


def _fit_table(summary: Dict[str, Any]) -> str:
    """``ε_max``, ``B_noise`` with its interval and the rms log-residual of the fits of
    ``ε(B)`` to the best and to the largest stable learning rates."""
    stable = summary.get("stable_fit") if isinstance(summary.get("stable_fit"), dict) else {}
    fits = (summary, stable)
    rows = [
        ("ε_max (largest useful learning rate)",) + tuple(fmt_lr(f.get("eps_max")) for f in fits),
        ("B_noise, 95 % interval",) + tuple(fmt_with_interval(f.get("b_noise"), f.get("b_noise_interval"))
                                            for f in fits),
        ("rms log-residual of the fit",) + tuple(fmt_num(f.get("rms")) for f in fits),
    ]
    return h.table(("quantity", "fit to the best rate", "fit to the largest stable rate"), rows)


def _lr_batch_part(stem: str, inp: Input) -> Tuple[str, List[Plot]]:
    summary = summary_of(inp)
    plot = lr_batch_figure(inp.of_type("cell"), inp.of_type("stable"), summary, f"{stem}-lr-batch", task_of(inp))
    pairs = [
        ("B_simple measured at initialisation", fmt_num(summary.get("b_simple"))),
        ("points in the fit", fmt_count(summary.get("points"))),
    ]
    stable = [(fmt_count(s.get("batch_size")), fmt_lr(s.get("lr_max")), fmt_lr(s.get("lr_best")),
               fmt_num(s.get("best_loss"))) for s in inp.of_type("stable")]
    body = [subheading(inp), h.figure(plot), _fit_table(summary), h.key_values(pairs), reason_note(summary)]
    if stable:
        header = ("batch size", "largest stable learning rate", "learning rate with the lowest loss", "lowest loss")
        body.append(h.table(header, stable, numeric_from=0))
    return "".join(body), [plot]


def lr_batch_section(items: Items) -> h.Section:
    """The stable learning rate against batch size (study ``lr-batch``)."""
    return section("lr-batch", "Learning rate against batch size", LR_BATCH_TEXT, items, _lr_batch_part)


def rules_table(rules: Sequence[Dict[str, Any]]) -> str:
    """Learning-rate multipliers per target batch size (``"—"`` where a rule is undefined)."""
    rows = [(fmt_count(r.get("to_batch")), fmt_num(r.get("linear")), fmt_num(r.get("sqrt")),
             fmt_num(r.get("adascale"))) for r in rules]
    return h.table(("new batch size B′", "linear", "square root", "AdaScale"), rows, numeric_from=0)


def _advice_steps(defined: Any, measured: Optional[int]) -> str:
    """The steps the advice reads: those with a defined smoothed ``B_simple`` — named as
    such, never as the run's measured steps (:class:`~gradnoise.report.series.StepCounts`)."""
    what = "with a defined smoothed B_simple (the advice reads the last)"
    if measured is None:
        return f"{fmt_count(defined)} {what}"
    return f"{fmt_count(defined)} of the {fmt_count(measured)} measured steps: those {what}"


def advice(rec: Dict[str, Any], stem: str, what: str, run_file: Any = None,
           measured: Optional[int] = None) -> Tuple[str, List[Plot]]:
    """The recommendation's key numbers, its rules table and figure.

    Args:
        rec: a recommend summary line, or :func:`gradnoise.stats.advice.advise`'s dict.
        stem: the figure's file stem.
        what: the run's name for the alt text.
        run_file: the run file's name to show, if any.
        measured: the run file's measured steps, when the page has it.
    """
    pairs = [("batch size B of the run", fmt_count(rec.get("batch_size"))),
             (f"noise scale B_simple at step {fmt_count(rec.get('step'))} (the critical batch size at that "
              "stage), 95 % interval", fmt_with_interval(rec.get("b_crit"), rec.get("b_crit_interval"))),
             ("steps behind this advice", _advice_steps(rec.get("steps"), measured))]
    if run_file is not None:
        pairs.insert(0, ("run file", fmt_text(run_file)))
    parts = [h.key_values(pairs)]
    if rec.get("reason"):
        parts.append(h.note(str(rec["reason"])))
    rules = rec.get("rules") or []
    plots: List[Plot] = []
    if rules:
        parts.append(rules_table(rules))
        plots.append(rules_figure(rules, rec.get("batch_size"), rec.get("b_crit"), stem, what))
        parts.append(h.figure(plots[-1]))
    return "".join(parts), plots


def _recommend_part(stem: str, inp: Input) -> Tuple[str, List[Plot]]:
    summary = summary_of(inp)
    if not summary:
        return subheading(inp) + h.note("This file has no summary line yet."), []
    body, plots = advice(summary, f"{stem}-rules", f"task {task_of(inp)}", summary.get("run_file"))
    return subheading(inp) + body, plots


def recommend_section(items: Items) -> h.Section:
    """Critical batch size and learning-rate rules (study ``recommend``)."""
    return section("recommend", "Recommendation: batch size and learning rate", RECOMMEND_TEXT, items,
                    _recommend_part)


def section(anchor: str, title: str, text: str, items: Items,
            part: Callable[[str, Input], Tuple[str, List[Plot]]]) -> h.Section:
    """A section: the explanation ``text``, then ``part(stem, inp)`` of each study file
    (its HTML and figures)."""
    body, plots = [h.para(text)], []
    for stem, inp in items:
        html_part, part_plots = part(stem, inp)
        body.append(html_part)
        plots += part_plots
    return h.Section(anchor, title, "".join(body), plots)


__all__ = ["advice", "critical_section", "law_section", "lr_batch_section", "reason_note", "recommend_section",
           "rules_table", "run_of", "section", "subheading", "summary_of", "task_of"]
