"""The verdict: one answer per task, from every study file and run file of the page.

"Batch size ≈ X and learning rate ≈ Y, for this stage, because …" — decided as a
:class:`~gradnoise.report.decision.TaskVerdict` and written by its ``headline``, so that it
agrees with every number below it on the page. For a study task:

* **batch size** — the critical batch size ``B_crit`` fitted by ``critical-batch`` (steps
  and examples to a target loss) is the answer for the stage up to that target; the
  noise scale ``B_simple`` of ``trajectory`` is the answer at the run's end. The two are
  compared, and when they differ the verdict says why: the noise scale grows as the loss
  falls (McCandlish et al. 2018, §3), so a value measured later, at a lower loss, is
  larger (DESIGN.md §1). The ``lm`` study answers for its language model.
* **learning rate** for that batch — ``ε(B) = ε_max/(1 + B_noise/B)`` fitted by
  ``lr-batch`` to the best rate of each batch size, or the best measured rate at the
  nearest batch size, with the rule the best rates support (linear ``ε ∝ B``, square
  root ``ε ∝ √B`` or the law; least squares in log ε, Akaike's criterion); without
  ``lr-batch``, the AdaScale multiplier for a move from the run's batch size.
* **what to do next**, and, when the data cannot support an answer, why and what to run.

A run file given on its own gets :func:`~gradnoise.report.run_verdict.run_verdict`. At
most three reasons; what the other studies found stays in their own sections. Every number
carries the anchor of the part of the page it comes from. Pure function of the report's
inputs (:class:`~gradnoise.report.files.Input`).
"""
from __future__ import annotations

import math
import re
import textwrap
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..stats import rules
from .decision import (Stage, TaskVerdict, answer, determined, iv_text, next_step, round_batch, stage,
                       summary_of, trend)
from .files import PROBE_FORMAT, RUN_FORMAT, Input
from .fmt import domain_interval, fmt_count, fmt_factor, fmt_lr, fmt_num, fmt_text, to_float
from .line import Line, anchor
from .lm_calibration import calibration_text
from .lm_section import lm_next_text, lm_verdict_text
from .probe_verdict import calibration, probe_verdict
from .run_verdict import run_verdict

MONITOR = "a NoiseMonitor in your loop tracks B_simple"


# ------------------------------------------------------------------ reading the inputs
@dataclass
class _Facts:
    """What the studies of one task say, read from their files."""

    task: str
    trajectory: Optional[Input] = None
    critical: Optional[Input] = None
    lr_batch: Optional[Input] = None
    lm: Optional[Input] = None
    probe: Optional[Input] = None
    run: Optional[Input] = None        # a run file given on its own
    run_anchor: Optional[str] = None
    calibration: Optional[Dict[str, Optional[float]]] = None  # a run file's, from the page's one probe


def _group(inputs: Sequence[Input], stems: Sequence[str]) -> List[_Facts]:
    by_task: Dict[str, _Facts] = {}
    out: List[_Facts] = []
    for inp, stem in zip(inputs, stems):
        if inp.format == PROBE_FORMAT:
            task = fmt_text(inp.header.get("task"))
            by_task.setdefault(task, _Facts(task)).probe = inp
            continue
        if inp.format == RUN_FORMAT:
            out.append(_Facts(inp.path.name, run=inp, run_anchor=f"run-{stem}"))
            continue
        task = fmt_text(inp.header.get("task"))
        attr = {"trajectory": "trajectory", "critical-batch": "critical", "lr-batch": "lr_batch",
                "lm": "lm"}.get(inp.study)
        if attr is None:
            continue
        facts = by_task.get(task)
        if facts is None:
            facts = by_task[task] = _Facts(task)
        setattr(facts, attr, inp)
    return list(by_task.values()) + out


# ------------------------------------------------------------------ learning-rate rules
def rule_fits(points: Sequence[Tuple[float, float]], law_rms: Optional[float]) -> Dict[str, float]:
    """rms log-residual of each rule fitted to best rates ``[(B, lr)]``: ``linear``
    (ε ∝ B), ``sqrt`` (ε ∝ √B), ``constant`` (ε independent of B), each with its scale
    fitted in log space, and ``law`` (the two-parameter ``ε(B)`` fit, given)."""
    b = np.log([p[0] for p in points])
    y = np.log([p[1] for p in points])
    out = {}
    for name, slope in (("linear", 1.0), ("sqrt", 0.5), ("constant", 0.0)):
        r = y - slope * b
        out[name] = float(np.sqrt(np.mean((r - r.mean()) ** 2)))
    if law_rms is not None and math.isfinite(law_rms):
        out["law"] = float(law_rms)
    return out


def supported_rule(fits: Dict[str, float], n: int) -> str:
    """The rule the points support: least Akaike criterion ``n log(rms²) + 2k`` (``k`` = 1
    for the one-parameter rules, 2 for the law)."""
    def aic(name: str) -> float:
        k = 2 if name == "law" else 1
        return n * math.log(max(fits[name], 1e-6) ** 2) + 2 * k
    return min(fits, key=aic)


RULE_TEXT = {
    "linear": "the linear rule ε ∝ B",
    "sqrt": "the square-root rule ε ∝ √B",
    "constant": "no scaling (the best rate does not move with B)",
    "law": "the law ε(B): linear well below B_noise, flat above it (as AdaScale)",
}


# ------------------------------------------------------------------ one task
def _task_verdict(f: _Facts) -> TaskVerdict:
    if f.run is not None:
        return run_verdict(f.run, f.run_anchor, f.calibration)
    if f.probe is not None and f.critical is None and f.trajectory is None and f.lm is None:
        return probe_verdict(f.probe, anchor("probe", f.task))
    crit, lrb = summary_of(f.critical), summary_of(f.lr_batch)
    crit_a, lr_a = anchor("critical-batch", f.task), anchor("lr-batch", f.task)
    st = None
    if f.trajectory is not None and f.trajectory.run is not None:
        losses = {to_float(r.get("step")): to_float(r.get("full_loss")) for r in f.trajectory.of_type("step")}
        st = stage(*f.trajectory.run, anchor("trajectory", f.task), losses)
    b_crit, target = to_float(crit.get("b_crit")), to_float(crit.get("target_loss"))
    because: List[Line] = []
    batch, lower = None, False
    if math.isfinite(b_crit):
        batch = b_crit
        because.append(_critical_line(crit, crit_a, b_crit, target))
    elif f.critical is not None:
        because.append(Line().add("The critical-batch fit gives no B_crit (").add(
            _short_reason(crit.get("reason")), crit_a).add(")."))
    if st is not None:
        because.append(_stage_line(st, crit, b_crit, target))
        if batch is None and determined(st.interval):
            batch, lower = answer(st.last, st.interval)
    basis = "B_crit" if math.isfinite(b_crit) else "B_simple"
    nxt = None
    if batch is None and f.lm is not None:  # the language model's own answer: its noise scale at the run's end
        lm = summary_of(f.lm)
        batch, lower = _lm_batch(lm)
        basis = "lm"
        for text in (lm_verdict_text(lm), calibration_text(lm)):
            if text:
                because.append(Line().add(text, anchor("lm", f.task)))
        nxt = lm_next_text(lm)
    if batch is None:
        return TaskVerdict(f.task, False, because[:2], _what_to_run(f, crit, st))
    stage_text = (f"for the stage up to the loss {fmt_num(target)}" if math.isfinite(b_crit)
                  else "at the stage this run reached")
    v = TaskVerdict(f.task, True, because[:2], Line(), round_batch(batch), lower, basis, stage=stage_text)
    lr_line = _learning_rate(v, lrb, lr_a, st)
    if lr_line is not None:
        v.because.append(lr_line)
    v.next_step = Line().add(nxt) if nxt else next_step(st, batch, b_crit, MONITOR)
    return v


def _critical_line(crit: Dict[str, Any], crit_a: str, b_crit: float, target: float) -> Line:
    line = Line().add("To reach the loss ").add(fmt_num(target), crit_a).add(
        ", steps and examples across batch sizes give the critical batch size B_crit ≈ ").add(
        fmt_num(b_crit), crit_a).add(f" ({iv_text(domain_interval(crit.get('b_crit_interval')))})")
    along = to_float(crit.get("b_simple"))
    if not math.isfinite(along):
        return line.add(".")
    lo_c, hi_c = domain_interval(crit.get("b_crit_interval"))
    agree = lo_c / 2 <= along <= 2 * hi_c
    return line.add("; the noise scale B_simple measured along those runs, ").add(fmt_num(along), crit_a).add(
        ", " + ("agrees with it." if agree else "differs from it by more than 2× — take B_crit as the measured "
                "answer."))


def _stage_line(st: Stage, crit: Dict[str, Any], b_crit: float, target: float) -> Line:
    loss_txt = f", loss {fmt_num(st.loss)}" if math.isfinite(st.loss) else ""
    line = Line().add(f"The noise scale at the end of the trajectory run (step {fmt_count(st.step)}{loss_txt}) is "
                      "B_simple ≈ ").add(fmt_num(st.last), st.anchor).add(f" ({iv_text(st.interval)}){trend(st)}")
    if not math.isfinite(b_crit):
        return line.add(".")
    lo_c, hi_c = domain_interval(crit.get("b_crit_interval"))
    later = math.isfinite(st.loss) and math.isfinite(target) and st.loss < target
    if st.interval[0] > hi_c:
        return line.add(". It is larger than B_crit because it is measured later"
                        + (f", at a lower loss ({fmt_num(st.loss)} < target {fmt_num(target)})" if later else "")
                        + ": the batch worth using grows as training goes on.")
    if math.isfinite(st.interval[1]) and st.interval[1] < lo_c:
        return line.add(". It is smaller than B_crit; the fit averages over the whole way to the target.")
    return line.add("; it is consistent with B_crit.")


def _learning_rate(v: TaskVerdict, lrb: Dict[str, Any], lr_a: str, st: Optional[Stage]) -> Optional[Line]:
    """The learning rate for ``v.batch`` (set on ``v``) and its reason (None without one)."""
    b = v.batch
    if not lrb:
        if st is None or not math.isfinite(st.batch_size):
            return None
        b_noise = st.interval[0] if v.lower_bound else st.last  # the value the batch rests on
        v.lr_factor, v.lr_rule, v.lr_anchor = rules.adascale(st.batch_size, b, b_noise), "adascale", st.anchor
        return (Line().add(f"No learning-rate study: moving from the run's batch {fmt_count(st.batch_size)} to {b}, "
                           f"multiply a learning rate tuned at {fmt_count(st.batch_size)} by the AdaScale gain "
                           f"(1 + B_simple/B)/(1 + B_simple/B′) with B_simple = {fmt_num(b_noise)}: ×")
                .add(fmt_factor(v.lr_factor), st.anchor)
                .add(" (gradnoise study lr-batch measures the rate itself)."))
    best = [(to_float(x), to_float(lr)) for x, lr in (lrb.get("best") or [])]
    best = [(x, lr) for x, lr in best if x > 0 and lr > 0]
    eps_max, b_noise = to_float(lrb.get("eps_max")), to_float(lrb.get("b_noise"))
    near = min(best, key=lambda p: abs(math.log(p[0] / b)), default=None)
    v.lr_anchor = lr_a
    if math.isfinite(eps_max) and math.isfinite(b_noise):
        v.lr, v.lr_rule = rules.optimal_lr(b, eps_max, b_noise), "law"
        line = Line().add(f"For batch {b} the best-rate law ε(B) = ").add(fmt_lr(eps_max), lr_a).add(
            "/(1 + ").add(fmt_num(b_noise), lr_a).add(f"/B) gives ε ≈ {fmt_lr(v.lr)}")
        if near is not None:
            line.add(f"; the best rate measured at B={fmt_count(near[0])} was ").add(fmt_lr(near[1]), lr_a)
    elif near is not None:
        v.lr, v.lr_rule = near[1], "grid"
        line = Line().add(f"For batch {b}: the best rate of the grid at B={fmt_count(near[0])} was ").add(
            fmt_lr(near[1]), lr_a).add(" (the law ε(B) could not be fitted: " + _short_reason(lrb.get("reason"))
                                       + ")")
    else:
        return None
    if len(best) >= 3:
        fits = rule_fits(best, to_float(lrb.get("rms")) if lrb.get("b_noise") is not None else None)
        lo, hi = best[0], best[-1]
        line.add(f". The best rates rose ×{fmt_factor(hi[1] / lo[1])} while the batch grew "
                 f"×{fmt_factor(hi[0] / lo[0])}: they support {RULE_TEXT[supported_rule(fits, len(best))]}")
    return line.add(".")


def _lm_batch(s: Dict[str, Any]) -> Tuple[Optional[float], bool]:
    """``(batch, lower_bound)`` from the ``lm`` study: the critical batch its last branch
    probe measured where that is determined (the calibrated answer), else its last
    checkpoint's ``B_simple``; ``(None, False)`` when neither interval has a positive
    lower end."""
    probe = (s.get("calibration") or {}).get("last") or {}
    b_crit = probe.get("b_crit") or [None, None, None]
    if b_crit[0] is not None and determined(domain_interval(b_crit[1:])):
        return answer(to_float(b_crit[0]), domain_interval(b_crit[1:]))
    last = (s.get("growth") or {}).get("last") or {}
    b, iv = to_float(last.get("b_simple")), domain_interval(last.get("interval"))
    if not (determined(iv) and math.isfinite(b)):
        return None, False
    return answer(b, iv)


def _short_reason(reason: Any) -> str:
    """The root cause among a study's notes: the first one (the ``no …`` conclusion that
    follows from it is left out)."""
    parts = [p for p in str(reason or "").split("; ") if p]
    causes = [p for p in parts if not p.startswith("no ")]
    text = (causes or parts or ["no reason recorded"])[0]
    return text + (f" (and {len(causes) - 1} more note{'s' if len(causes) > 2 else ''})" if len(causes) > 1 else "")


def _what_to_run(f: _Facts, crit: Dict[str, Any], st: Optional[Stage]) -> Line:
    """The command(s) that would give the missing answer."""
    reason = str(crit.get("reason") or "")
    flags = [flag for needle, flag in (("first evaluation", "--target-loss <a lower loss>"),
                                       ("grid", "--lrs <a wider grid>"),
                                       ("do not bend", "--batch-sizes <a wider sweep>")) if needle in reason]
    asks = []
    if f.critical is None or flags:
        asks.append(" ".join(["gradnoise study critical-batch"] + flags))
    if st is None or not determined(st.interval):
        asks.append("gradnoise study trajectory (more steps) or a longer NoiseMonitor run")
    return Line().add("Run instead: " + "; or ".join(asks) + ".")


# ------------------------------------------------------------------ the page's verdict
def verdicts(inputs: Sequence[Input], stems: Sequence[str]) -> List[TaskVerdict]:
    """One :class:`TaskVerdict` per task (and per run file given on its own) that has a
    study able to answer (trajectory, critical-batch, lr-batch, lm or a run file)."""
    groups = _group(inputs, stems)
    probes = [g.probe for g in groups if g.probe is not None]
    if len(probes) == 1:  # one probe on the page calibrates the runs' noise scale
        for g in groups:
            g.calibration = calibration(probes[0]) if g.run is not None else None
    return [_task_verdict(g) for g in groups]


WIDTH = 100  # the terminal's (and the README's) verdict lines, in columns
_NBSP = "\u00a0"
_GLUE = re.compile(r"\S+ %|≈ \S+|×\S+|\[[^\]\n]*\]")  # "95 %", "≈ 23", "×0.5", "[0.2, 0.5]" stay whole


def _fold(line: str, width: int = WIDTH) -> List[str]:
    """One line folded to ``width`` columns, a bullet's continuation indented under its text."""
    body = line.lstrip(" ")
    indent = " " * (len(line) - len(body))
    more = indent + ("  " if body.startswith("- ") else "")
    glued = _GLUE.sub(lambda m: m.group(0).replace(" ", _NBSP), body)
    return [x.replace(_NBSP, " ") for x in textwrap.wrap(glued, width, initial_indent=indent, subsequent_indent=more,
                                                           break_long_words=False, break_on_hyphens=False)]


def text_lines(found: Sequence[TaskVerdict], failures: Sequence[str] = (), width: Optional[int] = None) -> List[str]:
    """The verdict as plain text lines, for the end of ``gradnoise study`` / ``report``:
    per task its headline, its reasons and its next step; folded to ``width`` columns (a
    longer word stays whole) where given, else one line per sentence."""
    out = ["verdict:"]
    for v in found:
        out.append(f"  {v.name}: {v.headline.text}")
        out += [f"    - {b.text}" for b in v.because]
        out.append(f"    {v.next_step.text}")
    out += [f"  not in this verdict: {f}" for f in failures]
    if len(out) == 1:
        return []
    return [x for line in out for x in _fold(line, width)] if width else out


__all__ = ["Line", "TaskVerdict", "anchor", "rule_fits", "supported_rule", "text_lines", "verdicts", "WIDTH"]
