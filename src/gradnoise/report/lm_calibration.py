"""The ``lm`` study's branch probes: the critical batch measured by branching at
checkpoints of the run, beside the noise scales that are cheap to measure (raw,
AdamW-preconditioned, LayerNorm-only ``B_simple``) — does the proxy track it, and by
what factor? Rows are the summary's ``calibration.points``, each value ``[v, low, high]``."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import html as h
from .figures import COLORS, Plot, finish, legend, limits, log_axis, new_figure, note_empty
from .fmt import fmt_count, fmt_factor_interval, fmt_num, fmt_with_interval

SERIES = (("b_crit", "branch B_crit (McCandlish)"), ("b_simple", "B_simple, raw"),
          ("preconditioned", "B_simple, AdamW-preconditioned"), ("ln_b_simple", "B_simple, LayerNorm only"))


def _col(rows: Sequence[Dict[str, Any]], key: str) -> np.ndarray:
    """``[n, 3]`` values and interval ends (NaN where undefined)."""
    return np.array([[np.nan if v is None else float(v) for v in (r.get(key) or [None] * 3)] for r in rows],
                    dtype=float).reshape(-1, 3)


def calibration_figure(rows: Sequence[Dict[str, Any]], name: str, task: str) -> Plot:
    """Each series against the held-out loss at the probed checkpoints, with 95 % error bars
    (unbounded ends drawn to the axis)."""
    fig, (ax,) = new_figure(1, 1, width=8.0, row_height=4.2)
    loss = np.array([np.nan if r.get("loss") is None else r["loss"] for r in rows], dtype=float)
    cols = {k: _col(rows, k) for k, _ in SERIES}
    ylim = limits([c[:, 0] for c in cols.values()], log=True)
    if ylim is None:
        note_empty(ax)
    else:
        for i, (key, label) in enumerate(SERIES):
            v, lo, hi = cols[key].T
            ok = np.isfinite(v) & (v > 0)
            if not ok.any():
                continue
            low = np.clip(np.where(np.isfinite(lo), lo, ylim[0]), ylim[0], None)
            high = np.clip(np.where(np.isfinite(hi), hi, ylim[1]), None, ylim[1])
            x = loss * (1 + 0.004 * (i - 1.5))  # side by side at one checkpoint
            ax.errorbar(x[ok], v[ok], yerr=[np.maximum(v - low, 0)[ok], np.maximum(high - v, 0)[ok]],
                        color=COLORS[i], marker="os^v"[i], linestyle="-" if key == "b_crit" else ":", capsize=3,
                        label=label)
        log_axis(ax, "y")
        ax.set_ylim(*ylim)
        ax.invert_xaxis()
    ax.set(title="Measured critical batch and its proxies", xlabel="held-out loss (falling →)",
           ylabel="batch size (sequences)")
    legend(ax)
    alt = (f"A chart for task {task}: at each probed checkpoint, the critical batch measured by branching and the "
           "raw, preconditioned and LayerNorm-only noise scales, with 95 % intervals, against the held-out loss.")
    return finish(fig, name, alt, "Markers: values at the probed checkpoints; bars: 95 % intervals (drawn to the "
                                  "axis where unbounded).")


def calibration_table(rows: Sequence[Dict[str, Any]]) -> str:
    out = []
    for r in rows:
        def iv(key: str) -> str:
            v = r.get(key) or [None] * 3
            return fmt_with_interval(v[0], v[1:])
        ratio = r.get("ratio") or [None] * 3
        out.append((fmt_count(r.get("step")), fmt_num(r.get("loss")), iv("b_crit"), iv("merrill"), iv("b_simple"),
                    iv("preconditioned"), iv("ln_b_simple"), fmt_factor_interval(ratio[0], ratio[1:]),
                    f"{fmt_num(r.get('seconds'))} s"))
    return h.table(("step", "held-out loss", "branch B_crit", "Merrill's B_crit", "B_simple raw",
                    "B_simple preconditioned", "B_simple LayerNorm", "B_crit / B_simple", "probe time"), out)


def calibration_text(summary: Dict[str, Any]) -> Optional[str]:
    """One sentence: the measured critical batch at the last probe and its factor to the raw
    noise scale (None without probes)."""
    last = (summary.get("calibration") or {}).get("last")
    if not last or (last.get("b_crit") or [None])[0] is None:
        return None
    b, ratio = last["b_crit"], last.get("ratio") or [None] * 3
    text = (f"Branches at step {fmt_count(last['step'])} measured the critical batch at "
            f"{fmt_with_interval(b[0], b[1:])} sequences")
    if ratio[0] is not None:
        text += f", {fmt_factor_interval(ratio[0], ratio[1:])} the raw B_simple at the same weights"
    return text + "."


def calibration_part(summary: Dict[str, Any], stem: str, task: str) -> Tuple[str, List[Plot]]:
    """The section's part on the probes (empty without them)."""
    rows = (summary.get("calibration") or {}).get("points") or []
    if not rows:
        return "", []
    plot = calibration_figure(rows, f"{stem}-lm-calibration", task)
    text = calibration_text(summary)
    return (h.figure(plot) + calibration_table(rows) + (h.para(text) if text else "")), [plot]


__all__ = ["calibration_figure", "calibration_part", "calibration_table", "calibration_text"]
