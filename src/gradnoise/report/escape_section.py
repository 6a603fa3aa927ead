"""Section of the ``escape`` study: escapes from a sharp well against the noise level, SGD
against isotropic noise; sharpness and generalisation of small- and large-batch
solutions on the task."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from . import html as h
from .figures import COLORS, Plot, finish, legend, log_axis, new_figure, note_empty
from .files import Input
from .fmt import floats, fmt_count, fmt_with_interval, interval
from .sections import reason_note, section, subheading, summary_of, task_of

Items = Sequence[Tuple[str, Input]]

ESCAPE_TEXT = (
    "Does gradient noise help leave sharp minima? (a) In a controlled landscape with a sharp well and a "
    "flat, slightly deeper one, walkers start at the sharp minimum and take SGD steps at a fixed learning "
    "rate; a smaller batch means more noise, measured as ε·tr(Σ_B) at the sharp minimum (Σ_B: the "
    "covariance of the batch-mean gradient). The left panel shows the fraction that left the sharp well "
    "(95 % Wilson intervals) under SGD's own noise and under isotropic Gaussian noise of the same trace: "
    "SGD's noise is strongest along the sharp direction, the way out (Zhu et al. 2019). (b) On the task, "
    "SGD with a small and a large batch at the same learning rate, each trained to the same training "
    "loss: the top Hessian eigenvalue and the Hessian trace of the training loss there, and the gap "
    "between train and test accuracy. Caveats: sharpness depends on how the model is parameterised "
    "(Dinh et al. 2017), so it is a comparison between these runs, not an absolute property; training "
    "the large batch longer narrows the generalisation gap (Hoffer et al. 2017); under full-batch "
    "gradient descent the top eigenvalue settles near 2/ε, the edge of stability (Cohen et al. 2021), so "
    "at a fixed learning rate part of the sharpness difference is set by the step size."
)


def _walk_panel(ax, walks: Sequence[Dict[str, Any]]) -> None:
    ax.set(title="Escapes from the sharp well", xlabel="noise level ε·tr(Σ_B) at the sharp minimum",
           ylabel="fraction of walkers that left it")
    shown = False
    for i, (kind, label) in enumerate((("sgd", "SGD noise"), ("isotropic", "isotropic noise, same trace"))):
        rows = sorted((w for w in walks if w.get("kind") == kind), key=lambda w: -float(w.get("batch_size", 0)))
        level, frac = floats([w.get("noise_level") for w in rows]), floats([w.get("fraction") for w in rows])
        ivs = np.array([interval(w.get("interval")) for w in rows]).reshape(-1, 2)
        keep = np.isfinite(level) & (level > 0) & np.isfinite(frac)
        if not keep.any():
            continue
        err = np.abs(np.vstack([frac - ivs[:, 0], ivs[:, 1] - frac]))[:, keep]
        ax.errorbar(level[keep], frac[keep], yerr=np.nan_to_num(err), fmt="o-", color=COLORS[i], capsize=3,
                    markersize=4, label=label)
        shown = True
    if not shown:
        note_empty(ax)
        return
    log_axis(ax, "x")
    ax.set_ylim(-0.03, 1.03)
    legend(ax, small=True)


def _sharpness_panel(ax, solutions: Sequence[Dict[str, Any]]) -> None:
    ax.set(title="Sharpness of the solutions", xlabel="batch size B (samples)",
           ylabel="top Hessian eigenvalue λ_max")
    sizes = sorted({int(s["batch_size"]) for s in solutions if s.get("reached")})
    if not sizes:
        note_empty(ax, "no run reached the training loss")
        return
    for i, b in enumerate(sizes):
        vals = floats([s.get("top_eigenvalue") for s in solutions if s.get("reached") and s["batch_size"] == b])
        vals = vals[np.isfinite(vals)]
        ax.scatter(np.full(vals.size, i), vals, color=COLORS[i], zorder=3)
        if vals.size:
            ax.hlines(vals.mean(), i - 0.25, i + 0.25, color=COLORS[i], linewidth=2)
    ax.set_xticks(range(len(sizes)))
    ax.set_xticklabels([fmt_count(b) for b in sizes])
    ax.set_xlim(-0.6, len(sizes) - 0.4)


def escape_figure(walks, solutions, name: str, task: str) -> Plot:
    fig, (ax, bx) = new_figure(1, 2, width=11.0, row_height=4.0)
    _walk_panel(ax, walks)
    _sharpness_panel(bx, solutions)
    alt = (f"Two panels for task {task}: the fraction of walkers that left a sharp well against the noise "
           "level, for SGD noise and for isotropic noise of the same size, with 95 % intervals; and the top "
           "Hessian eigenvalue of each small- and large-batch solution, one point per seed, means as bars.")
    return finish(fig, name, alt, "Left: error bars are 95 % Wilson intervals. Right: points are seeds, "
                                  "bars their means.")


def _part(stem: str, inp: Input) -> Tuple[str, List[Plot]]:
    summary = summary_of(inp)
    plot = escape_figure(inp.of_type("walk"), inp.of_type("solution"), f"{stem}-escape", task_of(inp))
    rows = []
    for name in ("small", "large"):
        part = summary.get(name) or {}
        rows.append((f"{name}, B={fmt_count(summary.get(f'{name}_batch'))}",
                     *(fmt_with_interval((part.get(k) or {}).get("mean"), (part.get(k) or {}).get("interval"),
                                         signed=k == "gap")
                       for k in ("top_eigenvalue", "hessian_trace", "gap", "test_accuracy")),
                     fmt_count((part.get("top_eigenvalue") or {}).get("n"))))
    table = h.table(("solution", "top eigenvalue λ_max", "Hessian trace", "train − test accuracy",
                     "test accuracy", "seeds"), rows)
    more = summary.get("sgd_escapes_more_at") or []
    line = (f"SGD's noise left the sharp well more often than isotropic noise of the same size at "
            f"B = {', '.join(map(str, more))} (95 % intervals apart)." if more else
            "SGD's noise and isotropic noise of the same size did not differ beyond their intervals.")
    return subheading(inp) + h.figure(plot) + h.para(line) + table + reason_note(summary), [plot]


def escape_section(items: Items) -> h.Section:
    """Escaping sharp minima (study ``escape``)."""
    return section("escape", "Escape: noise and sharp minima", ESCAPE_TEXT, items, _part)


__all__ = ["escape_figure", "escape_section"]
