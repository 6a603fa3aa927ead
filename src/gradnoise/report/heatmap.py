"""The lr-batch study's figure: final loss over the (batch size, learning rate) grid.

Cells sit at integer positions of two categorical axes whose values are log-spaced, so a
continuous quantity (the largest stable learning rate, the fit
``ε(B) = ε_max/(1 + B_noise/B)``) is placed by interpolating its logarithm between the
grid values (and extrapolating along the end segments).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm, Normalize
from matplotlib.patches import Patch, Rectangle
from matplotlib.patheffects import withStroke

from ..stats.rules import optimal_lr
from .figures import Plot, finish, log_spaced, new_figure, note_empty
from .fmt import fmt_count, fmt_num, to_float

Lines = Sequence[Dict[str, Any]]
DIVERGED_COLOR = "#d9d9d9"
NOT_RUN_COLOR = "#f2f2f2"
RAN, DIVERGED, NOT_RUN, NO_PROGRESS = 0, 1, 2, 3


def log_index(values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Fractional positions of ``values`` on a sorted grid of positive values, linear
    in the logarithm between neighbours; NaN for values ≤ 0 (or off a one-point grid)."""
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        lv = np.where(values > 0, np.log(values), np.nan)
    lg = np.log(grid)
    if lg.size == 1:
        return np.where(np.isclose(lv, lg[0]), 0.0, np.nan)
    idx = np.interp(lv, lg, np.arange(lg.size, dtype=np.float64))
    lo_slope = 1.0 / (lg[1] - lg[0])
    hi_slope = 1.0 / (lg[-1] - lg[-2])
    idx = np.where(lv < lg[0], (lv - lg[0]) * lo_slope, idx)
    idx = np.where(lv > lg[-1], lg.size - 1 + (lv - lg[-1]) * hi_slope, idx)
    return np.where(np.isfinite(lv), idx, np.nan)


def _grid(cells: Lines) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(batch_sizes [nb], lrs [nl], loss [nl, nb], status [nl, nb])``: ``status`` is
    :data:`RAN`, :data:`DIVERGED`, :data:`NOT_RUN` or :data:`NO_PROGRESS` (a cell
    without ``no_progress``, from an older file, counts as :data:`RAN`); loss is NaN
    where a cell did not give a final loss or is absent."""
    def positive(key: str) -> np.ndarray:
        vals = {to_float(c.get(key)) for c in cells}
        return np.array(sorted(v for v in vals if math.isfinite(v) and v > 0), dtype=np.float64)

    bs, lrs = positive("batch_size"), positive("lr")
    loss = np.full((lrs.size, bs.size), np.nan)
    status = np.full((lrs.size, bs.size), RAN)
    for c in cells:
        b, lr = to_float(c.get("batch_size")), to_float(c.get("lr"))
        j, i = np.flatnonzero(bs == b), np.flatnonzero(lrs == lr)
        if not (j.size and i.size):
            continue
        if c.get("skipped"):
            status[i[0], j[0]] = NOT_RUN
        elif c.get("diverged"):
            status[i[0], j[0]] = DIVERGED
        else:
            loss[i[0], j[0]] = to_float(c.get("final_loss"))
            if c.get("no_progress"):
                status[i[0], j[0]] = NO_PROGRESS
    return bs, lrs, loss, status


def _mark_cells(ax: Axes, status: np.ndarray) -> List[Any]:
    """Grey hatched cells with a red × where the run diverged, lighter hatched cells
    where it was not run, a dash (over the loss colour) where the loss did not fall;
    returns the legend handles of the patches (the dash is labelled on the axes)."""
    styles = {DIVERGED: (DIVERGED_COLOR, "xx", "diverged"),
              NOT_RUN: (NOT_RUN_COLOR, "//", "not run (counted as diverged)")}
    handles: List[Any] = []
    for code, (color, hatch, label) in styles.items():
        cells = list(zip(*np.nonzero(status == code)))
        for i, j in cells:
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=color, hatch=hatch, edgecolor="#999999"))
            if code == DIVERGED:
                ax.text(j, i, "×", ha="center", va="center", color="#b00020", fontsize=14, fontweight="bold")
        if cells:
            handles.append(Patch(facecolor=color, hatch=hatch, edgecolor="#999999", label=label))
    stuck = np.nonzero(status == NO_PROGRESS)
    if stuck[0].size:
        ax.plot(stuck[1], stuck[0], linestyle="none", marker="_", markersize=13, markeredgewidth=2.5,
                color="black", path_effects=[withStroke(linewidth=5, foreground="white")],
                label="no progress (loss did not fall)")
    return handles


def _norm(loss: np.ndarray) -> Normalize:
    finite = loss[np.isfinite(loss)]
    if finite.size == 0:
        return Normalize(0.0, 1.0)
    lo, hi = float(finite.min()), float(finite.max())
    if lo > 0 and hi / lo > 10:
        return LogNorm(lo, hi)
    return Normalize(lo, hi if hi > lo else lo + 1.0)


def _fit_curve(ax: Axes, bs: np.ndarray, lrs: np.ndarray, fit: Any, label: str, **style: Any) -> None:
    """The fitted ``ε(B) = ε_max/(1 + B_noise/B)`` of a fit dict, where it is inside the grid."""
    fit = fit if isinstance(fit, dict) else {}
    eps_max, b_noise = to_float(fit.get("eps_max")), to_float(fit.get("b_noise"))
    if not (math.isfinite(eps_max) and eps_max > 0 and math.isfinite(b_noise) and b_noise >= 0):
        return
    grid_b = log_spaced(float(bs[0]), float(bs[-1])) if bs[-1] > bs[0] else bs
    eps = np.array([optimal_lr(float(b), eps_max, b_noise) for b in grid_b])  # the law, from stats.rules
    fx, fy = log_index(grid_b, bs), log_index(eps, lrs)
    inside = np.isfinite(fx) & np.isfinite(fy) & (fy >= -0.5) & (fy <= lrs.size - 0.5)
    if inside.any():
        ax.plot(fx[inside], fy[inside], linewidth=2, label=label, **style)


def _overlays(ax: Axes, bs: np.ndarray, lrs: np.ndarray, stable: Lines, summary: Dict[str, Any]) -> None:
    """The largest stable learning rate and the best one per batch size, and ``ε(B)``
    fitted to each."""
    sb = np.array([to_float(s.get("batch_size")) for s in stable], dtype=np.float64)
    sl = np.array([to_float(s.get("lr_max")) for s in stable], dtype=np.float64)
    x, y = log_index(sb, bs), log_index(sl, lrs)
    keep = np.isfinite(x) & np.isfinite(y)
    order = np.argsort(x[keep])
    if keep.any():
        ax.plot(x[keep][order], y[keep][order], "o-", color="white", markeredgecolor="black",
                linewidth=1.5, label="largest stable learning rate")
    best = log_index(np.array([to_float(s.get("lr_best")) for s in stable], dtype=np.float64), lrs)
    keep = np.isfinite(x) & np.isfinite(best)
    if keep.any():
        ax.plot(x[keep], best[keep], "*", color="#ffb000", markeredgecolor="black", markersize=12,
                linestyle="none", label="lowest final loss")
    _fit_curve(ax, bs, lrs, summary, "fit ε_max/(1 + B_noise/B) to the best rate", linestyle="--",
               color="#ff4fa0")
    _fit_curve(ax, bs, lrs, summary.get("stable_fit"), "fit to the largest stable rate", linestyle=":",
               color="white", path_effects=[withStroke(linewidth=3.5, foreground="black")])


def lr_batch_figure(cells: Lines, stable: Lines, summary: Dict[str, Any], name: str, task: str) -> Plot:
    """Heat map of the final loss (batch size on x, learning rate on y, both categorical
    and log-spaced), diverged cells grey and hatched with an ×, cells not run lighter,
    cells whose loss did not fall marked with a dash; on top the largest stable learning
    rate per batch size (line), the one with the lowest final loss (stars) and ``ε(B)``
    fitted to each (dashed: best rate; dotted: largest stable rate)."""
    fig, (ax,) = new_figure(1, 1, width=8.0, row_height=5.0, bottom=1.45)
    bs, lrs, loss, status = _grid(cells)
    ax.set(title="Final loss over batch size and learning rate", xlabel="batch size B (samples)",
           ylabel="learning rate ε")
    if bs.size == 0 or lrs.size == 0:
        note_empty(ax, "no cells to plot")
        return finish(fig, name, f"Empty heat map for task {task}: the file has no cells.")
    image = ax.imshow(np.ma.masked_invalid(loss), origin="lower", aspect="auto", cmap="viridis",
                      norm=_norm(loss), interpolation="nearest")
    if np.isfinite(loss).any():
        fig.colorbar(image, ax=ax, label="final training loss")
    handles = _mark_cells(ax, status)
    _overlays(ax, bs, lrs, stable, summary)
    ax.set_xticks(range(bs.size), [fmt_count(b) for b in bs])
    ax.set_yticks(range(lrs.size), [fmt_num(lr) for lr in lrs])
    ax.set_xlim(-0.5, bs.size - 0.5)
    ax.set_ylim(-0.5, lrs.size - 0.5)
    handles = ax.get_legend_handles_labels()[0] + handles
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2,
                  frameon=False)
    alt = (f"Heat map for task {task}: final training loss for {bs.size} batch sizes (x) and {lrs.size} "
           f"learning rates (y), {int((status == DIVERGED).sum())} diverged cells grey with a cross, "
           f"{int((status == NOT_RUN).sum())} cells not run and {int((status == NO_PROGRESS).sum())} cells "
           "without progress marked with a dash, with the largest stable and the best learning rate per "
           "batch size and the curves ε(B) fitted to each drawn on top.")
    return finish(fig, name, alt, "Both axes are categorical with log-spaced values.")
