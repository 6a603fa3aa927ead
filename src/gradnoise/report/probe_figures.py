"""The figure of a probe file: the branches' held-out loss curves, steps to the target
against batch size with McCandlish's fit, and the loss at the budget against batch size.

Takes the probe file's object as written (numbers possibly ``None``, ``"inf"``) and
returns a :class:`~gradnoise.report.figures.Plot`.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence

import numpy as np
from matplotlib.axes import Axes

from ..stats.fits import frontier
from .figures import (COLORS, Plot, finish, legend, limits, log_axis, log_spaced, new_figure, note_empty,
                      value_ticks, wide_positive, vertical_band)
from .fmt import floats, fmt_count, interval, to_float

Probe = Dict[str, Any]
THIN = 0.9


def batch_sizes(probe: Probe) -> List[float]:
    """The probe's batch sizes, ascending, with any a branch has that the list lacks."""
    sizes = {to_float(b) for b in probe.get("batch_sizes") or []}
    sizes |= {to_float(br.get("batch_size")) for br in probe.get("branches") or []}
    return sorted(b for b in sizes if math.isfinite(b) and b > 0)


def chosen(probe: Probe, reading: str = "mccandlish") -> List[Dict[str, Any]]:
    """The branches behind a reading (``"mccandlish"`` or ``"merrill"``): where the probe
    tried several learning-rate multipliers per batch size (``lr_multiplier`` of each
    branch), those of the multiplier the reading chose (its ``multipliers``,
    ``[[batch_size, multiplier], ...]``); otherwise every branch."""
    part = probe.get(reading) if isinstance(probe.get(reading), dict) else {}
    picks = {to_float(r[0]): to_float(r[1]) for r in part.get("multipliers") or []
             if isinstance(r, list) and len(r) == 2}
    branches = probe.get("branches") or []
    return [br for br in branches if "lr_multiplier" not in br or to_float(br.get("batch_size")) not in picks
            or to_float(br["lr_multiplier"]) == picks[to_float(br.get("batch_size"))]]


def _color(sizes: Sequence[float], b: Any) -> str:
    return COLORS[sizes.index(to_float(b)) % len(COLORS)]


def _curves_panel(ax: Axes, probe: Probe, sizes: List[float]) -> None:
    ax.set(title="Held-out loss along the branches", xlabel="samples since the checkpoint",
           ylabel="held-out loss")
    labelled, shown, calm = set(), [], []
    for br in sorted(chosen(probe), key=lambda br: to_float(br.get("batch_size"))):  # legend in order of B
        rows = np.array([floats(p) for p in br.get("curve") or []]).reshape(-1, 3)
        x, y = rows[:, 0], rows[:, 2]
        keep = np.isfinite(x) & np.isfinite(y)
        b = to_float(br.get("batch_size"))
        if not keep.any() or b not in sizes:
            continue
        color = _color(sizes, b)
        label = None if b in labelled else f"B={fmt_count(b)}"
        labelled.add(b)
        ax.plot(x[keep], y[keep], color=color, linewidth=THIN, alpha=0.8, label=label)
        if br.get("diverged"):
            ax.plot(x[keep][-1:], y[keep][-1:], "x", color=color, markersize=6)
        else:
            calm.append(y[keep])
        shown.append(y[keep])
    if not shown:
        note_empty(ax, "no branch has a loss curve")
        return
    target, budget = to_float(probe.get("target_loss")), to_float(probe.get("budget"))
    if math.isfinite(target):
        ax.axhline(target, color="#555555", linestyle="--", linewidth=1, label="target loss")
    if math.isfinite(budget) and budget > 0:
        ax.axvline(budget, color="#888888", linestyle=":", linewidth=1, label="budget")
    values = calm or shown  # a diverged branch's blow-up would flatten every other curve
    log = wide_positive(values + [[target]])
    if log:
        log_axis(ax, "y")
    ylim = limits(values + [[target]], log=log)
    if ylim is not None:
        ax.set_ylim(*ylim)
    legend(ax, small=True)


def _per_seed(ax: Axes, probe: Probe, reading: str, key: str, label: str) -> np.ndarray:
    """``key`` of every branch behind ``reading`` against its batch size, small grey
    points; the values."""
    branches = chosen(probe, reading)
    b, v = floats([br.get("batch_size") for br in branches]), floats([br.get(key) for br in branches])
    keep = np.isfinite(b) & (b > 0) & np.isfinite(v) & (v > 0)
    ax.scatter(b[keep], v[keep], color="#aaaaaa", s=10, label=label)
    return v[keep]


def _x_axis(ax: Axes, sizes: List[float]) -> None:
    log_axis(ax, "x")
    ax.set_xlim(sizes[0] / 1.6, sizes[-1] * 1.6)
    value_ticks(ax, "x", sizes)


def _steps_panel(ax: Axes, probe: Probe, sizes: List[float]) -> None:
    ax.set(title="Steps to the target loss (McCandlish)", xlabel="batch size B (samples)",
           ylabel="optimizer steps S to the target")
    mc = probe.get("mccandlish") or {}
    seeds = _per_seed(ax, probe, "mccandlish", "steps_to_target", "each seed")
    points = np.array([floats(p) for p in mc.get("points") or []]).reshape(-1, 2)
    keep = np.isfinite(points[:, 0]) & (points[:, 0] > 0) & np.isfinite(points[:, 1]) & (points[:, 1] > 0)
    if not (keep.any() or seeds.size):
        note_empty(ax, "no branch reached the target loss")
        return
    ax.scatter(points[keep, 0], points[keep, 1], color=COLORS[0], zorder=3, label="median over seeds")
    _x_axis(ax, sizes)
    log_axis(ax, "y")
    s_min, b_noise = to_float(mc.get("s_min")), to_float(mc.get("b_noise"))
    shown = [seeds, points[keep, 1]]
    if math.isfinite(s_min) and math.isfinite(b_noise) and s_min > 0 and b_noise > 0:
        grid = log_spaced(*ax.get_xlim())
        fit = frontier(grid, s_min, b_noise)[0]
        ax.plot(grid, fit, color=COLORS[1], label="fit S_min(1 + B_noise/B)")
        ax.axhline(s_min, color="#888888", linestyle=":", linewidth=1, label="S_min")
        shown.append([s_min])
    ylim = limits(shown, log=True)
    if ylim is not None:
        ax.set_ylim(*ylim)
    vertical_band(ax, b_noise, mc.get("interval"), COLORS[1], "branch B_crit (95 % interval)")
    legend(ax, small=True)


def _budget_panel(ax: Axes, probe: Probe, sizes: List[float]) -> None:
    ax.set(title="Loss after the budget (Merrill)", xlabel="batch size B (samples)",
           ylabel="held-out loss at the budget")
    me = probe.get("merrill") or {}
    seeds = _per_seed(ax, probe, "merrill", "loss_at_budget", "each seed")
    rows = me.get("losses") or []
    b, med = floats([r[0] for r in rows]), floats([r[1] for r in rows])
    ivs = np.array([interval(r[2]) for r in rows]).reshape(-1, 2)
    keep = np.isfinite(b) & (b > 0) & np.isfinite(med)
    if not (keep.any() or seeds.size):
        note_empty(ax, "no branch has a loss at the budget")
        return
    err = np.abs(np.vstack([med - ivs[:, 0], ivs[:, 1] - med]))[:, keep]
    ax.errorbar(b[keep], med[keep], yerr=np.nan_to_num(err, posinf=0.0), fmt="o", color=COLORS[0], capsize=3,
                markersize=4, zorder=3, label="median, 95 % interval")
    _x_axis(ax, sizes)
    best = to_float(me.get("best_loss"))
    if math.isfinite(best):
        ax.axhline(best, color="#888888", linestyle=":", linewidth=1, label="best loss")
    ylim = limits([seeds, med[keep], ivs[keep].ravel(), [best]], log=False)
    if ylim is not None:
        ax.set_ylim(*ylim)
    vertical_band(ax, to_float(me.get("b_crit")), me.get("interval"), COLORS[2], "Merrill's b_crit (95 % interval)")
    legend(ax, small=True)


def probe_figure(probe: Probe, name: str, task: str) -> Plot:
    """Three panels: the held-out loss of the branches against samples (one colour per
    batch size, one thin line per seed, × where a branch diverged; with a learning-rate
    grid, the rate McCandlish's reading chose: :func:`chosen`); steps to the target
    against batch size with ``S = S_min (1 + B_noise/B)``; the loss at the budget against
    batch size with Merrill's ``b_crit``; both log in ``B``."""
    fig, (ax, bx, cx) = new_figure(1, 3, width=13.0, row_height=4.2)
    sizes = batch_sizes(probe)
    _curves_panel(ax, probe, sizes)
    if sizes:
        _steps_panel(bx, probe, sizes)
        _budget_panel(cx, probe, sizes)
    else:
        note_empty(bx, "no batch sizes")
        note_empty(cx, "no batch sizes")
    alt = (f"Three panels for the branch probe on task {task}: the held-out loss of each branch against the "
           f"samples it used, one colour per batch size ({', '.join(fmt_count(b) for b in sizes) or '—'}), one "
           "thin line per seed; the steps each batch size took to reach the target loss with McCandlish's fit "
           "S_min(1 + B_noise/B) and the branch critical batch with its interval; and the held-out loss after "
           "the sample budget against batch size with Merrill's critical batch and its interval.")
    return finish(fig, name, alt, "Left: dashed, the target loss; dotted, the budget. Shaded: 95 % intervals.")


__all__ = ["batch_sizes", "chosen", "probe_figure"]
