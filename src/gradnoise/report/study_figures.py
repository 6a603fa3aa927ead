"""Figures of the law and critical-batch studies and of learning-rate rules.

Every function takes the lines of a study file as written (numbers possibly ``None``,
``"inf"``) and returns a :class:`~gradnoise.report.figures.Plot`.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence

import numpy as np
from matplotlib.axes import Axes

from ..stats.fits import frontier
from ..stats.smoothing import Z95
from .figures import (COLORS, Plot, finish, legend, limits, log_axis, log_spaced, new_figure, note_empty,
                      value_ticks, vertical_band)
from .fmt import floats, fmt_count, interval, to_float

Lines = Sequence[Dict[str, Any]]


def _column(lines: Lines, key: str) -> np.ndarray:
    return floats([ln.get(key) for ln in lines])


def _checkpoints(points: Lines) -> List[str]:
    names: List[str] = []
    for p in points:
        name = str(p.get("checkpoint"))
        if name not in names:
            names.append(name)
    return names


def _law_panel(ax: Axes, points: Lines, names: List[str]) -> None:
    shown = []
    for i, name in enumerate(names):
        pts = sorted((p for p in points if str(p.get("checkpoint")) == name),
                     key=lambda p: to_float(p.get("batch_size")))
        b, mse, se, pred = (_column(pts, k) for k in ("batch_size", "mse", "mse_se", "predicted"))
        err = Z95 * np.where(np.isfinite(se), se, 0.0)
        keep = np.isfinite(b) & (b > 0) & np.isfinite(mse) & (mse > 0)
        color = COLORS[i % len(COLORS)]
        ax.errorbar(b[keep], mse[keep], yerr=err[keep], fmt="o", color=color, markersize=4, capsize=3,
                    label=f"{name}: measured ±1.96 s.e.")
        line = np.isfinite(b) & (b > 0) & np.isfinite(pred) & (pred > 0)
        ax.plot(b[line], pred[line], "--", color=color, label=f"{name}: predicted")
        shown += [mse[keep], pred[line], (mse + err)[keep], (mse - err)[keep]]
    ylim = limits(shown, log=True)
    if ylim is None:
        note_empty(ax, "no positive values to plot")
    else:
        log_axis(ax, "x")
        log_axis(ax, "y")
        ax.set_ylim(*ylim)
        value_ticks(ax, "x", _column(points, "batch_size"))
    ax.set(title=r"Mini-batch gradient error vs batch size", xlabel="batch size B (samples)",
           ylabel="‖ĝ_B − ∇J‖²")
    legend(ax, small=True)


def _z_panel(ax: Axes, points: Lines, names: List[str]) -> None:
    b_all = _column(points, "batch_size")
    for i, name in enumerate(names):
        pts = [p for p in points if str(p.get("checkpoint")) == name]
        b, z = _column(pts, "batch_size"), _column(pts, "z")
        keep = np.isfinite(b) & (b > 0) & np.isfinite(z)
        ax.plot(b[keep], z[keep], "o", color=COLORS[i % len(COLORS)], markersize=4, label=name)
    ax.axhspan(-Z95, Z95, color="#999999", alpha=0.15, label="|z| < 1.96")
    ax.axhline(0.0, color="#666666", linewidth=0.8)
    if np.any(np.isfinite(b_all) & (b_all > 0)):
        log_axis(ax, "x")
        value_ticks(ax, "x", b_all)
    ax.set(title="Deviation from the prediction", xlabel="batch size B (samples)",
           ylabel="z = (measured − predicted) / s.e.")
    legend(ax, small=True)


def law_figure(points: Lines, name: str, task: str) -> Plot:
    """Measured ``E||ĝ_B − ∇J||²`` with ±1.96 s.e. and the prediction
    ``tr(Σ)/B·(N − B)/(N − 1)``, log-log, one colour per checkpoint; beside it the
    standardised deviations ``z``."""
    fig, (ax, az) = new_figure(1, 2, width=11.0, row_height=4.0)
    names = _checkpoints(points)
    _law_panel(ax, points, names)
    _z_panel(az, points, names)
    alt = (f"Log-log plot for task {task}: measured mini-batch gradient error with 95 % error bars "
           f"and the predicted tr(Σ)/B line against batch size, for checkpoints {', '.join(names) or '—'}; "
           "right, the deviations in standard errors.")
    return finish(fig, name, alt, "Points: Monte-Carlo means; dashed: the prediction from tr(Σ).")


def _frontier_panel(ax: Axes, best: Lines, summary: Dict[str, Any]) -> None:
    steps, examples, b = (_column(best, k) for k in ("steps", "examples", "batch_size"))
    keep = np.isfinite(steps) & (steps > 0) & np.isfinite(examples) & (examples > 0)
    ax.set(title="Steps–examples frontier", xlabel="optimizer steps S to the target",
           ylabel="training examples E to the target")
    if not keep.any():
        note_empty(ax, "no run reached the target loss")
        return
    ax.scatter(steps[keep], examples[keep], color=COLORS[0], zorder=3, label="fewest steps per batch size (each seed)")
    for k, bs in enumerate(sorted(set(b[keep].tolist()))):  # one label per batch size, however many seeds
        at = keep & (b == bs)
        centre = (float(np.exp(np.log(steps[at]).mean())), float(np.exp(np.log(examples[at]).mean())))
        ax.annotate(f"B={fmt_count(bs)}", centre, textcoords="offset points", xytext=(6, 5 if k % 2 else -11),
                    fontsize=7)
    s_min, e_min = to_float(summary.get("s_min")), to_float(summary.get("e_min"))
    if math.isfinite(s_min) and math.isfinite(e_min) and s_min > 0 and e_min > 0:
        u = log_spaced(1e-2, max(float(steps[keep].max()) / s_min * 2.0, 2.0) - 1.0 + 1e-2)  # u = B_crit/B
        b_crit = e_min / s_min
        ax.plot(*frontier(b_crit / u, s_min, b_crit), color=COLORS[1], label="fit (S/S_min − 1)(E/E_min − 1) = 1")
        ax.axvline(s_min, color="#888888", linestyle=":", linewidth=1, label="S_min, E_min")
        ax.axhline(e_min, color="#888888", linestyle=":", linewidth=1)
    log_axis(ax, "x")
    log_axis(ax, "y")
    ylim = limits([examples[keep]], log=True)
    ax.set_ylim(ylim[0] / 2, ylim[1] * 2)
    legend(ax, small=True)


def _steps_panel(ax: Axes, runs: Lines, best: Lines, summary: Dict[str, Any]) -> None:
    ax.set(title="Steps to the target vs batch size", xlabel="batch size B (samples)",
           ylabel="optimizer steps S to the target")
    b, steps = _column(best, "batch_size"), _column(best, "steps")
    keep = np.isfinite(b) & (b > 0) & np.isfinite(steps) & (steps > 0)
    if not keep.any():
        note_empty(ax, "no run reached the target loss")
        return
    rb, rs = _column(runs, "batch_size"), _column(runs, "steps")
    other = np.isfinite(rb) & (rb > 0) & np.isfinite(rs) & (rs > 0)
    ax.scatter(rb[other], rs[other], color="#bbbbbb", s=12, label="other learning rates")
    ax.scatter(b[keep], steps[keep], color=COLORS[0], zorder=3, label="fewest steps")
    log_axis(ax, "x")
    log_axis(ax, "y")
    grid = log_spaced(float(b[keep].min()) / 2, float(b[keep].max()) * 2)
    s_min, b_crit = to_float(summary.get("s_min")), to_float(summary.get("b_crit"))
    if math.isfinite(s_min) and math.isfinite(b_crit) and s_min > 0 and b_crit > 0:
        ax.plot(grid, frontier(grid, s_min, b_crit)[0], color=COLORS[1], label="fit S_min(1 + B_crit/B)")
    ax.set_xlim(grid[0], grid[-1])
    value_ticks(ax, "x", b[keep])
    vertical_band(ax, b_crit, summary.get("b_crit_interval"), COLORS[1], "B_crit (95 % interval)")
    vertical_band(ax, to_float(summary.get("b_simple")), summary.get("b_simple_interval"), COLORS[2],
              "measured B_simple (range over runs)")
    legend(ax, small=True)


def critical_figure(runs: Lines, best: Lines, summary: Dict[str, Any], name: str, task: str) -> Plot:
    """The steps–examples frontier with the fitted hyperbola, and steps to the target
    against batch size with ``S(B) = S_min(1 + B_crit/B)``, both log-log."""
    fig, (ax, bx) = new_figure(1, 2, width=11.0, row_height=4.2)
    _frontier_panel(ax, best, summary)
    _steps_panel(bx, runs, best, summary)
    alt = (f"Two log-log panels for task {task}: examples against steps to the target loss for the "
           "best learning rate of each batch size, annotated with B, with the fitted hyperbola; and "
           "steps to the target against batch size with the fit S_min(1 + B_crit/B) and the "
           "critical and measured noise batch sizes marked with their intervals.")
    return finish(fig, name, alt, "Shaded: 95 % intervals; dotted: the asymptotes S_min and E_min.")


# The rules as the recommendation's text writes them: AdaScale's gain uses the measured
# noise scale B_simple (:func:`gradnoise.stats.advice.advise`), not the fitted B_noise of lr-batch.
RULE_LABELS = (("linear", "linear  B′/B"), ("sqrt", "square root  √(B′/B)"),
               ("adascale", "AdaScale  (1 + B_simple/B)/(1 + B_simple/B′)"))


def rules_figure(rules: Lines, batch_size: Any, b_simple: Any, name: str, what: str) -> Plot:
    """Learning-rate multipliers of the linear, square-root and AdaScale rules against the
    new batch size, log-log; every rule passes through 1 at ``batch_size``; a dotted line
    marks the noise scale ``b_simple`` the AdaScale gain uses."""
    fig, (ax,) = new_figure(1, 1, width=6.0, row_height=4.0)
    b0 = to_float(batch_size)
    rows = sorted(rules, key=lambda r: to_float(r.get("to_batch")))
    to = _column(rows, "to_batch")
    shown = []
    for i, (key, label) in enumerate(RULE_LABELS):
        y = _column(rows, key)
        x, y = np.append(to, b0), np.append(y, 1.0)
        keep = np.isfinite(x) & (x > 0) & np.isfinite(y) & (y > 0)
        order = np.argsort(x[keep])
        if np.count_nonzero(keep) > 1:
            ax.plot(x[keep][order], y[keep][order], "o-", color=COLORS[i], markersize=4, label=label)
            shown.append(y[keep])
    ax.set(title=f"Learning-rate multiplier from B={fmt_count(b0)}", xlabel="new batch size B′ (samples)",
           ylabel="learning-rate multiplier")
    if not shown:
        note_empty(ax)
    else:
        log_axis(ax, "x")
        log_axis(ax, "y")
        value_ticks(ax, "x", np.append(to, b0))
        bc = to_float(b_simple)
        if math.isfinite(bc) and bc > 0:
            ax.axvline(bc, color="#888888", linestyle=":", label="noise scale B_simple")
    legend(ax, small=True)
    alt = (f"Log-log plot for {what}: the learning-rate multiplier of the linear, square-root and "
           f"AdaScale rules ({'; '.join(label for _, label in RULE_LABELS)}) against the new batch size, "
           f"starting from batch size {fmt_count(b0)}.")
    return finish(fig, name, alt)

