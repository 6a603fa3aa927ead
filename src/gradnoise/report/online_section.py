"""Section of the ``online`` study: accuracy on the current and the earlier classes of a
drifting stream over time, the noise of each update measured at the current weights
from a sliding window, and the final forgetting of each method.

Over seeds, a checkpoint's accuracy is the mean with a 95 % t-interval (clipped to
[0, 1]); a ratio (B_simple, noise-to-signal) is the ratio of the seed means of its
numerator and denominator (DESIGN.md §1: never a mean of noisy ratios)."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..stats.intervals import mean_interval
from . import html as h
from .figures import COLORS, Plot, band, finish, legend, log_axis, new_figure, note_empty
from .files import Input
from .fmt import DASH, domain_interval, fmt_count, fmt_num, fmt_with_interval, to_float
from .sections import section, subheading, summary_of, task_of

Items = Sequence[Tuple[str, Input]]
Lines = List[Dict[str, Any]]

ONLINE_TEXT = (
    "A stream of single samples whose class proportions drift: the classes are cut into groups, and in each "
    "phase most samples (the focus share) come from one group, the rest from all others. Every method sees the "
    "same stream from the same weights, once: SGD one sample per update, SGD on small mini-batches of "
    "consecutive samples, Adam one sample per update, and averaged SGD (Polyak–Ruppert: the SGD iterates "
    "averaged since the stream began, the average being what is evaluated). At every checkpoint the last "
    "samples of the stream (a sliding window) are re-evaluated at the current weights, which gives unbiased "
    "tr(Σ), |G|² and the noise scale B_simple = tr(Σ)/|G|² of the recent stream exactly where the next update "
    "is taken (gradnoise.monitor.window.WindowNoise, usable in one's own online loop). The update noise is "
    "tr Cov(u) of the next update u of the evaluated weights, against its signal |E u|²: for SGD at batch B "
    "they are lr²·tr(Σ)/B and lr²·|G|²; for Adam and averaged SGD they are measured by giving each window "
    "sample one step from the same frozen state. Adam's update carries its momentum and the average moves "
    "by 1/n of the iterate's step, so both are far less noisy per update than plain SGD. Accuracy on the "
    "current group and on the earlier groups is on held-out samples; forgetting is, over the earlier groups, "
    "the best accuracy a group had at any checkpoint minus its accuracy now (Chaudhry et al. 2018), so low "
    "forgetting only means something beside a good accuracy on the current classes: a method that barely "
    "learns the new classes forgets little. Curves and bars are means over seeds (seeds vary the stream), "
    "bands and error bars 95 % t-intervals; dotted lines mark the phase boundaries."
)


# ------------------------------------------------------------------------------ data
def _by_method(lines: Lines) -> Dict[str, Lines]:
    out: Dict[str, Lines] = {}
    for ln in lines:
        out.setdefault(str(ln.get("method")), []).append(ln)
    return out


def _positions(rows: Lines) -> List[float]:
    return sorted({to_float(r.get("position")) for r in rows if math.isfinite(to_float(r.get("position")))})


def _at(rows: Lines, key: str) -> Tuple[np.ndarray, List[List[float]]]:
    """Stream positions ``[K]`` and, at each, the finite values of ``key`` over seeds."""
    xs = _positions(rows)
    vals: List[List[float]] = [[] for _ in xs]
    index = {x: i for i, x in enumerate(xs)}
    for r in rows:
        x, v = to_float(r.get("position")), to_float(r.get(key))
        if x in index and math.isfinite(v):
            vals[index[x]].append(v)
    return np.array(xs, dtype=float), vals


def mean_band(rows: Lines, key: str, low: float = 0.0, high: float = math.inf
              ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x, mean, lo, hi)`` of ``key`` over seeds at each position, the t-interval clipped
    to ``[low, high]`` (NaN where fewer than two seeds have a value)."""
    x, vals = _at(rows, key)
    means, los, his = [], [], []
    for v in vals:
        mi = mean_interval(v)
        means.append(np.nan if mi["mean"] is None else mi["mean"])
        lo, hi = mi["interval"]
        los.append(min(max(lo, low), high) if math.isfinite(lo) else np.nan)
        his.append(min(max(hi, low), high) if math.isfinite(hi) else np.nan)
    return x, np.array(means, dtype=float), np.array(los, dtype=float), np.array(his, dtype=float)


def ratio_series(rows: Lines, num: str, den: str) -> Tuple[np.ndarray, np.ndarray]:
    """``(x, Σ_seeds num / Σ_seeds den)`` at each position, over the seeds where both are
    defined; NaN where the denominator's sum is ≤ 0 (the ratio is then undefined)."""
    xs = _positions(rows)
    index = {x: i for i, x in enumerate(xs)}
    n, d = np.zeros(len(xs)), np.zeros(len(xs))
    for r in rows:
        x, a, b = to_float(r.get("position")), to_float(r.get(num)), to_float(r.get(den))
        if x in index and math.isfinite(a) and math.isfinite(b):
            n[index[x]] += a
            d[index[x]] += b
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(d > 0, n / np.where(d > 0, d, 1.0), np.nan)
    return np.array(xs, dtype=float), out


def _boundaries(summary: Dict[str, Any], header: Dict[str, Any]) -> List[float]:
    """Stream positions where a phase ends and the next begins."""
    cfg = header.get("config") if isinstance(header.get("config"), dict) else {}
    phases, size = (to_float(summary.get(k, cfg.get(k))) for k in ("phases", "phase_samples"))
    if not (math.isfinite(phases) and math.isfinite(size)) or phases < 2 or size <= 0:
        return []
    return [p * size for p in range(1, int(phases))]


def _mark_phases(ax, bounds: Sequence[float]) -> None:
    for b in bounds:
        ax.axvline(b, color="#888888", linestyle=":", linewidth=1)


# --------------------------------------------------------------------------- figures
def accuracy_figure(checkpoints: Lines, bounds: Sequence[float], name: str, task: str) -> Plot:
    """One panel per method: accuracy on the current and on the earlier classes over the stream."""
    methods = _by_method(checkpoints)
    cols = 2 if len(methods) > 1 else 1
    rows = max(1, math.ceil(len(methods) / cols))
    fig, axes = new_figure(rows, cols, width=11.0 if cols == 2 else 6.5, row_height=3.4, bottom=0.9)
    if not methods:
        note_empty(axes[0], "no checkpoints in this file yet")
    for ax, (method, lines) in zip(axes, methods.items()):
        drawn = False
        for key, label, color in (("acc_current", "current classes", COLORS[0]),
                                  ("acc_earlier", "earlier classes", COLORS[1])):
            x, mean, lo, hi = mean_band(lines, key, 0.0, 1.0)
            if not np.isfinite(mean).any():
                continue
            ax.plot(x, mean, "o-", markersize=2.5, color=color, label=label)
            band(ax, x, lo, hi, (-0.02, 1.02), color)
            drawn = True
        if not drawn:
            note_empty(ax)
        _mark_phases(ax, bounds)
        ax.set(title=method, xlabel="stream samples seen", ylabel="test accuracy", ylim=(-0.02, 1.02))
        legend(ax, small=True)
    for ax in axes[len(methods):]:
        ax.set_visible(False)
    alt = (f"Test accuracy for task {task} over the stream, one panel per method ({', '.join(methods)}): "
           "on the classes of the current phase and on the classes of earlier phases, means over seeds with "
           "95 % bands; dotted vertical lines at the phase boundaries.")
    return finish(fig, name, alt, "Lines: means over seeds; bands: 95 % t-intervals; dotted lines: phase "
                                  "boundaries. Earlier classes are undefined in the first phase.")


def _series_panel(ax, methods: Dict[str, Lines], num: str, den: Optional[str], bounds, title: str,
                  ylabel: str) -> None:
    drawn = False
    for i, (method, lines) in enumerate(methods.items()):
        if den is None:
            x, y, lo, hi = mean_band(lines, num)
        else:
            x, y = ratio_series(lines, num, den)
        keep = np.isfinite(y) & (y > 0)
        if keep.any():
            ax.plot(x[keep], y[keep], "o-", markersize=2.5, color=COLORS[i % len(COLORS)], label=method)
            drawn = True
    if drawn:
        log_axis(ax, "y")
        legend(ax, small=True)
    else:
        note_empty(ax)
    _mark_phases(ax, bounds)
    ax.set(title=title, xlabel="stream samples seen", ylabel=ylabel)


def noise_figure(checkpoints: Lines, bounds: Sequence[float], name: str, task: str) -> Plot:
    """Window B_simple, update noise and update noise-to-signal over the stream, per method."""
    fig, (ax, bx, cx) = new_figure(1, 3, width=13.0, row_height=4.0, bottom=0.9)
    methods = _by_method(checkpoints)
    _series_panel(ax, methods, "trace_cov", "grad_sq_norm", bounds, "Window noise scale B_simple",
                  "tr(Σ)/|G|² at the current weights")
    _series_panel(bx, methods, "update_noise", None, bounds, "Update noise", "tr Cov(u)")
    _series_panel(cx, methods, "update_noise", "update_signal", bounds, "Update noise-to-signal",
                  "tr Cov(u) / |E u|²")
    cx.axhline(1.0, color="#888888", linestyle="--", linewidth=0.8)
    alt = (f"Three panels for task {task} over the stream, one line per method: the noise scale B_simple of "
           "the sliding window at the current weights, the noise of the next update, and its noise-to-signal "
           "ratio, all on log scales, with the phase boundaries dotted.")
    return finish(fig, name, alt, "Ratios are ratios of the seed means of numerator and denominator; a point "
                                  "is left out where the estimated |G|² or signal was ≤ 0. Dashed: ratio 1. "
                                  "Averaged SGD's window is measured at its iterate, which is SGD B=1's, so "
                                  "their B_simple lines coincide.")


def _bars(ax, names: List[str], methods: Dict[str, Any], key: str, title: str, ylabel: str, top=None) -> None:
    means, err = [], []
    for m in names:
        part = methods[m].get(key) or {}
        v = to_float(part.get("mean"))
        lo, hi = domain_interval(part.get("interval"))
        if top is not None:
            hi = min(hi, top) if math.isfinite(hi) else hi
        means.append(v)
        err.append((v - lo if math.isfinite(lo) and math.isfinite(v) else 0.0,
                    hi - v if math.isfinite(hi) and math.isfinite(v) else 0.0))
    x = np.arange(len(names))
    vals = np.array(means, dtype=float)
    keep = np.isfinite(vals)
    if keep.any():
        e = np.clip(np.array(err, dtype=float).T, 0, None)
        ax.bar(x[keep], vals[keep], yerr=e[:, keep], capsize=3, color=[COLORS[i % len(COLORS)] for i in x[keep]])
    else:
        note_empty(ax)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
    ax.set(title=title, ylabel=ylabel)


def final_figure(summary: Dict[str, Any], name: str, task: str) -> Plot:
    """Final forgetting and final accuracy on the current and the earlier classes, per method."""
    fig, axes = new_figure(1, 3, width=12.0, row_height=3.6, bottom=1.2)
    methods = summary.get("methods") or {}
    names = list(methods)
    for ax, (key, title, ylabel) in zip(axes, (("forgetting", "Final forgetting", "best − final accuracy"),
                                               ("acc_current", "Final accuracy, current classes", "accuracy"),
                                               ("acc_earlier", "Final accuracy, earlier classes", "accuracy"))):
        _bars(ax, names, methods, key, title, ylabel, top=1.0)
        ax.set_ylim(0, 1.05)
    alt = (f"Three bar charts for task {task}: final forgetting, and final test accuracy on the current and on "
           f"the earlier classes, for each method ({', '.join(names)}), means over seeds with 95 % intervals.")
    return finish(fig, name, alt, "Bars: means over seeds; error bars: 95 % t-intervals clipped to [0, 1].")


# ----------------------------------------------------------------------------- part
def _iv(m: Dict[str, Any], key: str, digits: int = 2) -> str:
    part = m.get(key) or {}
    return fmt_with_interval(part.get("mean"), part.get("interval"), digits)


def _groups_text(summary: Dict[str, Any]) -> str:
    groups = summary.get("groups") or []
    names = []
    for g in groups:
        g = [str(c) for c in g] if isinstance(g, list) else []
        names.append(g[0] if len(g) == 1 else f"{g[0]}–{g[-1]}" if g else DASH)
    return ", then ".join(names) if names else DASH


def _part(stem: str, inp: Input) -> Tuple[str, List[Plot]]:
    summary = summary_of(inp)
    checkpoints = inp.of_type("checkpoint")
    bounds = _boundaries(summary, inp.header)
    task = task_of(inp)
    plots = [accuracy_figure(checkpoints, bounds, f"{stem}-online-accuracy", task),
             noise_figure(checkpoints, bounds, f"{stem}-online-noise", task),
             final_figure(summary, f"{stem}-online-final", task)]
    head = h.para(f"{fmt_count(summary.get('stream_samples'))} stream samples in {fmt_count(summary.get('phases'))} "
                  f"phases of {fmt_count(summary.get('phase_samples'))} (focus {fmt_num(summary.get('focus'), 2)} on "
                  f"the classes {_groups_text(summary)}); window of {fmt_count(summary.get('window'))} samples; "
                  f"{fmt_count(summary.get('test_size'))} held-out test samples; {fmt_count(summary.get('seeds'))} "
                  "seeds.")
    rows = []
    for name, m in (summary.get("methods") or {}).items():
        rows.append((name, f"{fmt_num(m.get('lr'))} / {fmt_count(m.get('batch'))}", _iv(m, "acc_current"),
                     _iv(m, "acc_earlier"), _iv(m, "acc_all"), _iv(m, "forgetting"), _iv(m, "noise_to_signal"),
                     _iv(m, "b_simple", 3), _iv(m, "seconds", 2)))
    table = h.table(("method", "lr / batch", "final acc., current", "final acc., earlier", "final acc., all",
                     "forgetting", "update noise-to-signal", "window B_simple", "seconds per run"), rows)
    verdict = online_verdict_text(summary)
    body = subheading(inp) + head + "".join(h.figure(p) for p in plots) + table
    if verdict:
        body += h.para(verdict)
    if not checkpoints:
        body += h.note("This file has no checkpoints yet.")
    return body, plots


def online_section(items: Items) -> h.Section:
    """Learning from a drifting stream (study ``online``)."""
    return section("online", "Online learning: update noise and forgetting on a drifting stream", ONLINE_TEXT,
                   items, _part)


# -------------------------------------------------------------------------- verdict
def _mean(m: Dict[str, Any], key: str) -> float:
    return to_float((m.get(key) or {}).get("mean"))


def _overlap(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    """True when two 95 % intervals overlap, or either is undefined (not separated)."""
    (la, ha), (lb, hb) = domain_interval(a.get("interval")), domain_interval(b.get("interval"))
    if any(math.isnan(v) for v in (la, ha, lb, hb)):
        return True
    return la <= hb and lb <= ha


def online_verdict_text(summary: Dict[str, Any]) -> Optional[str]:
    """One sentence: which method forgot least (and whether it kept up with the drift),
    which had the least noisy updates, and which to use — the one with the best final
    accuracy over all classes, said to be unseparated from the runner-up when their
    intervals overlap. None when the summary has no method with a final accuracy."""
    methods = {k: v for k, v in (summary.get("methods") or {}).items() if isinstance(v, dict)}
    scored = {k: v for k, v in methods.items() if math.isfinite(_mean(v, "acc_all"))}
    if not scored:
        return None
    parts = []
    forgot = {k: v for k, v in scored.items() if math.isfinite(_mean(v, "forgetting"))}
    current = {k: _mean(v, "acc_current") for k, v in scored.items() if math.isfinite(_mean(v, "acc_current"))}
    noisy = {k: _mean(v, "noise_to_signal") for k, v in scored.items() if math.isfinite(_mean(v, "noise_to_signal"))}
    quiet = min(noisy, key=noisy.get) if noisy else None
    quiet_text = f"had the least noisy updates (noise-to-signal {fmt_num(noisy[quiet], 2)})" if noisy else ""
    if forgot:
        least = min(forgot, key=lambda k: _mean(forgot[k], "forgetting"))
        text = f"{least} forgot least (forgetting {_iv(forgot[least], 'forgetting')})"
        if quiet == least:
            text += " and " + quiet_text
        lead = max(current, key=current.get) if current else None
        if least in current and lead != least and current[least] < current[lead] - 0.1:
            text += (f", but reached only {fmt_num(current[least], 2)} on the current classes against "
                     f"{fmt_num(current[lead], 2)} for {lead} (it lagged the drift)")
        parts.append(text)
    if quiet is not None and not (forgot and quiet == least):
        parts.append(f"{quiet} {quiet_text}")
    ranked = sorted(scored, key=lambda k: _mean(scored[k], "acc_all"), reverse=True)
    best = ranked[0]
    use = (f"use {best}, which ended with the best accuracy over all classes "
           f"({_iv(scored[best], 'acc_all')})")
    if len(ranked) > 1 and _overlap(scored[best]["acc_all"], scored[ranked[1]]["acc_all"]):
        use += f", not separated from {ranked[1]} ({_iv(scored[ranked[1]], 'acc_all')}) at these seeds"
    parts.append(use)
    return "On this drifting stream, " + "; ".join(parts) + "."


__all__ = ["ONLINE_TEXT", "accuracy_figure", "final_figure", "mean_band", "noise_figure", "online_section",
           "online_verdict_text", "ratio_series"]
