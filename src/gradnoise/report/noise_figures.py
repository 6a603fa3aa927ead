"""The noise of a run over its steps: loss, ``tr(Σ)`` and ``|G|²``, ``B_simple`` with its
95 % band, and ``B_simple`` per layer (the trajectory study and monitor run files)."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
from matplotlib.axes import Axes

from .figures import (COLORS, Plot, all_positive, band, finish, legend, limits, log_axis, new_figure,
                      note_empty, wide_positive)
from .series import NoiseSeries

RAW_STYLE = dict(s=6, alpha=0.3, linewidths=0)


def _marks(s: NoiseSeries) -> dict:
    """Markers on the lines of a run with few steps (a line through one point draws nothing)."""
    return {"marker": "o", "markersize": 4} if len(s.step) < 5 else {}
Loss = Tuple[np.ndarray, np.ndarray, np.ndarray]  # step, batch loss, full-data loss


def _loss_panel(ax: Axes, loss: Loss) -> None:
    step, batch, full = loss
    values = [batch, full]
    if not np.isfinite(batch).any() and not np.isfinite(full).any():
        note_empty(ax)
    ax.plot(step, batch, color=COLORS[0], alpha=0.5, linewidth=0.8, label="batch loss")
    has_full = np.isfinite(full)
    if has_full.any():
        ax.plot(step[has_full], full[has_full], "o-", color=COLORS[1], markersize=3, label="full-data loss")
    if all_positive(values) and wide_positive(values, 20.0):
        log_axis(ax, "y")
    ax.set(title="Training loss", xlabel="optimizer step", ylabel="loss")
    legend(ax)


def _trace_panel(ax: Axes, s: NoiseSeries) -> None:
    series = (("trace_cov", "tr(Σ)", COLORS[0]), ("grad_sq_norm", "|G|²", COLORS[1]))
    shown = [s.smoothed[k] for k, _, _ in series] + [s.raw[k] for k, _, _ in series]
    log = wide_positive(shown)
    ylim = limits(shown + [b for k, _, _ in series for b in s.bands.get(k, ())] if not log else shown, log=log)
    ax.set(title="Noise tr(Σ) and signal |G|²" + (" (log scale)" if log else ""), xlabel="optimizer step",
           ylabel="squared gradient norm")
    if ylim is None:
        note_empty(ax)
        return
    for key, label, color in series:
        raw, smooth = s.raw[key], s.smoothed[key]
        keep = np.isfinite(raw) & ((raw > 0) if log else True)
        ax.scatter(s.step[keep], raw[keep], color=color, **RAW_STYLE)
        ax.plot(s.step, np.where(smooth > 0, smooth, np.nan) if log else smooth, color=color,
                linewidth=1.5, label=f"{label} smoothed", **_marks(s))
        if key in s.bands:
            band(ax, s.step, *s.bands[key], ylim, color)
    if log:
        log_axis(ax, "y")
    ax.set_ylim(*ylim)
    legend(ax)


def _b_simple_panel(ax: Axes, s: NoiseSeries) -> None:
    smooth, raw = s.smoothed["b_simple"], s.raw["b_simple"]
    finite_band = [np.where(np.isfinite(v), v, np.nan) for v in s.b_band]
    log = all_positive([smooth]) and wide_positive([smooth] + finite_band)
    ylim = limits([smooth] + finite_band, log=log) or limits([raw], log=False)
    ax.set(title="Noise scale B_simple = tr(Σ)/|G|²", xlabel="optimizer step", ylabel="B_simple (samples)")
    if ylim is None:
        note_empty(ax, "B_simple undefined at every step")
        return
    keep = np.isfinite(raw) & ((raw > 0) if log else True)
    ax.scatter(s.step[keep], raw[keep], color=COLORS[2], label="raw (one step)", **RAW_STYLE)
    ax.plot(s.step, smooth, color=COLORS[2], linewidth=1.5, label="smoothed", **_marks(s))
    band(ax, s.step, s.b_band[0], s.b_band[1], ylim, COLORS[2], label="95 % interval")
    if log:
        log_axis(ax, "y")
    ax.set_ylim(*ylim)
    legend(ax)


def _layer_limits(lines, bands, log: bool):
    """Axis limits that hold every layer's line and, within a margin of the lines'
    range (×10 on a log axis, one span on a linear one), the finite ends of its band."""
    inner = limits(lines, log=log)
    outer = limits(lines + [np.where(np.isfinite(b), b, np.nan) for b in bands], log=log)
    if inner is None or outer is None:
        return inner
    lo, hi = inner
    reach = (lo / 10, hi * 10) if log else (lo - (hi - lo), hi + (hi - lo))
    return max(outer[0], reach[0]), min(outer[1], reach[1])


def _layer_panel(ax: Axes, s: NoiseSeries) -> None:
    shown = s.plotted
    title = "B_simple per layer, 95 % bands"
    if len(s.layers) > len(shown):
        title = f"B_simple of the {len(shown)} noisiest of {len(s.layers)} layers"
    ax.set(title=title, xlabel="optimizer step", ylabel="B_simple (samples)")
    values = [layer.b_simple for layer in shown]
    if not values or not any(np.isfinite(v).any() for v in values):
        note_empty(ax, "no per-layer values")
        return
    log = all_positive(values) and wide_positive(values)
    ylim = _layer_limits(values, [b for layer in shown for b in layer.band], log)
    for i, layer in enumerate(shown):
        color = COLORS[i % len(COLORS)]
        ax.plot(s.step, layer.b_simple, color=color, linewidth=1.1, label=layer.label, **_marks(s))
        low, high = layer.band  # unbounded steps get no band: overlapping fills to the top said nothing
        band(ax, s.step, low, np.where(np.isfinite(high), high, np.nan), ylim, color, alpha=0.10)
    if log:
        log_axis(ax, "y")
    ax.set_ylim(*ylim)
    legend(ax, small=True)


def noise_figure(series: NoiseSeries, name: str, what: str, loss: Optional[Loss] = None) -> Plot:
    """The panels of a run over its steps, with the loss panel first when ``loss`` is given.

    Args:
        series: the run file's arrays.
        name: the PNG's file stem.
        what: the run's name for the alt text (task or file name).
        loss: ``(step, batch_loss, full_loss)``, each of shape ``[n]``, or None.
    """
    nrows, ncols = (2, 2) if loss is not None else (1, 3)
    fig, axes = new_figure(nrows, ncols, width=11.0 if loss is not None else 13.0, row_height=3.6)
    panels = list(axes)
    if loss is not None:
        _loss_panel(panels.pop(0), loss)
    _trace_panel(panels[0], series)
    _b_simple_panel(panels[1], series)
    _layer_panel(panels[2], series)
    shown = "training loss, " if loss is not None else ""
    alt = (f"Panels for {what} against optimizer step: {shown}smoothed tr(Σ) and |G|² with 95 % bands "
           f"and faint raw points, smoothed B_simple with its 95 % interval as a shaded band, and "
           f"smoothed B_simple of the {len(series.plotted)} layers with the largest share of the noise, each "
           "with its 95 % interval as a faint band of its colour.")
    caption = ("Lines: smoothed values; faint points: single steps (non-positive raw values are "
               "off the log scales); shading: 95 % intervals — unbounded ends clipped to the plot for the "
               "total, left out for single layers (see the table).")
    return finish(fig, name, alt, caption)
