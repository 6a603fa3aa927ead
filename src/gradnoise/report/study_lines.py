"""The verdict's sentences from studies that do not answer the batch-size question
themselves but say what acting on the noise, the optimizer, sharp minima, a language
model, clients or a stream did (``STUDY_LINES``: study name ->
``line(summary, anchor) -> Line or None``)."""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Tuple

from .fmt import fmt_num, to_float
from .line import Line
from .federated_section import federated_verdict_text
from .lm_section import lm_next_text, lm_verdict_text
from .online_section import online_verdict_text


def adaptive_line(s: Dict[str, Any], a: str) -> Line:
    """Steps and examples of AdaScale and the noise-driven batch against the fixed small batch."""
    methods = s.get("methods") or {}
    base = methods.get("fixed small") or {}
    b_steps, b_ex = ((base.get(k) or {}).get("mean") for k in ("steps", "examples"))
    line = Line().add(f"Acting on the noise, to the loss {fmt_num(s.get('target_loss'))} from batch "
                      f"{s.get('base_batch')}: ")
    parts = []
    for name in ("AdaScale", "adaptive batch", "Adam + AdaScale (√ gain)"):
        m = methods.get(name) or {}
        steps, ex = ((m.get(k) or {}).get("mean") for k in ("steps", "examples"))
        if steps is None or not b_steps:
            if m:
                parts.append(f"{name} reached it in {m.get('reached')} of {m.get('runs')} seeds")
            continue
        parts.append(f"{name} took ×{fmt_num(steps / b_steps, 2)} the steps and ×{fmt_num(ex / b_ex, 2)} the "
                     "examples of the fixed small batch")
    line.add("; ".join(parts) if parts else "no method reached it", a)
    return line.add(" (fewer steps pay where steps are the cost, as with many devices in parallel).")


def optimizers_line(s: Dict[str, Any], a: str) -> Line:
    """The optimizers whose updates were least and most noisy, and the lowest final loss."""
    opts = {k: v for k, v in (s.get("optimizers") or {}).items() if v.get("median_ratio") is not None}
    if not opts:
        return Line().add("Optimizers: no update noise could be measured.", a)
    quiet = min(opts, key=lambda k: opts[k]["median_ratio"])
    loud = max(opts, key=lambda k: opts[k]["median_ratio"])
    best = min(opts, key=lambda k: opts[k]["final_loss"] if opts[k]["final_loss"] is not None else math.inf)
    line = Line().add(f"Optimizers at batch {s.get('batch_size')}: the update of ")
    line.add(f"{quiet} was the least noisy (noise-to-signal {fmt_num(opts[quiet]['median_ratio'])}) and {loud}'s "
             f"the most ({fmt_num(opts[loud]['median_ratio'])})", a)
    sgd = opts.get("SGD", {}).get("median_ratio")
    if sgd is not None:
        line.add(f", SGD's {fmt_num(sgd)}")
    return line.add(f"; {best} reached the lowest loss ({fmt_num(opts[best]['final_loss'])}).")


def escape_line(s: Dict[str, Any], a: str) -> Line:
    """What the escape study showed: SGD noise against isotropic noise, and the sharpness
    and generalisation of small- against large-batch solutions."""
    more = s.get("sgd_escapes_more_at") or []
    line = Line().add("Noise and sharp minima: ")
    line.add(f"SGD's noise left a sharp well more often than isotropic noise of the same size at B = "
             f"{', '.join(map(str, more))}" if more else "SGD's and isotropic noise escaped a sharp well alike", a)
    small, large = (s.get(k) or {} for k in ("small", "large"))
    e_s, e_l = ((p.get("top_eigenvalue") or {}).get("mean") for p in (small, large))
    g_s, g_l = ((p.get("gap") or {}).get("mean") for p in (small, large))
    if e_s is not None and e_l is not None:
        line.add(f"; the B={s.get('large_batch')} solutions were ×{fmt_num(e_l / e_s, 2)} as sharp as the "
                 f"B={s.get('small_batch')} ones (λ_max {fmt_num(e_l)} against {fmt_num(e_s)})")
        if g_s is not None and g_l is not None:
            line.add(f", with train−test accuracy gaps of {fmt_num(g_l, 2)} and {fmt_num(g_s, 2)}")
    return line.add(".")


def _text_line(text_of: Callable[[Dict[str, Any]], Optional[str]]) -> Callable[[Dict[str, Any], str], Optional[Line]]:
    """A line from a section's ``*_verdict_text(summary)``, linked to its part of the page."""
    def line(s: Dict[str, Any], a: str) -> Optional[Line]:
        text = text_of(s)
        return Line().add(text, a) if text else None
    return line


def lm_next(s: Dict[str, Any]) -> Optional[Line]:
    """The next step from the ``lm`` study (None without a checkpoint)."""
    text = lm_next_text(s)
    return Line().add(text) if text else None


def lm_batch(s: Dict[str, Any]) -> Tuple[Optional[float], bool]:
    """``(batch, lower_bound)`` from the ``lm`` study's last checkpoint: its ``B_simple``
    when the interval is bounded, its lower end when only that is; ``(None, False)``
    when the interval has no positive lower end."""
    last = (s.get("growth") or {}).get("last") or {}
    b = to_float(last.get("b_simple"))
    lo, hi = (to_float(v) for v in (last.get("interval") or [None, None]))
    if not (math.isfinite(lo) and lo > 0 and math.isfinite(b)):
        return None, False
    return (b, False) if math.isfinite(hi) else (lo, True)


STUDY_LINES: Dict[str, Callable[[Dict[str, Any], str], Optional[Line]]] = {
    "adaptive": adaptive_line,
    "optimizers": optimizers_line,
    "escape": escape_line,
    "lm": _text_line(lm_verdict_text),
    "federated": _text_line(federated_verdict_text),
    "online": _text_line(online_verdict_text),
}

__all__ = ["STUDY_LINES", "adaptive_line", "escape_line", "lm_batch", "lm_next", "optimizers_line"]
