"""One line per study result, for the end of ``gradnoise study``."""
from __future__ import annotations

import math
from typing import Any, Optional


def _f(v: Any, spec: str = ".3g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if v in ("inf", "-inf") or (isinstance(v, float) and math.isinf(v)):
        return "∞" if v in ("inf", math.inf) else "−∞"
    return format(v, spec)


def _interval(iv) -> str:
    return f"[{_f(iv[0])}, {_f(iv[1])}]" if iv else "[—, —]"


def line(study: str, task: str, s: dict) -> str:
    """A readable one-line summary of a study's ``summary`` dict."""
    head = f"{study:<15}{task:<24}"
    if study == "law":
        where = f" ({s.get('checkpoint')}, B={s.get('batch_size')})" if s.get("checkpoint") else ""
        return head + (f"measured E||ĝ_B − ∇J||² vs tr(Σ)/B·(N−B)/(N−1): largest deviation "
                       f"{_f(s['max_abs_z'], '.2f')} standard errors{where} over {s['points']} points")
    if study == "trajectory":
        return head + (f"final loss {_f(s['final_loss'], '.4f')}; smoothed B_simple {_f(s['b_simple_first'])} "
                       f"-> {_f(s['b_simple_last'])} {_interval(s['b_simple_interval'])}")
    if study == "critical-batch":
        return head + (f"B_crit {_f(s['b_crit'])} {_interval(s['b_crit_interval'])} from {s['points']} runs; "
                       f"B_simple measured along the way {_f(s['b_simple'])}" + _reason(s.get("reason")))
    if study == "lr-batch":
        stable = s.get("stable_fit") or {}
        return head + (f"best rate ε(B) = {_f(s['eps_max'])}/(1 + {_f(s['b_noise'])}/B), B_noise "
                       f"{_interval(s['b_noise_interval'])}; largest stable rate: B_noise {_f(stable.get('b_noise'))} "
                       f"{_interval(stable.get('b_noise_interval'))}; B_simple at init {_f(s['b_simple'])}"
                       + _reason(s.get("reason")))
    if study == "recommend":
        rules = "; ".join(f"B={r['to_batch']}: ×{_f(r['linear'])}/×{_f(r['sqrt'])}/×{_f(r['adascale'])}"
                          for r in s["rules"][:4])
        return head + (f"B_crit ≈ {_f(s['b_crit'])} {_interval(s['b_crit_interval'])} at batch "
                       f"{s['batch_size']}; lr linear/sqrt/AdaScale: {rules}" + _reason(s.get("reason")))
    return head + str(s)


def _reason(r: Optional[str]) -> str:
    return f" (note: {r})" if r else ""
