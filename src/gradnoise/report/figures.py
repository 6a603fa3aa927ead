"""Shared plotting pieces: a figure without pyplot, PNG bytes, bands, limits.

Figures are :class:`matplotlib.figure.Figure` objects drawn by the Agg canvas directly,
so nothing touches pyplot's global figure registry or the process's backend choice.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, LogFormatter, LogLocator, NullLocator
from PIL import Image

from ..formats import interval
from .fmt import fmt_count, fmt_num

DPI = 90
PNG_COLORS = 256
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Plot:
    """One finished figure.

    Attributes:
        name: the file stem it gets in ``figures/`` (unique within a report).
        png: the PNG file's bytes.
        alt: what the image shows, for readers who cannot see it.
        caption: a line printed under it.
    """

    name: str
    png: bytes
    alt: str
    caption: str = ""


def new_figure(nrows: int, ncols: int, width: float = 10.0, row_height: float = 3.6, bottom: float = 0.6
               ) -> Tuple[Figure, List[Axes]]:
    """A figure with an Agg canvas and its ``nrows × ncols`` axes, flattened row-major.

    Margins are fixed in inches, ``bottom`` below the axes (a layout engine would cost
    more than the drawing)."""
    height = row_height * nrows + bottom - 0.6
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    fig.subplots_adjust(left=0.85 / width, right=1 - 0.25 / width, bottom=bottom / height, top=1 - 0.4 / height,
                        wspace=0.32 + 0.08 * ncols, hspace=0.5)
    return fig, [ax for row in axes for ax in row]


def _tick(x: float, pos: object = None) -> str:
    return fmt_num(x, 2)


class _MinorLogLabels(LogFormatter):
    """Minor log ticks labelled, where matplotlib would label them, in plain text."""

    def __call__(self, x: float, pos: object = None) -> str:
        return _tick(x) if super().__call__(x, pos) else ""


def log_axis(ax: Axes, which: str) -> None:
    """Put the ``"x"`` or ``"y"`` axis on a log scale with plain-text tick labels
    (``10``, ``0.01``, ``2×10⁵``: no mathtext, which is slow to lay out) and minor ticks
    at 2 and 5 times the powers of ten only (each tick is a costly artist)."""
    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis.set_major_formatter(FuncFormatter(_tick))
    axis.set_minor_locator(LogLocator(base=10.0, subs=(2.0, 5.0)))
    axis.set_minor_formatter(_MinorLogLabels(labelOnlyBase=False, minor_thresholds=(3, 3)))


def png_bytes(fig: Figure) -> bytes:
    """``fig`` drawn at :data:`DPI` as a PNG of at most :data:`PNG_COLORS` colours.

    A plot has a few line and fill colours plus their anti-aliased edges, so an indexed
    palette loses nothing a reader sees and makes the file about three times smaller
    than matplotlib's RGBA PNG (the page embeds every figure, so this is its weight)."""
    fig.set_dpi(DPI)
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3]
    image = Image.fromarray(np.ascontiguousarray(rgb)).quantize(
        colors=PNG_COLORS, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def finish(fig: Figure, name: str, alt: str, caption: str = "") -> Plot:
    """Render ``fig`` to PNG bytes (:func:`png_bytes`), release it, and wrap the result
    in a :class:`Plot`."""
    png = png_bytes(fig)
    fig.clear()
    return Plot(name, png, alt, caption)


def note_empty(ax: Axes, text: str = "no finite values to plot") -> None:
    """Write ``text`` in the middle of an axes that has nothing to show."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="#666666")


def finite_values(arrays: Iterable[Sequence[float]], positive: bool = False) -> np.ndarray:
    """Every finite value (only those > 0 with ``positive``) of several arrays, flat."""
    parts = [np.asarray(a, dtype=np.float64).ravel() for a in arrays]
    flat = np.concatenate(parts) if parts else np.zeros(0)
    keep = np.isfinite(flat) & ((flat > 0) if positive else True)
    return flat[keep]


def all_positive(arrays: Iterable[Sequence[float]]) -> bool:
    """True when the arrays hold at least one finite value and every finite one is > 0."""
    values = finite_values(arrays)
    return values.size > 0 and bool(np.all(values > 0))


def value_ticks(ax: Axes, which: str, values: Sequence[float], most: int = 12) -> None:
    """Label the ``"x"`` or ``"y"`` axis at exactly the distinct finite positive
    ``values`` (batch sizes, say) when there are at most ``most`` of them."""
    v = finite_values([values], positive=True)
    ticks = np.unique(v)
    if ticks.size == 0 or ticks.size > most:
        return
    axis = ax.xaxis if which == "x" else ax.yaxis
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda x, pos=None: fmt_count(x)))
    axis.set_minor_locator(NullLocator())


def wide_positive(arrays: Iterable[Sequence[float]], min_span: float = 10.0) -> bool:
    """True when the positive finite values span at least ``min_span`` (max/min): a log
    axis then helps; over a narrower range it would show hardly any tick labels."""
    values = finite_values(arrays, positive=True)
    return values.size > 0 and float(values.max()) >= min_span * float(values.min())


def limits(arrays: Iterable[Sequence[float]], log: bool) -> Optional[Tuple[float, float]]:
    """Axis limits that hold every finite value (``> 0`` on a log axis), with a margin;
    None when there is none."""
    values = finite_values(arrays, positive=log)
    if values.size == 0:
        return None
    lo, hi = float(values.min()), float(values.max())
    if log:
        return lo / 1.5, hi * 1.5
    pad = 0.06 * (hi - lo) if hi > lo else max(abs(hi) * 0.1, 1.0)
    return lo - pad, hi + pad


def band(ax: Axes, x: np.ndarray, low: np.ndarray, high: np.ndarray, ylim: Optional[Tuple[float, float]],
         color: str, label: Optional[str] = None, alpha: float = 0.2) -> None:
    """A shaded band between ``low`` and ``high``, their unbounded or (on a log axis)
    non-positive ends clipped to ``ylim``; NaN ends leave a gap."""
    if ylim is None:
        return
    lo = np.clip(np.asarray(low, dtype=np.float64), *ylim)
    hi = np.clip(np.asarray(high, dtype=np.float64), *ylim)
    if not np.any(np.isfinite(lo) & np.isfinite(hi)):
        return
    ax.fill_between(x, lo, hi, where=np.isfinite(lo) & np.isfinite(hi), color=color, alpha=alpha,
                    linewidth=0, label=label)
    ax.set_ylim(*ylim)


def log_spaced(lo: float, hi: float, n: int = 200) -> np.ndarray:
    """``n`` points evenly spaced in log between ``lo`` and ``hi`` (both > 0)."""
    return np.exp(np.linspace(math.log(lo), math.log(hi), n))


def legend(ax: Axes, small: bool = False) -> None:
    """A legend when the axes has more than one labelled artist."""
    handles, labels = ax.get_legend_handles_labels()
    if len(handles) > 1:
        ax.legend(fontsize=7 if small else 8, ncol=2 if small and len(handles) > 5 else 1,
                  framealpha=0.8)


def vertical_band(ax: Axes, value: float, iv: Any, color: str, label: str) -> None:
    """A vertical line at ``value`` with its interval shaded (unbounded ends clipped)."""
    if not (math.isfinite(value) and value > 0):
        return
    ax.axvline(value, color=color, linestyle="--", linewidth=1.2, label=label)
    low, high = interval(iv)
    x0, x1 = ax.get_xlim()
    low = x0 if not math.isfinite(low) or low <= 0 else max(low, x0)
    high = x1 if not math.isfinite(high) else min(high, x1)
    if high > low:
        ax.axvspan(low, high, color=color, alpha=0.12)
    ax.set_xlim(x0, x1)
