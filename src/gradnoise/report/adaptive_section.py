"""Section of the ``adaptive`` study: steps, examples and wall time to a target loss for
fixed batches, AdaScale and the noise-driven batch size."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from . import html as h
from .figures import COLORS, Plot, finish, log_axis, new_figure, note_empty
from .files import Input
from .fmt import domain_interval, fmt_count, fmt_factor, fmt_num, fmt_with_interval
from .sections import section, subheading, summary_of, task_of

Items = Sequence[Tuple[str, Input]]

ADAPTIVE_TEXT = (
    "Each method trains the same model from the same weights until the full-data loss reaches the target: "
    "SGD at the base batch and at a large one with the same learning rate; SGD at the large batch with "
    "AdaScale, whose rate is the base rate times the gain r = (trΣ/B₀ + |G|²)/(trΣ/B + |G|²) read from the "
    "monitor; SGD whose batch follows the measured noise scale B_simple (AdaptiveBatchSampler, the rate by "
    "the same rule); and Adam at the large batch with and without AdaScale's square-root variant (an "
    "approximation: the preconditioned noise from per-tensor averages). Bars are means over seeds with "
    "95 % t-intervals; a run that missed the target is left out and counted. Published anchors, on far "
    "larger models: a batch-size warm-up from the measured critical batch size saved 43 % of the steps on "
    "OLMo 1B (Merrill et al. 2025), a GNS-guided batch schedule 18 % of the training time (Gray et al. "
    "2024). Fewer steps are worth having when steps are what costs (many devices in parallel); on one "
    "device examples and time are the cost, so read all three columns."
)


def method_bars(axis, methods: Dict[str, Dict[str, Any]], key: str, label: str) -> None:
    """Bars of ``methods[m][key]["mean"]`` per method with their 95 % intervals as error
    bars (log scale); a method without a positive mean gets no bar."""
    names = list(methods)
    means, lows, highs = [], [], []
    for m in names:
        part = methods[m].get(key) or {}
        mean = part.get("mean")
        lo, hi = domain_interval(part.get("interval"))
        means.append(np.nan if mean is None else float(mean))
        lows.append(lo)
        highs.append(hi)
    means, lows, highs = (np.array(v, dtype=float) for v in (means, lows, highs))
    keep = np.isfinite(means) & (means > 0)
    x = np.arange(len(names))
    if keep.any():
        err = np.vstack([means - np.where(np.isfinite(lows), lows, means),
                         np.where(np.isfinite(highs), highs, means) - means])
        axis.bar(x[keep], means[keep], yerr=np.clip(err[:, keep], 0, None), capsize=3,
                 color=[COLORS[i % len(COLORS)] for i in x[keep]])
        log_axis(axis, "y")
    axis.set_xticks(x)
    axis.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    axis.set(title=label.capitalize(), ylabel=label)


def adaptive_figure(summary, runs, name: str, task: str) -> Plot:
    fig, (ax, bx) = new_figure(1, 2, width=11.0, row_height=4.2, bottom=1.6)
    methods = summary.get("methods") or {}
    names = list(methods)
    if not names:
        note_empty(ax)
        note_empty(bx)
    for key, label, axis in (("steps", "optimizer steps to the target", ax),
                             ("examples", "examples to the target", bx)):
        method_bars(axis, methods, key, label)
    alt = (f"Two bar charts for task {task}: optimizer steps and training examples to the target loss for "
           f"each method ({', '.join(names)}), means over seeds with 95 % intervals, log scale.")
    return finish(fig, name, alt, "Bars: means over the seeds that reached the target; error bars: 95 % "
                                  "t-intervals.")


def _part(stem: str, inp: Input) -> Tuple[str, List[Plot]]:
    summary = summary_of(inp)
    plot = adaptive_figure(summary, inp.of_type("run"), f"{stem}-adaptive", task_of(inp))
    rows = []
    for m, s in (summary.get("methods") or {}).items():
        rows.append((m, f"{fmt_count(s.get('reached'))} of {fmt_count(s.get('runs'))}",
                     *(fmt_with_interval((s.get(k) or {}).get("mean"), (s.get(k) or {}).get("interval"))
                       for k in ("steps", "examples", "seconds")),
                     fmt_factor(s.get("steps_vs_small"))))
    table = h.table(("method", "reached the target", "steps", "examples", "wall seconds",
                     "steps vs fixed small"), rows)
    finals = [r.get("final_batch") for r in inp.of_type("run") if r.get("method") == "adaptive batch"]
    extra = h.para(f"The noise-driven batch ended at {', '.join(fmt_count(b) for b in finals)} samples "
                   f"(one per seed; it started at {fmt_count(summary.get('base_batch'))}).") if finals else ""
    head = h.para(f"Target loss {fmt_num(summary.get('target_loss'))}; base batch "
                  f"{fmt_count(summary.get('base_batch'))}, large batch {fmt_count(summary.get('large_batch'))}.")
    return subheading(inp) + head + h.figure(plot) + h.para(adaptive_finding(summary)) + table + extra, [plot]


def adaptive_finding(s: Dict[str, Any]) -> str:
    """Steps and examples of AdaScale, the noise-driven batch and Adam with AdaScale's
    square-root gain against the fixed small batch."""
    methods = s.get("methods") or {}
    base = methods.get("fixed small") or {}
    b_steps, b_ex = ((base.get(k) or {}).get("mean") for k in ("steps", "examples"))
    parts = []
    for name in ("AdaScale", "adaptive batch", "Adam + AdaScale (√ gain)"):
        m = methods.get(name) or {}
        steps, ex = ((m.get(k) or {}).get("mean") for k in ("steps", "examples"))
        if steps is None or not b_steps:
            if m:
                parts.append(f"{name} reached it in {fmt_count(m.get('reached'))} of {fmt_count(m.get('runs'))} seeds")
            continue
        parts.append(f"{name} took ×{fmt_factor(steps / b_steps)} the steps and ×{fmt_factor(ex / b_ex)} the "
                     "examples of the fixed small batch")
    return (f"To the loss {fmt_num(s.get('target_loss'))} from batch {fmt_count(s.get('base_batch'))}: "
            + ("; ".join(parts) if parts else "no method reached it")
            + " (fewer steps pay where steps are the cost, as with many devices in parallel).")


def adaptive_section(items: Items) -> h.Section:
    """What acting on the noise buys (study ``adaptive``)."""
    return section("adaptive", "Adaptive: acting on the noise", ADAPTIVE_TEXT, items, _part)


__all__ = ["adaptive_figure", "adaptive_finding", "adaptive_section", "method_bars"]
