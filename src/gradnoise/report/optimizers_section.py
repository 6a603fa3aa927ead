"""Section of the ``optimizers`` study: loss curves, and the noise-to-signal ratio of each
optimizer's update measured at the same state over many batches."""
from __future__ import annotations

import math

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from . import html as h
from .figures import COLORS, Plot, finish, legend, log_axis, new_figure, note_empty
from .files import Input
from .fmt import domain_interval, floats, fmt_count, fmt_num, fmt_with_interval
from .sections import section, subheading, summary_of, task_of

Items = Sequence[Tuple[str, Input]]

OPTIMIZERS_TEXT = (
    "Each optimizer trains the same model from the same weights at a small batch. At a few steps its state "
    "is frozen and many independent batches each get one step from that same state; over those updates u, "
    "the noise tr Cov(u) and the signal |E u|² give the update's noise-to-signal ratio, which does not "
    "depend on the step size, so optimizers compare directly (for SGD it is the gradient's tr(Σ_B)/|G|²). "
    "A ratio below 1 means the update mostly points the same way whatever the batch. Momentum and Adam's "
    "first moment carry the past gradients, which are the same for every batch at a given state, so their "
    "updates are less noisy per step; a preconditioner alone (RMSProp) can amplify the noise where the "
    "signal is small. Intervals are 95 % jackknife intervals over the batches (on the log scale). For SVRG the "
    "variance of its estimator g − g̃ + μ̃ is also set against SGD's gradient variance at the same weights "
    "(Defazio & Bottou 2019 found it barely falls on deep networks)."
)


def _by(lines, key="optimizer") -> Dict[str, List[Dict[str, Any]]]:
    out: Dict[str, List[Dict[str, Any]]] = {}
    for ln in lines:
        out.setdefault(str(ln.get(key)), []).append(ln)
    return out


def optimizers_figure(losses, noise, name: str, task: str) -> Plot:
    fig, (ax, bx) = new_figure(1, 2, width=11.0, row_height=4.0)
    ax.set(title="Full-data loss", xlabel="optimizer step", ylabel="loss")
    bx.set(title="Noise-to-signal ratio of the update", xlabel="optimizer step",
           ylabel="tr Cov(u) / |E u|²")
    drawn = False
    for i, (opt, rows) in enumerate(_by(losses).items()):
        step, full = floats([r.get("step") for r in rows]), floats([r.get("full_loss") for r in rows])
        keep = np.isfinite(full) & (full > 0)
        if keep.any():
            ax.plot(step[keep], full[keep], "o-", markersize=2.5, color=COLORS[i % len(COLORS)], label=opt)
            drawn = True
    if drawn:
        log_axis(ax, "y")
        legend(ax, small=True)
    else:
        note_empty(ax)
    drawn = False
    for i, (opt, rows) in enumerate(_by(noise).items()):
        step, ratio = floats([r.get("step") for r in rows]), floats([r.get("ratio") for r in rows])
        ivs = np.array([domain_interval(r.get("ratio_interval")) for r in rows]).reshape(-1, 2)
        keep = np.isfinite(ratio) & (ratio > 0)
        if not keep.any():
            continue
        low = np.where(np.isfinite(ivs[:, 0]), ivs[:, 0], ratio)
        high = np.where(np.isfinite(ivs[:, 1]), ivs[:, 1], ratio)
        err = np.vstack([ratio - low, high - ratio])[:, keep]
        bx.errorbar(step[keep] + 3 * i, ratio[keep], yerr=np.clip(err, 0, None), fmt="o-", capsize=2, markersize=3,
                    color=COLORS[i % len(COLORS)], label=opt)
        drawn = True
    if drawn:
        log_axis(bx, "y")
        bx.axhline(1.0, color="#888888", linestyle=":", linewidth=1)
        legend(bx, small=True)
    else:
        note_empty(bx)
    alt = (f"Two panels for task {task}: full-data loss against step for each optimizer (log scale), and the "
           "noise-to-signal ratio of each optimizer's update at a few steps with 95 % intervals (log scale).")
    return finish(fig, name, alt, "Right: points are offset a little along x so that their error bars do not "
                                  "hide each other; dotted line: ratio 1.")


def _part(stem: str, inp: Input) -> Tuple[str, List[Plot]]:
    summary = summary_of(inp)
    noise = inp.of_type("noise")
    plot = optimizers_figure(inp.of_type("loss"), noise, f"{stem}-optimizers", task_of(inp))
    rows = []
    last = {opt: rs[-1] for opt, rs in _by(noise).items()}
    for opt, s in (summary.get("optimizers") or {}).items():
        r = last.get(opt, {})
        rows.append((opt, fmt_num(s.get("final_loss")), fmt_num(s.get("median_ratio")),
                     f"{fmt_with_interval(r.get('ratio'), r.get('ratio_interval'))} at step {fmt_count(r.get('step'))}"))
    table = h.table(("optimizer", "final full-data loss", "median update noise-to-signal",
                     "last measurement, 95 % interval"), rows)
    svrg = [r for r in noise if r.get("optimizer") == "SVRG" and r.get("sgd_variance")]
    extra = ""
    if svrg:
        srows = [(fmt_count(r.get("step")), fmt_num(r.get("estimator_variance")), fmt_num(r.get("sgd_variance")),
                  fmt_num(r["estimator_variance"] / r["sgd_variance"]) if r.get("estimator_variance") is not None
                  else fmt_num(None)) for r in svrg]
        extra = h.para("SVRG's estimator against SGD's gradient at the same weights (the snapshot is refreshed "
                       "once an epoch):") + h.table(("step", "SVRG estimator tr Cov", "SGD gradient tr Cov",
                                                     "ratio"), srows)
    head = h.para(f"Batch size {fmt_count(summary.get('batch_size'))}, {fmt_count(summary.get('steps'))} steps each.")
    return subheading(inp) + head + h.figure(plot) + h.para(optimizers_finding(summary)) + table + extra, [plot]


def optimizers_finding(s: Dict[str, Any]) -> str:
    """The optimizers whose updates were least and most noisy (SGD's beside them when it is
    neither), and the one that reached the lowest loss."""
    opts = {k: v for k, v in (s.get("optimizers") or {}).items() if v.get("median_ratio") is not None}
    if not opts:
        return "No update noise could be measured."
    quiet = min(opts, key=lambda k: opts[k]["median_ratio"])
    loud = max(opts, key=lambda k: opts[k]["median_ratio"])
    best = min(opts, key=lambda k: opts[k]["final_loss"] if opts[k]["final_loss"] is not None else math.inf)
    text = (f"The update of {quiet} was the least noisy (median noise-to-signal {fmt_num(opts[quiet]['median_ratio'])})"
            f" and {loud}'s the most ({fmt_num(opts[loud]['median_ratio'])})")
    if "SGD" in opts and "SGD" not in (quiet, loud):
        text += f", SGD's {fmt_num(opts['SGD']['median_ratio'])}"
    return text + f"; {best} reached the lowest loss ({fmt_num(opts[best]['final_loss'])})."


def optimizers_section(items: Items) -> h.Section:
    """The update noise of each optimizer (study ``optimizers``)."""
    return section("optimizers", "Optimizers: the noise of the update", OPTIMIZERS_TEXT, items, _part)


__all__ = ["optimizers_figure", "optimizers_finding", "optimizers_section"]
