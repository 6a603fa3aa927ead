"""Section of the ``lm`` study: how a small GPT's noise scale grows as its loss falls,
whether the LayerNorm layers alone track it, and a noise-driven batch warm-up."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import html as h
from .adaptive_section import method_bars
from .lm_calibration import calibration_part
from .figures import COLORS, Plot, band, finish, legend, limits, log_axis, new_figure, note_empty
from .files import Input
from .fmt import fmt_count, fmt_num, fmt_with_interval
from .sections import section, subheading, summary_of, task_of

Items = Sequence[Tuple[str, Input]]

LM_TEXT = (
    "A small decoder-only GPT (causal attention, tied embeddings) learns to predict the next byte of the "
    "Python documentation's topic texts, which ship with every Python (pydoc_data.topics; no download). "
    "The per-sample unit is the sequence: B_simple = trΣ/|G|² is the noise scale in sequences, and times the "
    "sequence length T in tokens. The monitor measures every sequence's exact gradient norm during AdamW "
    "training; the curves are its smoothed B_simple with 95 % intervals, of the whole model and of the "
    "LayerNorm layers alone (their trΣ and |G|² summed). Published LM runs (Merrill et al. 2025, OLMo) see the "
    "critical batch size near zero at initialisation, rising, then plateauing as the loss falls; Gray et al. "
    "(2024) find the LayerNorm layers' noise scale tracks the whole model's, which makes it cheap to measure. "
    "At a few checkpoints the branch probe measures the critical batch itself — short branches of training at "
    "several batch sizes from the same weights and AdamW state, McCandlish's steps-to-target fit — beside the raw, "
    "the AdamW-preconditioned and the LayerNorm-only B_simple: how well, and by what factor, the proxy tracks it. "
    "Below, the noise-driven batch warm-up (AdaptiveBatchSampler, batch = measured B_simple) against fixed "
    "batches, each to a target held-out loss, at the same AdamW rate."
)


def _cols(points: List[Dict[str, Any]], key: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = [p.get(key) or [None] * 3 for p in points]
    arr = np.array([[np.nan if v is None else float(v) for v in r] for r in rows], dtype=float).reshape(-1, 3)
    return arr[:, 0], arr[:, 1], arr[:, 2]


def growth_figure(points: List[Dict[str, Any]], name: str, task: str) -> Plot:
    """B_simple (total and LayerNorm-only, with bands) against tokens, with the loss;
    and against the held-out loss."""
    fig, (ax, bx) = new_figure(1, 2, width=11.0, row_height=4.0)
    tokens = np.array([p.get("tokens") or np.nan for p in points], dtype=float)
    loss = np.array([np.nan if p.get("loss") is None else p["loss"] for p in points], dtype=float)
    series = [("whole model", _cols(points, "b_simple"), COLORS[0]),
              ("LayerNorm layers only", _cols(points, "ln_b_simple"), COLORS[1])]
    ylim = limits([s[1][0] for s in series], log=True)
    if ylim is None:
        note_empty(ax)
        note_empty(bx)
    else:
        for label, (b, lo, hi), color in series:
            for axis, x in ((ax, tokens), (bx, loss)):
                axis.plot(x, np.where(b > 0, b, np.nan), color=color, marker=".", label=label)
                band(axis, x, lo, hi, ylim, color)
        for axis in (ax, bx):
            log_axis(axis, "y")
            axis.set_ylim(*ylim)
        bx.invert_xaxis()
        lx = ax.twinx()
        lx.plot(tokens, loss, color="#555555", linestyle="--", label="held-out loss")
        lx.set_ylabel("held-out loss (dashed)")
    ax.set(title="Noise scale over training", xlabel="tokens seen", ylabel="B_simple (sequences)")
    bx.set(title="Noise scale as the loss falls", xlabel="held-out loss (falling →)", ylabel="B_simple (sequences)")
    legend(ax)
    alt = (f"Two line charts for task {task}: the smoothed B_simple of the whole model and of the LayerNorm "
           "layers with 95 % bands, against tokens seen (with the held-out loss dashed) and against the loss.")
    return finish(fig, name, alt, "Lines: smoothed B_simple at each checkpoint; bands: 95 % intervals (clipped "
                                  "to the axes where unbounded); dashed: held-out loss.")


def layers_figure(points: List[Dict[str, Any]], name: str, task: str) -> Plot:
    """Every layer's smoothed B_simple against tokens (log scale)."""
    fig, (ax,) = new_figure(1, 1, width=11.0, row_height=4.4)
    tokens = np.array([p.get("tokens") or np.nan for p in points], dtype=float)
    names = list((points[-1].get("layers") or {}) if points else {})
    values = {n: np.array([np.nan if ((p.get("layers") or {}).get(n) or [None])[0] is None
                           else p["layers"][n][0] for p in points], dtype=float) for n in names}
    if not limits(values.values(), log=True):
        note_empty(ax)
    else:
        for i, n in enumerate(names):
            style = "-" if i < len(COLORS) else "--"
            ax.plot(tokens, np.where(values[n] > 0, values[n], np.nan), style, color=COLORS[i % len(COLORS)],
                    label=n)
        log_axis(ax, "y")
        legend(ax, small=True)
    ax.set(title="Noise scale per layer", xlabel="tokens seen", ylabel="B_simple (sequences)")
    alt = f"A line chart for task {task}: each layer's smoothed B_simple against tokens seen, log scale."
    return finish(fig, name, alt, "A layer's B_simple is its own trΣ over its own |G|²; where |G|² is not "
                                  "positive the point is missing.")


def warmup_figure(summary: Dict[str, Any], name: str, task: str) -> Plot:
    fig, axes = new_figure(1, 3, width=12.0, row_height=4.0, bottom=1.6)
    methods = summary.get("methods") or {}
    for (key, label), axis in zip((("steps", "optimizer steps"), ("tokens", "tokens"), ("seconds", "wall seconds")),
                                  axes):
        if not methods:
            note_empty(axis)
        method_bars(axis, methods, key, f"{label} to the target")
    alt = (f"Three bar charts for task {task}: steps, tokens and wall seconds to the target loss for the fixed "
           "batches and the noise-driven warm-up, means over seeds with 95 % intervals.")
    return finish(fig, name, alt, "Bars: means over the seeds that reached the target; error bars: 95 % "
                                  "t-intervals; seconds count training only (the monitor's cost included).")


def _growth_table(summary: Dict[str, Any]) -> str:
    g = summary.get("growth") or {}
    rows = []
    for where in ("first", "middle", "last"):
        p = g.get(where)
        if p:
            rows.append((where, fmt_count(p.get("step")), fmt_count(p.get("tokens")), fmt_num(p.get("loss"), 3),
                         fmt_with_interval(p.get("b_simple"), p.get("interval")),
                         fmt_num(p.get("b_simple_tokens"))))
    if not rows:
        return h.para("— no checkpoint had a defined B_simple (|G|² never estimated > 0).")
    return h.table(("checkpoint", "step", "tokens", "held-out loss", "B_simple (sequences)", "≈ tokens"), rows)


def layernorm_text(summary: Dict[str, Any]) -> str:
    """The LayerNorm agreement in one sentence (or why it is missing)."""
    ln = summary.get("layernorm") or {}
    if ln.get("median_ratio") is None:
        return "LayerNorm agreement: — (no checkpoint had both scales defined)."
    lo, hi = ln.get("ratio_range") or (None, None)
    rho = ln.get("rho")
    return (f"LayerNorm layers only against the whole model, over {fmt_count(ln.get('points'))} checkpoints: "
            f"median ratio ×{fmt_num(ln['median_ratio'], 2)} (10–90 %: ×{fmt_num(lo, 2)}–×{fmt_num(hi, 2)}), "
            f"Spearman's ρ {fmt_num(rho, 2) if rho is not None else '— (too few points)'}.")


def _warmup_table(summary: Dict[str, Any]) -> str:
    rows = []
    for m, s in (summary.get("methods") or {}).items():
        rows.append((m, f"{fmt_count(s.get('reached'))} of {fmt_count(s.get('runs'))}",
                     *(fmt_with_interval((s.get(k) or {}).get("mean"), (s.get(k) or {}).get("interval"))
                       for k in ("steps", "tokens", "seconds"))))
    return h.table(("method", "reached the target", "steps", "tokens", "wall seconds"), rows)


def _part(stem: str, inp: Input) -> Tuple[str, List[Plot]]:
    summary, task = summary_of(inp), task_of(inp)
    points = inp.of_type("checkpoint")
    plots = [growth_figure(points, f"{stem}-lm-growth", task), layers_figure(points, f"{stem}-lm-layers", task)]
    head = h.para(f"{fmt_count(summary.get('params'))} parameters, sequences of "
                  f"{fmt_count(summary.get('sequence_length'))} bytes, AdamW at rate {fmt_num(summary.get('lr'))} "
                  f"and batch {fmt_count(summary.get('batch_size'))} for {fmt_count(summary.get('steps'))} steps; "
                  f"held-out loss {fmt_num(summary.get('initial_loss'), 3)} → {fmt_num(summary.get('final_loss'), 3)}.")
    body = subheading(inp) + head + h.figure(plots[0]) + _growth_table(summary) + h.para(layernorm_text(summary))
    body += h.figure(plots[1])
    probes, more = calibration_part(summary, stem, task)
    body, plots = body + probes, plots + more
    if summary.get("methods"):
        plots.append(warmup_figure(summary, f"{stem}-lm-warmup", task))
        finals = [r.get("final_batch") for r in inp.of_type("run") if r.get("method") == "noise-driven warm-up"]
        body += h.para(f"Warm-up to the held-out loss {fmt_num(summary.get('target_loss'))}, fixed batches "
                       f"{fmt_count(summary.get('base_batch'))} and {fmt_count(summary.get('large_batch'))}; the "
                       f"warm-up started at {fmt_count(summary.get('base_batch'))} and ended at "
                       f"{', '.join(fmt_count(b) for b in finals) or '—'} sequences.")
        body += h.figure(plots[-1]) + _warmup_table(summary)
    return body, plots


def lm_section(items: Items) -> h.Section:
    """Gradient noise of a language model (study ``lm``)."""
    return section("lm", "Language model: noise scale over a run", LM_TEXT, items, _part)


def lm_verdict_text(summary: Dict[str, Any]) -> Optional[str]:
    """One sentence for the verdict: how far B_simple grew, in sequences and tokens, and
    what the warm-up bought against the fixed small batch."""
    g = summary.get("growth") or {}
    first, last = g.get("first"), g.get("last")
    if not first or not last:
        return None
    lo = (last.get("interval") or [None])[0]
    grew = lo is not None and np.isfinite(lo) and lo > first["b_simple"]
    text = (f"Language model: the noise scale {'grew' if grew else 'went'} from {fmt_num(first['b_simple'])} to "
            f"{fmt_with_interval(last['b_simple'], last['interval'])} sequences (≈ {fmt_num(last['b_simple_tokens'])} "
            f"tokens) as the held-out loss fell from {fmt_num(first['loss'], 3)} to {fmt_num(last['loss'], 3)}")
    text += (", so a batch that suits the start is too small later" if grew else
             " (its growth is not resolved: the last interval reaches below the first value)")
    methods = summary.get("methods") or {}
    small, warm = methods.get("fixed small") or {}, methods.get("noise-driven warm-up") or {}
    s_steps, w_steps = ((m.get("steps") or {}).get("mean") for m in (small, warm))
    s_tok, w_tok = ((m.get("tokens") or {}).get("mean") for m in (small, warm))
    if s_steps and w_steps:
        text += (f"; the noise-driven warm-up reached the loss {fmt_num(summary.get('target_loss'))} in "
                 f"×{fmt_num(w_steps / s_steps, 2)} the steps and ×{fmt_num(w_tok / s_tok, 2)} the tokens of the "
                 f"fixed batch {fmt_count(summary.get('base_batch'))}")
    elif warm:
        text += f"; the warm-up reached the target in {warm.get('reached')} of {warm.get('runs')} seeds"
    return text + "."


def lm_next_text(summary: Dict[str, Any]) -> Optional[str]:
    """What to do with the language model's answer: grow the batch with the measured
    noise, and whether the LayerNorm layers alone would do to measure it."""
    last = (summary.get("growth") or {}).get("last")
    if not last:
        return None
    text = (f"Next: start small and let the batch follow the measured noise (AdaptiveBatchSampler with a "
            f"NoiseMonitor) — ≈ {fmt_num(last['b_simple'])} sequences (≈ {fmt_num(last['b_simple_tokens'])} tokens) "
            f"by the held-out loss {fmt_num(last['loss'], 3)} in this run")
    ln = summary.get("layernorm") or {}
    lo, hi = ln.get("ratio_range") or (None, None)
    if lo is not None and hi is not None:
        if 0.5 <= lo and hi <= 2.0:
            text += f"; the LayerNorm layers alone tracked it within ×2 (×{fmt_num(lo, 2)}–×{fmt_num(hi, 2)})"
        else:
            text += (f"; the LayerNorm layers alone gave ×{fmt_num(lo, 2)}–×{fmt_num(hi, 2)} of it, so measure "
                     "every layer rather than only them")
    return text + "."


__all__ = ["growth_figure", "layernorm_text", "layers_figure", "lm_next_text", "lm_section", "lm_verdict_text",
           "warmup_figure"]
