"""One line per study result, for the end of ``gradnoise study``."""
from __future__ import annotations

import math
from typing import Any, Optional


def fmt(v: Any, spec: str = ".3g") -> str:
    """A number for people: ``—`` when missing or NaN, ``∞``/``−∞`` when unbounded."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if v in ("inf", "-inf") or (isinstance(v, float) and math.isinf(v)):
        return "∞" if v in ("inf", math.inf) else "−∞"
    return format(v, spec)


def _interval(iv) -> str:
    return f"[{fmt(iv[0])}, {fmt(iv[1])}]" if iv else "[—, —]"


def line(study: str, task: str, s: dict) -> str:
    """A readable one-line summary of a study's ``summary`` dict."""
    head = f"{study:<15}{task:<24}"
    if study == "law":
        where = f" ({s.get('checkpoint')}, B={s.get('batch_size')})" if s.get("checkpoint") else ""
        return head + (f"measured E||ĝ_B − ∇J||² vs tr(Σ)/B·(N−B)/(N−1): largest deviation "
                       f"{fmt(s['max_abs_z'], '.2f')} standard errors{where} over {s['points']} points")
    if study == "trajectory":
        return head + (f"final loss {fmt(s['final_loss'], '.4f')}; smoothed B_simple {fmt(s['b_simple_first'])} "
                       f"-> {fmt(s['b_simple_last'])} {_interval(s['b_simple_interval'])}")
    if study == "critical-batch":
        return head + (f"B_crit {fmt(s['b_crit'])} {_interval(s['b_crit_interval'])} from {s['points']} runs; "
                       f"B_simple measured along the way {fmt(s['b_simple'])}" + _reason(s.get("reason")))
    if study == "lr-batch":
        stable = s.get("stable_fit") or {}
        return head + (f"best rate ε(B) = {fmt(s['eps_max'])}/(1 + {fmt(s['b_noise'])}/B), B_noise "
                       f"{_interval(s['b_noise_interval'])}; largest stable rate: B_noise {fmt(stable.get('b_noise'))} "
                       f"{_interval(stable.get('b_noise_interval'))}; B_simple at init {fmt(s['b_simple'])}"
                       + _reason(s.get("reason")))
    if study == "recommend":
        rules = "; ".join(f"B={r['to_batch']}: ×{fmt(r['linear'])}/×{fmt(r['sqrt'])}/×{fmt(r['adascale'])}"
                          for r in s["rules"][:4])
        return head + (f"B_crit ≈ {fmt(s['b_crit'])} {_interval(s['b_crit_interval'])} at batch "
                       f"{s['batch_size']}; lr linear/sqrt/AdaScale: {rules}" + _reason(s.get("reason")))
    return head + str(s)


def _reason(r: Optional[str]) -> str:
    return f" (note: {r})" if r else ""
