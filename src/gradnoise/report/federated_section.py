"""Section of the ``federated`` study: within- against between-client gradient noise per
Dirichlet α, FedAvg's client drift and final loss against the IID split, and the share of
between-client noise round by round — with the one sentence the verdict takes from it.

Numbers are the study's summary (means over seeds with 95 % t-intervals); the per-round
curve is the mean over seeds of each round's between share. A share's interval is
clipped to [0, 1], every other interval to ≥ 0 (DESIGN.md §1: an interval is clipped to
its quantity's domain); an unbiased between-client estimate of an IID split can dip
below 0 and is shown as measured."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import html as h
from .figures import COLORS, Plot, finish, legend, log_axis, new_figure, note_empty
from .files import Input
from .fmt import domain_interval, fmt_count, fmt_num, fmt_with_interval, to_float
from .sections import section, subheading, summary_of, task_of

Items = Sequence[Tuple[str, Input]]
Part = Dict[str, Any]

FEDERATED_TEXT = (
    "The training data are split over K clients, once IID (α = ∞) and then with Dirichlet(α) label skew: for "
    "each class the clients' shares are drawn from Dir(α), so a small α leaves each client few classes. Every "
    "round, at the global weights, each client reports three scalars of a sample of its data — its size, the "
    "sum of its per-sample squared gradient norms (exact, from gradnoise.capture) and the squared norm of its "
    "mean gradient — and the server splits the pooled per-sample noise tr Σ into within-client noise "
    "Σ w_k tr Σ_k (sampling inside a client) and between-client noise Σ w_k ||∇F_k − ∇f||² (clients that "
    "disagree), unbiasedly, with FedProx's dissimilarity B² = Σ w_k ||∇F_k||²/||∇f||² (gradnoise.stats."
    "clients.decompose). Then FedAvg runs the round: a fraction of the clients take several local SGD steps "
    "and the server averages their updates; client drift is the spread of those updates, Σ w_k ||Δ_k − Δ̄||². "
    "Per sample, between-client noise dominates when it exceeds the within-client part (a share above 50 %). "
    "A round sees something else: m of K clients, each averaging a batch of b samples, so the within part "
    "is divided by b and the between part only by the number of clients; its share of a round's gradient "
    "noise says what a larger client batch can fix (the within part) and what only more clients per round, "
    "or a correction of the drift (FedProx, SCAFFOLD), can. Bars and points are means over seeds with "
    "95 % t-intervals; a judgement is made only when the interval lies on one side of 50 %."
)


# ------------------------------------------------------------------------------ data
def _alphas(summary: Dict[str, Any]) -> List[Part]:
    return [p for p in (summary.get("alphas") or []) if isinstance(p, dict)]


def _label(alpha: Any) -> str:
    return fmt_num(alpha, 3)


def _mean(p: Part, key: str) -> float:
    return to_float((p.get(key) or {}).get("mean"))


def _err(parts: List[Part], key: str, top: float = math.inf) -> Tuple[np.ndarray, np.ndarray]:
    """Means ``[A]`` and their error bars ``[2, A]`` (0 where an end is undefined), the
    interval clipped to ``[0, top]``."""
    means = np.array([_mean(p, key) for p in parts], dtype=float)
    err = np.zeros((2, len(parts)))
    for i, p in enumerate(parts):
        lo, hi = domain_interval((p.get(key) or {}).get("interval"))
        m = means[i]
        if math.isfinite(m) and math.isfinite(lo) and math.isfinite(hi):
            err[:, i] = max(m - min(lo, top), 0.0), max(min(hi, top) - m, 0.0)
    return means, err


def _bars(ax, parts: List[Part], keys, labels, title: str, ylabel: str, top: float = math.inf,
          log: bool = False) -> None:
    x = np.arange(len(parts))
    width = 0.8 / len(keys)
    drawn = False
    for j, (key, label) in enumerate(zip(keys, labels)):
        means, err = _err(parts, key, top)
        keep = np.isfinite(means) & ((means > 0) if log else True)
        if keep.any():
            ax.bar(x[keep] + (j - (len(keys) - 1) / 2) * width, means[keep], width, yerr=err[:, keep], capsize=3,
                   color=COLORS[j % len(COLORS)], label=label)
            drawn = True
    if not drawn:
        note_empty(ax)
    elif log:
        log_axis(ax, "y")
    ax.set_xticks(x)
    ax.set_xticklabels([f"α={_label(p.get('alpha'))}" for p in parts], fontsize=8)
    ax.set(title=title, ylabel=ylabel)
    legend(ax, small=True)


def _lines(ax, parts: List[Part], keys, labels, title: str, ylabel: str) -> None:
    x = np.arange(len(parts))
    drawn = False
    for j, (key, label) in enumerate(zip(keys, labels)):
        means, err = _err(parts, key)
        keep = np.isfinite(means)
        if keep.any():
            ax.errorbar(x[keep], means[keep], yerr=err[:, keep], marker="o", capsize=3, color=COLORS[j + 2],
                        label=label)
            drawn = True
    if drawn:
        ax.axhline(1.0, color="#888888", linestyle=":", linewidth=1)
    else:
        note_empty(ax)
    ax.set_xticks(x)
    ax.set_xticklabels([f"α={_label(p.get('alpha'))}" for p in parts], fontsize=8)
    ax.set(title=title, ylabel=ylabel)
    legend(ax, small=True)


def _per_round(ax, rounds: List[Dict[str, Any]], parts: List[Part]) -> None:
    """Mean over seeds of each round's per-sample between share, one line per α."""
    drawn = False
    for j, p in enumerate(parts):
        a = to_float(p.get("alpha"))
        by: Dict[float, List[float]] = {}
        for r in rounds:
            v, k = to_float(r.get("between_share")), to_float(r.get("round"))
            if to_float(r.get("alpha")) == a and math.isfinite(v) and math.isfinite(k):
                by.setdefault(k, []).append(v)
        if by:
            ks = sorted(by)
            ax.plot(ks, [float(np.mean(by[k])) for k in ks], color=COLORS[j % len(COLORS)],
                    label=f"α={_label(a)}")
            drawn = True
    if drawn:
        ax.axhline(0.5, color="#888888", linestyle="--", linewidth=1)
    else:
        note_empty(ax)
    ax.set(title="Between share per round (per sample)", xlabel="round", ylabel="between / tr Σ")
    legend(ax, small=True)


def federated_figure(summary: Dict[str, Any], rounds: List[Dict[str, Any]], name: str, task: str) -> Plot:
    """Four panels: within and between noise per α; the between share per sample and of a
    round's noise against 50 %; drift and final loss relative to IID; the per-round share."""
    parts = _alphas(summary)
    fig, (a, b, c, d) = new_figure(2, 2, width=11.0, row_height=3.8)
    positive = all(_mean(p, k) > 0 for p in parts for k in ("within", "between")) and bool(parts)
    _bars(a, parts, ("within", "between"), ("within-client", "between-client"),
          "Per-sample noise, mean over rounds", "tr Σ part", log=positive)
    _bars(b, parts, ("between_share", "round_between_share"), ("per sample", "of a round's gradient noise"),
          "Between-client share", "share", top=1.0)
    b.axhline(0.5, color="#888888", linestyle="--", linewidth=1)
    b.set_ylim(0, 1.05)
    _lines(c, parts, ("drift_vs_iid", "loss_vs_iid"), ("client drift", "final test loss"),
           "FedAvg against the IID split", "× IID (same seed)")
    _per_round(d, rounds, parts)
    labels = ", ".join(_label(p.get("alpha")) for p in parts)
    alt = (f"Four panels for task {task} over Dirichlet α = {labels}: bars of within- and between-client noise; "
           "bars of the between-client share per sample and of a round's noise with a line at 50 %; client "
           "drift and final test loss relative to the IID split; the between share round by round.")
    caption = ("Bars and points: means over seeds, error bars 95 % t-intervals; dashed lines at 50 % (above: "
               "between-client noise dominates), dotted at 1 (the IID split).")
    return finish(fig, name, alt, caption)


# --------------------------------------------------------------------------- section
def _iv(p: Part, key: str, digits: int = 3, share: bool = False) -> str:
    part = p.get(key) or {}
    iv = part.get("interval")
    if share and isinstance(iv, list) and len(iv) == 2:
        lo, hi = domain_interval(iv)
        iv = [lo, min(hi, 1.0)]
    return fmt_with_interval(part.get("mean"), iv, digits)


def _judged(v: Any) -> str:
    return "yes" if v is True else "no" if v is False else "not determined"


def _part(stem: str, inp: Input) -> Tuple[str, List[Plot]]:
    summary = summary_of(inp)
    rounds = inp.of_type("round")
    plot = federated_figure(summary, rounds, f"{stem}-federated", task_of(inp))
    head = h.para(f"{fmt_count(summary.get('clients'))} clients, {fmt_count(summary.get('clients_per_round'))} "
                  f"per round, {fmt_count(summary.get('rounds'))} rounds of {fmt_count(summary.get('local_steps'))} "
                  f"local SGD steps on batches of {fmt_count(summary.get('local_batch'))} at rate "
                  f"{fmt_num(summary.get('lr'))}; noise measured on up to {fmt_count(summary.get('measure_batch'))} "
                  f"samples per client; {fmt_count(summary.get('test_size'))} held-out test samples; "
                  f"{fmt_count(summary.get('seeds'))} seeds.")
    rows = []
    for p in _alphas(summary):
        sizes = p.get("client_sizes") or [None, None]
        rows.append((_label(p.get("alpha")), f"{fmt_count(sizes[0])}–{fmt_count(sizes[-1])}",
                     _iv(p, "between_share", 2, share=True), _judged(p.get("heterogeneity_dominates")),
                     _iv(p, "round_between_share", 2, share=True), _judged(p.get("round_dominates")),
                     _iv(p, "dissimilarity_sq"), _iv(p, "drift_vs_iid"), _iv(p, "final_loss"),
                     _iv(p, "loss_vs_iid"), _iv(p, "final_accuracy", 2)))
    table = h.table(("α", "client sizes", "between share per sample", "dominates per sample",
                     "between share of a round", "dominates a round", "B²", "drift × IID", "final test loss",
                     "loss × IID", "final accuracy"), rows)
    body = subheading(inp) + head + h.figure(plot) + table
    verdict = federated_verdict_text(summary)
    if verdict:
        body += h.para(verdict)
    if not rounds:
        body += h.note("This file has no rounds yet.")
    return body, [plot]


def federated_section(items: Items) -> h.Section:
    """Within- and between-client noise under FedAvg (study ``federated``)."""
    return section("federated", "Federated: client heterogeneity against sampling noise", FEDERATED_TEXT, items,
                   _part)


# --------------------------------------------------------------------------- verdict
def _pct(p: Part, key: str) -> str:
    v = _mean(p, key)
    return f"{fmt_num(100 * max(v, 0.0), 2)} %" if math.isfinite(v) else "—"


def federated_verdict_text(summary: Dict[str, Any]) -> Optional[str]:
    """One sentence: from which α down client heterogeneity dominates the gradient noise
    (per sample, else in a round's gradient), how large its share is there and what that
    means for the client batch; else that sampling dominates down to the smallest α, or
    that the seeds cannot tell. None when no α has a between share."""
    parts = [p for p in _alphas(summary) if math.isfinite(_mean(p, "between_share"))]
    if not parts:
        return None
    per_sample, per_round = summary.get("dominates_from"), summary.get("round_dominates_from")
    seeds = fmt_count(summary.get("seeds"))
    b, m, K = (fmt_count(summary.get(k)) for k in ("local_batch", "clients_per_round", "clients"))
    lowest = min(parts, key=lambda p: to_float(p.get("alpha")))
    if per_sample is not None or per_round is not None:
        a = to_float(per_sample if per_sample is not None else per_round)
        where = "at every α, IID included" if math.isinf(a) else f"at α ≤ {_label(a)}"
        at = f"at α = {_label(lowest.get('alpha'))}"
        if per_sample is not None:
            what = f"between-client noise is {_pct(lowest, 'between_share')} of the per-sample noise {at}"
        else:
            what = (f"between-client noise is {_pct(lowest, 'round_between_share')} of a round's gradient noise "
                    f"{at} ({b}-sample client batches, {m} of {K} clients per round; "
                    f"{_pct(lowest, 'between_share')} per sample)")
        text = (f"Client heterogeneity, not sampling, dominates the gradient noise {where}: {what}; larger client "
                "batches will not reduce it — more clients per round will, and fewer local steps or a drift "
                "correction (FedProx, SCAFFOLD) limit the client drift it causes")
        d, l = _mean(lowest, "drift_vs_iid"), _mean(lowest, "loss_vs_iid")
        if math.isfinite(d) and math.isfinite(l) and not math.isinf(to_float(lowest.get("alpha"))):
            text += (f" (there the drift was ×{fmt_num(d, 2)} and the final test loss ×{fmt_num(l, 2)} the IID "
                     "split's)")
        open_ = [p for p in parts if p.get("round_dominates") is None and to_float(p.get("alpha")) > a]
        if open_:
            text += (f"; at α = {', '.join(_label(p.get('alpha')) for p in open_)} the {seeds} seeds do not tell "
                     "either way")
        return text + "."
    somewhere = [p for p in parts if p.get("round_dominates") is True or p.get("heterogeneity_dominates") is True]
    if somewhere:
        return (f"Client heterogeneity dominates a round's gradient noise at α = "
                f"{', '.join(_label(p.get('alpha')) for p in somewhere)} but not at the smaller α = "
                f"{_label(lowest.get('alpha'))} (between-client share {_pct(lowest, 'round_between_share')} there): "
                f"not a pattern to act on from {seeds} seeds; run more.")
    unsure = [p for p in parts if p.get("round_dominates") is None]
    if unsure:
        return (f"Whether client heterogeneity dominates a round's gradient noise is not determined from {seeds} "
                f"seeds at α = {', '.join(_label(p.get('alpha')) for p in unsure)} (between-client share "
                f"{', '.join(_pct(p, 'round_between_share') for p in unsure)}): run more seeds before acting on it.")
    return (f"Sampling, not client heterogeneity, dominates the gradient noise down to α = "
            f"{_label(lowest.get('alpha'))}: between-client noise is {_pct(lowest, 'round_between_share')} of a "
            f"round's gradient noise there ({_pct(lowest, 'between_share')} per sample), so larger client batches "
            "reduce it.")


__all__ = ["FEDERATED_TEXT", "federated_figure", "federated_section", "federated_verdict_text"]
