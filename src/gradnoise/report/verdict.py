"""The verdict: one answer per task, from every study file and run file of the page.

"At this stage of training, batch size ≈ X and learning rate ≈ Y, because …", built so
that it agrees with every number below it on the page:

* **batch size** — the critical batch size ``B_crit`` fitted by ``critical-batch`` (steps
  and examples to a target loss) is the answer for the stage up to that target; the
  noise scale ``B_simple`` of ``trajectory`` (or of a run file) is the answer at the
  run's end. The two are compared, and when they differ the verdict says why: the noise
  scale grows as the loss falls (McCandlish et al. 2018, §3), so a value measured later,
  at a lower loss, is larger (DESIGN.md §1).
* **learning rate** for that batch — ``ε(B) = ε_max/(1 + B_noise/B)`` fitted by
  ``lr-batch`` to the best rate of each batch size, or the best measured rate at the
  nearest batch size; without ``lr-batch``, the AdaScale multiplier for a move from the
  run's batch size.
* **which learning-rate rule the data support** — the best rates against batch size
  compared with the linear rule ``ε ∝ B``, the square-root rule ``ε ∝ √B`` and the
  ``ε(B)`` law (least squares in log ε, each rule's scale fitted; two-parameter law
  preferred only when it fits clearly better — Akaike's criterion).
* **what to do next**, and, when the data cannot support an answer, that it cannot and
  what to run instead.

Every number carries the anchor of the part of the page it comes from. Pure function of
the report's inputs (:class:`~gradnoise.report.files.Input`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .files import RUN_FORMAT, Input
from .fmt import domain_interval, fmt_count, fmt_interval, fmt_num, fmt_text, to_float
from .line import Line, anchor
from .series import noise_series
from .study_lines import STUDY_LINES, lm_batch, lm_next


@dataclass
class TaskVerdict:
    """The verdict for one task (or one run file).

    Attributes:
        name: the task's or run file's name.
        headline: the answer (or that there is none) in one sentence.
        because: the reasons, one sentence each.
        next_step: what to do next.
        answered: False when the data cannot support a batch-size answer.
    """

    name: str
    headline: Line
    because: List[Line]
    next_step: Line
    answered: bool


# ------------------------------------------------------------------ reading the inputs
@dataclass
class _Facts:
    """What the studies of one task say, read from their files."""

    task: str
    law: Optional[Input] = None
    trajectory: Optional[Input] = None
    critical: Optional[Input] = None
    lr_batch: Optional[Input] = None
    more: Dict[str, Input] = field(default_factory=dict)   # study -> file, for STUDY_LINES
    run: Optional[Input] = None        # a run file given on its own
    run_anchor: Optional[str] = None


def _summary(inp: Optional[Input]) -> Dict[str, Any]:
    found = inp.of_type("summary") if inp is not None else []
    return found[-1] if found else {}


def _group(inputs: Sequence[Input], stems: Sequence[str]) -> List[_Facts]:
    by_task: Dict[str, _Facts] = {}
    out: List[_Facts] = []
    for inp, stem in zip(inputs, stems):
        if inp.format == RUN_FORMAT:
            out.append(_Facts(inp.path.name, run=inp, run_anchor=f"run-{stem}"))
            continue
        task = fmt_text(inp.header.get("task"))
        attr = {"law": "law", "trajectory": "trajectory", "critical-batch": "critical",
                "lr-batch": "lr_batch"}.get(inp.study)
        if attr is None and inp.study not in STUDY_LINES:
            continue
        facts = by_task.get(task)
        if facts is None:
            facts = by_task[task] = _Facts(task)
        if attr is None:
            facts.more[inp.study] = inp
        else:
            setattr(facts, attr, inp)
    return list(by_task.values()) + out


# ------------------------------------------------------------------ the noise scale along a run
@dataclass
class _Stage:
    """The smoothed noise scale at the start and end of a run, with the loss there."""

    first: float           # the first smoothed value with a bounded interval
    first_step: float
    low: float             # the lowest such value, and its step
    low_step: float
    last: float
    interval: Tuple[float, float]
    step: float
    batch_size: float
    loss: float            # full-data loss at the end (NaN for a run file)
    anchor: str


def _stage(inp: Input, header: Dict[str, Any], steps, anchor_id: str) -> Optional[_Stage]:
    series = noise_series(header, steps)
    b = series.smoothed["b_simple"]
    low, high = series.b_band
    ok = np.flatnonzero(np.isfinite(b))
    if not ok.size:
        return None
    bounded = np.flatnonzero(np.isfinite(b) & np.isfinite(high))  # values worth quoting
    i, j = int(bounded[0] if bounded.size else ok[0]), int(ok[-1])
    k = int(bounded[np.argmin(b[bounded])]) if bounded.size else i  # the lowest, after an early transient
    sizes = [to_float(s.get("batch_size")) for s in steps]
    losses = [to_float(r.get("full_loss")) for r in inp.of_type("step")] if inp.format != RUN_FORMAT else []
    finite = [v for v in losses if math.isfinite(v)]
    return _Stage(float(b[i]), float(series.step[i]), float(b[k]), float(series.step[k]), float(b[j]),
                  domain_interval([low[j], high[j]]),
                  float(series.step[j]),
                  float(np.median([v for v in sizes if math.isfinite(v)] or [math.nan])),
                  finite[-1] if finite else math.nan, anchor_id)


def _grew(st: _Stage) -> bool:
    """The noise scale ends well above its lowest (bounded) value, reached before the end."""
    return st.last > 1.5 * st.low and st.low_step < st.step


def _fell(st: _Stage) -> bool:
    """It ends well below where it started and never rose again."""
    return not _grew(st) and st.last < st.first / 1.5


def _determined(iv: Tuple[float, float]) -> bool:
    """The interval has a positive lower bound (``[a, b]`` or ``≥ a``)."""
    return math.isfinite(iv[0]) and iv[0] > 0


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
    "linear": "the linear rule (ε ∝ B: double the batch, double the rate)",
    "sqrt": "the square-root rule (ε ∝ √B)",
    "constant": "no scaling (the best rate does not move with B)",
    "law": "the noise-scale law ε(B) = ε_max/(1 + B_noise/B) — linear well below B_noise, flat above it (as AdaScale)",
}


LAW_Z = 3.5   # the largest |z| over ~20 points of a law that holds stays below this (tested)


def _round(b: float) -> int:
    """A batch size to say: two significant digits, at least 2."""
    return max(2, int(float(f"{b:.2g}")))


# ------------------------------------------------------------------ one task
def _task_verdict(f: _Facts) -> TaskVerdict:
    because: List[Line] = []
    crit, lrb = _summary(f.critical), _summary(f.lr_batch)
    crit_a, lr_a = anchor("critical-batch", f.task), anchor("lr-batch", f.task)
    stage = None
    if f.trajectory is not None and f.trajectory.run is not None:
        stage = _stage(f.trajectory, *f.trajectory.run, anchor("trajectory", f.task))
    elif f.run is not None and f.run.lines:
        stage = _stage(f.run, f.run.header, f.run.lines, f.run_anchor)
    b_crit = to_float(crit.get("b_crit"))
    target = to_float(crit.get("target_loss"))

    # the batch size for the stage the data describe
    batch: Optional[float] = None
    lower_bound = False
    if math.isfinite(b_crit):
        batch = b_crit
        line = Line().add("To reach the loss ").add(fmt_num(target), crit_a).add(
            ", steps and examples across batch sizes give the critical batch size B_crit ≈ ").add(
            fmt_num(b_crit), crit_a).add(f" (95 % interval {fmt_interval(crit.get('b_crit_interval'))})")
        along = to_float(crit.get("b_simple"))
        if math.isfinite(along):
            lo_c, hi_c = domain_interval(crit.get("b_crit_interval"))
            agree = lo_c / 2 <= along <= 2 * hi_c
            line.add("; the noise scale B_simple measured along those runs, ").add(fmt_num(along), crit_a).add(
                ", " + ("agrees with it." if agree else "differs from it by more than 2× — the fit and the "
                        "noise scale disagree here, so take B_crit as the measured answer."))
        else:
            line.add(".")
        because.append(line)
    elif f.critical is not None:
        because.append(Line().add("The critical-batch fit gives no B_crit (").add(
            _short_reason(crit.get("reason")), crit_a).add(")."))

    if stage is not None:
        where = "at the end of the trajectory run" if f.run is None else "at the last measured step of the run"
        loss_txt = f", loss {fmt_num(stage.loss)}" if math.isfinite(stage.loss) else ""
        line = Line().add(f"The noise scale {where} (step {fmt_count(stage.step)}{loss_txt}) is B_simple ≈ ").add(
            fmt_num(stage.last), stage.anchor).add(f" ({_iv_text(stage.interval)})")
        if _grew(stage):
            line.add(f", up from {fmt_num(stage.low)} at step {fmt_count(stage.low_step)}: it grows as the loss falls")
        elif _fell(stage):
            line.add(f", down from {fmt_num(stage.first)} at step {fmt_count(stage.first_step)}")
        if batch is not None:
            lo_c, hi_c = domain_interval(crit.get("b_crit_interval"))
            later = math.isfinite(stage.loss) and math.isfinite(target) and stage.loss < target
            if stage.interval[0] > hi_c:
                line.add(". It is larger than B_crit because it is measured later"
                         + (f", at a lower loss ({fmt_num(stage.loss)} < target {fmt_num(target)})" if later else "")
                         + ": the batch worth using grows as training goes on.")
            elif math.isfinite(stage.interval[1]) and stage.interval[1] < lo_c:
                line.add(". It is smaller than B_crit; the fit averages over the whole way to the target.")
            else:
                line.add("; it is consistent with B_crit.")
        else:
            line.add(".")
        because.append(line)
        if batch is None and _determined(stage.interval):
            # a lower bound only: answer with the bound, the point value is not supported
            batch = stage.last if math.isfinite(stage.interval[1]) else stage.interval[0]
            lower_bound = not math.isfinite(stage.interval[1])

    # the learning rate for that batch, and the rule the data support
    lr_line, rule_line, lr_value = _lr_lines(f, lrb, lr_a, batch, stage)
    because += [x for x in (lr_line, rule_line) if x is not None]
    law = _summary(f.law)
    if law:
        z = to_float(law.get("max_abs_z"))
        line = Line().add("The measured mini-batch noise ")
        line.add("follows" if z < LAW_Z else "departs from").add(" tr(Σ)/B (largest deviation ").add(
            fmt_num(z), anchor("law", f.task)).add(f" standard errors over {fmt_count(law.get('points'))} batch sizes)")
        because.append(line.add(", so the per-sample numbers behind this verdict check out." if z < LAW_Z else
                                ": the sampling of this task does not match the estimator's premises; check it "
                                "before trusting the numbers above."))

    for study, inp in f.more.items():
        line = STUDY_LINES[study](_summary(inp), anchor(study, f.task))
        if line is not None:
            because.append(line)
    next_step = None
    if batch is None and "lm" in f.more:  # the language model's own answer: its noise scale at the run's end
        batch, lower_bound = lm_batch(_summary(f.more["lm"]))
        next_step = lm_next(_summary(f.more["lm"]))
    if batch is None:
        return TaskVerdict(f.task, Line().add("No batch-size answer: these data cannot support one."),
                           because, _what_to_run(f, crit, stage), False)
    chosen = _round(batch)
    head = Line().add(f"Batch size of at least ≈ {chosen}" if lower_bound else f"Batch size ≈ {chosen}")
    if lr_value is not None:
        head.add(" and learning rate ≈ ").add(fmt_num(lr_value, 2), lr_a)
    head.add(" for the stage up to the loss " + fmt_num(target) if math.isfinite(b_crit)
             else " at the stage this run reached")
    head.add(" (the upper end is not determined from these steps)." if lower_bound else ".")
    return TaskVerdict(f.task, head, because, next_step or _next_step(stage, batch, b_crit), True)


def _lr_lines(f: _Facts, lrb: Dict[str, Any], lr_a: str, batch: Optional[float], stage: Optional[_Stage]):
    """``(lr sentence, rule sentence, lr value)`` for ``batch`` (None where missing)."""
    if not lrb:
        if stage is None or batch is None or not math.isfinite(stage.batch_size):
            return None, None, None
        to = _round(batch)
        gain = (1 + stage.last / stage.batch_size) / (1 + stage.last / to)  # AdaScale, B_noise = B_simple
        return (Line().add(f"No learning-rate study: moving from the run's batch {fmt_count(stage.batch_size)} to "
                           f"{to}, multiply a learning rate tuned at {fmt_count(stage.batch_size)} by the AdaScale "
                           "gain (1 + B_simple/B)/(1 + B_simple/B′) ≈ ").add(fmt_num(gain), stage.anchor)
                .add(" (gradnoise study lr-batch measures the rate itself)."), None, None)
    best = [(to_float(b), to_float(lr)) for b, lr in (lrb.get("best") or [])]
    best = [(b, lr) for b, lr in best if b > 0 and lr > 0]
    eps_max, b_noise = to_float(lrb.get("eps_max")), to_float(lrb.get("b_noise"))
    lr_line = rule_line = None
    value = None
    if batch is not None and math.isfinite(eps_max) and math.isfinite(b_noise):
        b = _round(batch)
        value = eps_max / (1 + b_noise / b)
        lr_line = Line().add(f"For batch {b} the best-rate law ε(B) = ").add(fmt_num(eps_max), lr_a).add(
            "/(1 + ").add(fmt_num(b_noise), lr_a).add(f"/B) gives ε ≈ {fmt_num(value, 2)}")
        near = min(best, key=lambda p: abs(math.log(p[0] / b)), default=None)
        if near is not None:
            lr_line.add(f"; the best rate measured at B={fmt_count(near[0])} was ").add(fmt_num(near[1]), lr_a)
        lr_line.add(".")
    elif batch is not None and best:
        b = _round(batch)
        near = min(best, key=lambda p: abs(math.log(p[0] / b)))
        value = near[1]
        lr_line = Line().add(f"For batch {b}: the best rate of the grid at B={fmt_count(near[0])} was ").add(
            fmt_num(near[1]), lr_a).add(" (the law ε(B) could not be fitted: " + _short_reason(lrb.get("reason"))
                                        + ").")
    if len(best) >= 3:
        fits = rule_fits(best, to_float(lrb.get("rms")) if lrb.get("b_noise") is not None else None)
        rule = supported_rule(fits, len(best))
        lo, hi = best[0], best[-1]
        others = ", ".join(f"{k} {fmt_num(v, 2)}" for k, v in fits.items())
        rule_line = Line().add("The ").add("best rates", lr_a).add(
            f" rose ×{fmt_num(hi[1] / lo[1], 2)} while the batch grew ×{fmt_num(hi[0] / lo[0], 2)} "
            f"(B={fmt_count(lo[0])}→{fmt_count(hi[0])}): the data support {RULE_TEXT[rule]} (rms log-error: {others}).")
    return lr_line, rule_line, value


def _iv_text(iv: Tuple[float, float]) -> str:
    text = fmt_interval(list(iv))
    return text if text.startswith("not") else f"95 % interval {text}"


def _short_reason(reason: Any) -> str:
    """The root cause among a study's notes: the first one (the ``no …`` conclusion that
    follows from it is left out)."""
    parts = [p for p in str(reason or "").split("; ") if p]
    causes = [p for p in parts if not p.startswith("no ")]
    text = (causes or parts or ["no reason recorded"])[0]
    return text + (f" (and {len(causes) - 1} more note{'s' if len(causes) > 2 else ''})" if len(causes) > 1 else "")


def _next_step(stage: Optional[_Stage], batch: float, b_crit: float) -> Line:
    """What to do with the answer, by what the noise scale did along the run."""
    monitor = "a NoiseMonitor in your loop tracks B_simple"
    if stage is None:
        return Line().add(f"Next: train at batch ≈ {_round(batch)} up to that loss; the noise scale usually grows "
                          "as the loss falls, so measure it later in training too (gradnoise study trajectory, "
                          "or a NoiseMonitor in your loop).")
    if math.isfinite(b_crit) and stage.interval[0] > b_crit:
        return Line().add(f"Next: train at batch ≈ {_round(b_crit)} early and grow the batch as B_simple grows "
                          f"(≈ {_round(stage.last)} by the end of this run), scaling the learning rate by the rule "
                          f"above; {monitor}.")
    if not math.isfinite(stage.interval[1]):
        return Line().add(f"Next: batches up to at least ≈ {_round(batch)} still pay at this stage; the upper end "
                          f"needs more measured steps (a longer run; {monitor}).")
    if _grew(stage):
        return Line().add(f"Next: train at batch ≈ {_round(batch)} at this stage; the noise scale grew along this "
                          f"run, so grow the batch with it; {monitor}.")
    if _fell(stage):
        return Line().add(f"Next: train at batch ≈ {_round(batch)}; the noise scale fell along this run, so a batch "
                          f"chosen from early steps is too large later; {monitor}.")
    return Line().add(f"Next: train at batch ≈ {_round(batch)}; past it a larger batch mostly costs examples; "
                      f"{monitor}.")


def _what_to_run(f: _Facts, crit: Dict[str, Any], stage: Optional[_Stage]) -> Line:
    """The command(s) that would give the missing answer."""
    reason = str(crit.get("reason") or "")
    flags = [flag for needle, flag in (("first evaluation", "--target-loss <a lower loss>"),
                                       ("grid", "--lrs <a wider grid>"),
                                       ("do not bend", "--batch-sizes <a wider sweep>")) if needle in reason]
    asks = []
    if f.critical is None or flags:
        asks.append(" ".join(["gradnoise study critical-batch"] + flags))
    if stage is None or not _determined(stage.interval):
        asks.append("gradnoise study trajectory (more steps) or a longer NoiseMonitor run")
    return Line().add("Run instead: " + "; or ".join(asks) + ".")


# ------------------------------------------------------------------ the page's verdict
def verdicts(inputs: Sequence[Input], stems: Sequence[str]) -> List[TaskVerdict]:
    """One :class:`TaskVerdict` per task (and per run file given on its own) that has a
    study able to answer (trajectory, critical-batch, lr-batch or a run file)."""
    groups = [g for g in _group(inputs, stems)
              if g.trajectory or g.critical or g.lr_batch or g.run or g.more]
    return [_task_verdict(g) for g in groups]


def text_lines(found: Sequence[TaskVerdict], failures: Sequence[str] = ()) -> List[str]:
    """The verdict as plain text lines, for the end of ``gradnoise study`` / ``report``."""
    out = ["verdict:"]
    for v in found:
        out.append(f"  {v.name}: {v.headline.text}")
        out += [f"    - {b.text}" for b in v.because]
        out.append(f"    {v.next_step.text}")
    out += [f"  not in this verdict: {f}" for f in failures]
    return out if len(out) > 1 else []


__all__ = ["Line", "TaskVerdict", "anchor", "rule_fits", "supported_rule", "text_lines", "verdicts"]
