"""One line per study result, for the end of ``gradnoise study``. Numbers are printed as
on the report's page (:mod:`gradnoise.numbers`): "—" for an undefined one, "≥ 66"
for a lower bound, "not determined" for an interval with no bound."""
from __future__ import annotations

from typing import Optional

from ..numbers import fmt_count, fmt_num, fmt_with_interval


def law_line(s: dict) -> str:
    where = f" ({s.get('checkpoint')}, B={s.get('batch_size')})" if s.get("checkpoint") else ""
    return (f"measured E||ĝ_B − ∇J||² vs tr(Σ)/B·(N−B)/(N−1): largest deviation "
            f"{fmt_num(s.get('max_abs_z'))} standard errors{where} over {fmt_count(s.get('points'))} points")


def trajectory_line(s: dict) -> str:
    first = fmt_with_interval(s.get("b_simple_first"), s.get("b_simple_first_interval"))
    at = f" at step {s['b_simple_first_step']}" if s.get("b_simple_first_step") is not None else ""
    return (f"final loss {fmt_num(s.get('final_loss'))}; smoothed B_simple {first}{at} "
            f"-> {fmt_with_interval(s.get('b_simple_last'), s.get('b_simple_interval'))} at the end")


def critical_line(s: dict) -> str:
    b_crit = fmt_with_interval(s.get("b_crit"), s.get("b_crit_interval"))
    if s.get("b_crit") is None and s.get("b_crit_bound"):
        b_crit = f"— ({s['b_crit_bound']}, beyond the sweep)"
    return (f"B_crit {b_crit} from {fmt_count(s.get('points'))} usable runs; B_simple measured along the way "
            f"{fmt_num(s.get('b_simple'))}" + _reason(s.get("reason")))


def lr_batch_line(s: dict) -> str:
    stable = s.get("stable_fit") or {}
    best = (f"best rate ε(B) = {fmt_num(s.get('eps_max'))}/(1 + B_noise/B), B_noise "
            f"{fmt_with_interval(s.get('b_noise'), s.get('b_noise_interval'))}") if s.get("b_noise") is not None \
        else "best rate: no fit (—)"
    return (f"{best}; largest stable rate: B_noise "
            f"{fmt_with_interval(stable.get('b_noise'), stable.get('b_noise_interval'))}; B_simple at init "
            f"{fmt_num(s.get('b_simple'))}" + _reason(s.get("reason")))


def optimizers_line(s: dict) -> str:
    opts = s.get("optimizers") or {}
    parts = [f"{name} {fmt_num(o.get('final_loss'))} ({fmt_num(o.get('median_ratio'))})" for name, o in opts.items()]
    return f"B={s.get('batch_size')}: final loss (update noise-to-signal) " + ", ".join(parts)


def adaptive_line(s: dict) -> str:
    parts = []
    for name, m in (s.get("methods") or {}).items():
        steps = (m.get("steps") or {}).get("mean")
        parts.append(f"{name} {fmt_num(steps)} ({m.get('reached')}/{m.get('runs')})")
    return f"steps to loss {fmt_num(s.get('target_loss'))} (runs that reached it): " + ", ".join(parts)


def escape_line(s: dict) -> str:
    more = s.get("sgd_escapes_more_at") or []
    walk = (f"SGD noise left a sharp well more often than isotropic noise of the same size at B={','.join(map(str, more))}"
            if more else "SGD and isotropic noise of the same size escaped alike")
    small, large = s.get("small") or {}, s.get("large") or {}

    def eig(part):
        e = part.get("top_eigenvalue") or {}
        return fmt_with_interval(e.get("mean"), e.get("interval"))

    return (f"{walk}; λ_max of B={s.get('small_batch')} vs B={s.get('large_batch')} solutions: {eig(small)} vs "
            f"{eig(large)}" + _reason(s.get("reason")))


def recommend_line(s: dict) -> str:
    rules = "; ".join(f"B={r['to_batch']}: ×{fmt_num(r['linear'])}/×{fmt_num(r['sqrt'])}/×{fmt_num(r['adascale'])}"
                      for r in s.get("rules", [])[:4])
    return (f"noise scale B_simple {fmt_with_interval(s.get('b_crit'), s.get('b_crit_interval'))} at step "
            f"{fmt_count(s.get('step'))} of a run at batch {fmt_count(s.get('batch_size'))}; lr multipliers "
            f"linear/sqrt/AdaScale: {rules}" + _reason(s.get("reason")))


def _reason(r: Optional[str]) -> str:
    return f" (note: {r})" if r else ""
