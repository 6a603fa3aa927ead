"""The verdict's decision object and what every verdict reads from a run's noise scale.

A :class:`TaskVerdict` is decided first — its numbers (batch size, learning rate or its
multiplier, the rule behind it, the stage) — and written second: :func:`headline` is the
one place its answer becomes a sentence, so tests check the numbers and the page and the
terminal say the same thing. The reasons (at most :data:`MAX_REASONS`) and the next step
are sentences whose numbers link to the part of the page they come from.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .files import Input
from .fmt import domain_interval, fmt_count, fmt_factor, fmt_interval, fmt_lr, fmt_num, to_float
from .line import Line
from .series import b_simple_marks, noise_series

MAX_REASONS = 3
# a learning-rate rule, as the headline names it
RULE_NAMES = {"law": "the best-rate law ε(B)", "grid": "the best rate measured nearby",
              "adascale": "AdaScale's gain", "adam-sqrt": "the square root of AdaScale's gain",
              "sqrt": "the square-root rule the branches used", "linear": "the linear rule the branches used"}


@dataclass
class TaskVerdict:
    """The verdict for one task (or one run file): a decision, then its sentences.

    Attributes:
        name: the task's or run file's name.
        answered: False when the data cannot support a batch-size answer.
        batch: the batch size to use (two significant digits), None without an answer.
        lower_bound: ``batch`` is a lower bound (the upper end is not determined).
        basis: what ``batch`` is: ``"B_crit"``, ``"B_simple"``, ``"preconditioned
            B_simple"`` (an Adam-type run: the noise scale of its update direction), or
            ``"lm"`` (the language-model study's own answer), ``"branch B_crit"`` (a probe).
        lr: the learning rate for ``batch`` where the data give one.
        lr_factor: the multiplier of the run's learning rate for ``batch`` (run files).
        lr_rule: ``"law"``, ``"grid"``, ``"adascale"``, ``"adam-sqrt"``, or a probe's
            ``"sqrt"``/``"linear"``.
        optimizer: the optimizer's class where the file names it.
        stage: ``"up to the loss 0.2"`` or ``"at the stage this run reached"``.
        why_not: without an answer, why (one clause).
        lr_anchor: the part of the page the learning rate comes from.
        because: at most :data:`MAX_REASONS` sentences.
        next_step: what to do next.
    """

    name: str
    answered: bool
    because: List[Line]
    next_step: Line
    batch: Optional[int] = None
    lower_bound: bool = False
    basis: Optional[str] = None
    lr: Optional[float] = None
    lr_factor: Optional[float] = None
    lr_rule: Optional[str] = None
    optimizer: Optional[str] = None
    stage: str = "at the stage this run reached"
    why_not: str = "these data cannot support one"
    lr_anchor: Optional[str] = None

    def __post_init__(self) -> None:
        if len(self.because) > MAX_REASONS:
            raise ValueError(f"a verdict gives at most {MAX_REASONS} reasons, got {len(self.because)}")

    @property
    def headline(self) -> Line:
        return headline(self)


def headline(v: TaskVerdict) -> Line:
    """The answer in one sentence, from the decision's numbers only."""
    if not v.answered:
        return Line().add(f"No batch-size answer: {v.why_not}.")
    line = Line().add(f"Batch size of at least ≈ {v.batch}" if v.lower_bound else f"Batch size ≈ {v.batch}")
    if v.lr is not None:
        line.add(" and learning rate ≈ ").add(fmt_lr(v.lr), v.lr_anchor)
    elif v.lr_factor is not None:
        line.add(" with the learning rate ×").add(fmt_factor(v.lr_factor), v.lr_anchor)
    if v.optimizer and v.lr_rule:
        line.add(f" ({v.optimizer}: {RULE_NAMES[v.lr_rule]})")
    line.add(f" {v.stage}")
    return line.add(" (the upper end is not determined from these steps)." if v.lower_bound else ".")


def round_batch(b: float) -> int:
    """A batch size to say: two significant digits, at least 1."""
    return max(1, int(float(f"{b:.2g}")))


# ------------------------------------------------------------------ the noise scale along a run
@dataclass
class Stage:
    """The smoothed noise scale at the start, lowest and end of a run, with the loss there.

    ``loss`` is the full-data loss at the end for a study's run, the training loss the
    monitor recorded for a user's run (NaN where none was recorded); ``loss_at_low`` is
    the loss recorded nearest to ``low_step`` (NaN likewise)."""

    first: float
    first_step: float
    low: float
    low_step: float
    last: float
    interval: Tuple[float, float]
    step: float
    batch_size: float
    loss: float
    loss_at_low: float
    anchor: str


def stage(header: Dict[str, Any], steps: Sequence[Dict[str, Any]], anchor_id: str,
          losses: Optional[Mapping[float, float]] = None) -> Optional[Stage]:
    """The :class:`Stage` of a run file's steps (the points the page's tables quote,
    :func:`~gradnoise.report.series.b_simple_marks`); ``losses``: step -> loss (default:
    the steps' own recorded ``loss``), read at the recorded step nearest to each point;
    None when no smoothed ``B_simple`` is defined."""
    series = noise_series(header, steps)
    m = b_simple_marks(series)
    if m.last is None:
        return None
    b, (low, high) = series.smoothed["b_simple"], series.b_band
    i, k, j = m.first, m.low, m.last
    sizes = [to_float(s.get("batch_size")) for s in steps]
    if losses is None:
        losses = {to_float(s.get("step")): to_float(s.get("loss")) for s in steps}
    known = {t: v for t, v in losses.items() if math.isfinite(t) and math.isfinite(v)}
    last_loss = known[max(known)] if known else math.nan
    return Stage(float(b[i]), float(series.step[i]), float(b[k]), float(series.step[k]), float(b[j]),
                 domain_interval([low[j], high[j]]), float(series.step[j]),
                 float(np.median([v for v in sizes if math.isfinite(v)] or [math.nan])),
                 last_loss, _nearest(known, float(series.step[k])), anchor_id)


def _nearest(known: Mapping[float, float], step: float) -> float:
    """The loss recorded at the step nearest to ``step`` (NaN when none was)."""
    return known[min(known, key=lambda t: abs(t - step))] if known else math.nan


def grew(st: Stage) -> bool:
    """The noise scale ends well above its lowest (bounded) value, reached before the end."""
    return st.last > 1.5 * st.low and st.low_step < st.step


def fell(st: Stage) -> bool:
    """It ends well below where it started and never rose again."""
    return not grew(st) and st.last < st.first / 1.5


def determined(iv: Tuple[float, float]) -> bool:
    """The interval has a positive lower bound (``[a, b]`` or ``≥ a``)."""
    return math.isfinite(iv[0]) and iv[0] > 0


def answer(st_value: float, iv: Tuple[float, float]) -> Tuple[float, bool]:
    """``(batch, lower_bound)`` from a noise scale and its interval: the value where the
    interval is bounded, its lower end where only that is."""
    return (st_value, False) if math.isfinite(iv[1]) else (iv[0], True)


def iv_text(iv: Tuple[float, float]) -> str:
    text = fmt_interval(list(iv))
    return text if text.startswith("not") else f"95 % interval {text}"


def trend(st: Stage) -> str:
    """What the noise scale did along the run, with the loss only where it was recorded."""
    if grew(st):
        text = f", up from {fmt_num(st.low)} at step {fmt_count(st.low_step)}"
        if math.isfinite(st.loss_at_low) and math.isfinite(st.loss) and st.loss < st.loss_at_low:
            return text + f": it grew as the loss fell ({fmt_num(st.loss_at_low)} → {fmt_num(st.loss)})"
        return text
    if fell(st):
        return f", down from {fmt_num(st.first)} at step {fmt_count(st.first_step)}"
    return ""


def next_step(st: Optional[Stage], batch: float, b_crit: float, monitor: str, lower_bound: bool = False) -> Line:
    """What to do with the answer, by what the noise scale did along the run
    (``lower_bound``: the answer is one, whatever the run's own interval)."""
    b = round_batch(batch)
    if st is None:
        return Line().add(f"Next: train at batch ≈ {b} up to that loss; the noise scale usually grows as the "
                          f"loss falls, so measure it later in training too ({monitor}).")
    if math.isfinite(b_crit) and st.interval[0] > b_crit:
        return Line().add(f"Next: train at batch ≈ {round_batch(b_crit)} early and grow the batch as B_simple "
                          f"grows (B_simple ≈ {fmt_num(st.last)} by the end of this run), scaling the learning "
                          f"rate by the rule above; {monitor}.")
    if lower_bound or not math.isfinite(st.interval[1]):
        return Line().add(f"Next: batches up to at least ≈ {b} still pay at this stage; the upper end needs more "
                          f"measured steps ({monitor}).")
    if grew(st):
        return Line().add(f"Next: train at batch ≈ {b} at this stage; the noise scale grew along this run, so "
                          f"grow the batch with it; {monitor}.")
    if fell(st):
        return Line().add(f"Next: train at batch ≈ {b}; the noise scale fell along this run, so a batch chosen "
                          f"from early steps is too large later; {monitor}.")
    return Line().add(f"Next: train at batch ≈ {b}; past it a larger batch mostly costs examples; {monitor}.")


def summary_of(inp: Optional[Input]) -> Dict[str, Any]:
    """The last ``summary`` line of a study file ({} without one)."""
    found = inp.of_type("summary") if inp is not None else []
    return found[-1] if found else {}


__all__ = ["MAX_REASONS", "Stage", "TaskVerdict", "answer", "determined", "fell", "grew", "headline",
           "iv_text", "next_step", "round_batch", "stage", "summary_of", "trend"]
