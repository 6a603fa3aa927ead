"""The verdict on a user's own run: a monitor's run file given to ``gradnoise report``.

Decided from what the file holds and nothing else:

* **batch size** — for an Adam-type optimizer (the header's ``optimizer.family``) the
  noise scale of its update direction, ``B_simple`` of the preconditioned gradient
  (:mod:`gradnoise.monitor.precond`), where its interval has a positive lower end; else
  the raw ``B_simple``. The raw value is quoted beside the preconditioned one.
* **learning rate** — the run's rate moved to that batch by AdaScale's gain
  ``r = (1 + B_noise/B)/(1 + B_noise/B′)`` (``B`` the run's batch, ``B_noise`` the
  noise scale above): ``×r`` for SGD, ``×√r`` for Adam-type optimizers
  (:mod:`gradnoise.stats.rules`); a multiplier where the file records no rate; both
  rules, named, where it does not say which optimizer ran.
* that the noise scale grew *as the loss fell* is said only where the run recorded
  losses that fell; steps the monitor flagged are counted with their reasons.

No pointer to a study: what would help is more of the user's own run.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..stats import rules
from .decision import Stage, TaskVerdict, answer, determined, iv_text, next_step, round_batch, stage, trend
from .files import Input
from .fmt import domain_interval, fmt_count, fmt_factor, fmt_lr, fmt_num, to_float
from .line import Line

MONITOR = "keep the NoiseMonitor on to follow it"


def _preconditioned(steps: Sequence[Dict[str, Any]]) -> Optional[Tuple[float, Tuple[float, float], float]]:
    """``(B_simple, interval, step)`` of the update direction at the last step that has it."""
    for s in reversed(steps):
        pre = s.get("preconditioned") or {}
        b = to_float((pre.get("smoothed") or {}).get("b_simple"))
        if math.isfinite(b):
            return b, domain_interval(pre.get("b_simple_interval")), to_float(s.get("step"))
    return None


def _flags(steps: Sequence[Dict[str, Any]]) -> Counter:
    """Why steps were skipped or left undefined: flag -> count (``undefined``: a step whose
    own numbers are fine but whose smoothed |G|² is not yet above zero)."""
    return Counter(s.get("flag") or (s.get("raw") or {}).get("flag") or ("skipped" if s.get("skipped") else "undefined")
                   for s in steps if s.get("skipped") or (s.get("smoothed") or {}).get("b_simple") is None)


FLAG_FIX = {"single_group": "one group per step: use ≥ 2 micro-batches per step with source='microbatch'",
            "non_finite": "gradients not finite: a mixed-precision overflow?", "grad_sq_norm_nonpositive": "|G|² not yet above its noise",
            "undefined": "the smoothed |G|² not yet above zero"}


def _flag_text(flags: Counter) -> str:
    return ", ".join(f"{k} ×{n}" + (f" ({FLAG_FIX[k]})" if k in FLAG_FIX else "") for k, n in flags.most_common())


def run_verdict(run: Input, anchor_id: str, calibration: Optional[Dict[str, Optional[float]]] = None
                ) -> TaskVerdict:
    """The :class:`TaskVerdict` of one run file; ``calibration`` (a branch probe's
    ``{"raw": ratio, "preconditioned": ratio}``) scales the noise scale the batch rests
    on by the probe's measured factor."""
    header, steps = run.header, run.lines
    opt = header.get("optimizer") or {}
    family, name = opt.get("family"), opt.get("class")
    st = stage(header, steps, anchor_id) if steps else None
    pre = _preconditioned(steps) if family == "adam" else None
    flags = _flags(steps)
    because: List[Line] = []
    if st is None:
        why = (f"every measured step was flagged ({_flag_text(flags)})" if steps and sum(flags.values()) == len(steps)
               else "the run file has no measured step" if not steps else "no smoothed B_simple is defined")
        return TaskVerdict(run.path.name, False, because, _more_data(flags), optimizer=name, why_not=why)

    line = Line().add(f"At the last measured step (step {fmt_count(st.step)}"
                      + (f", loss {fmt_num(st.loss)}" if math.isfinite(st.loss) else "")
                      + ") the noise scale is B_simple ≈ ").add(fmt_num(st.last), anchor_id)
    line.add(f" ({iv_text(st.interval)}){trend(st)}")
    basis, value, iv = "B_simple", st.last, st.interval
    if pre is not None:
        line.add(f"; the noise of {name}'s update direction (Adam-preconditioned) is ≈ ").add(
            fmt_num(pre[0]), anchor_id).add(f" ({iv_text(pre[1])})")
        if determined(pre[1]):
            basis, value, iv = "preconditioned B_simple", pre[0], pre[1]
            line.add(": the batch follows it, as AdaScale's adam-sqrt mode does")
    elif family == "adam":
        line.add(f"; {name}'s preconditioned noise is not in the file (give the monitor optimizer= ; it needs "
                 "the optimizer's state, after its first step)")
    because.append(line.add("."))
    if flags:
        because.append(Line().add(f"{sum(flags.values())} of {len(steps)} measured steps have no defined value: "
                                  f"{_flag_text(flags)}."))
    if not determined(iv):
        return TaskVerdict(run.path.name, False, because, _more_data(flags), optimizer=name, basis=basis,
                           why_not=f"{basis} is not determined from these steps ({iv_text(iv)})")
    ratio = (calibration or {}).get("preconditioned" if basis.startswith("preconditioned") else "raw")
    if ratio is not None:  # the probe measured the critical batch at ratio × this noise scale
        value, iv = value * ratio, (iv[0] * ratio, iv[1] * ratio)
        basis = f"calibrated {basis}"
        because[0].add(f" Calibrated by the branch probe on this page: ×{fmt_factor(ratio)}, B ≈ {fmt_num(value)}.")
    batch, lower = answer(value, iv)
    v = TaskVerdict(run.path.name, True, because, Line(), round_batch(batch), lower, basis, optimizer=name)
    _learning_rate(v, st, opt, steps, batch, anchor_id)
    v.next_step = next_step(st, batch, math.nan, MONITOR, lower)
    return v


def _learning_rate(v: TaskVerdict, st: Stage, opt: Dict[str, Any], steps, b_noise: float, anchor_id: str) -> None:
    """The learning rate (or its multiplier) for ``v.batch``, and its reason."""
    b0, to = st.batch_size, v.batch
    if not (math.isfinite(b0) and b0 > 0):
        return
    family = opt.get("family")
    lr0 = next((to_float(s.get("lr")) for s in reversed(steps) if math.isfinite(to_float(s.get("lr")))),
               to_float(opt.get("lr")))
    r = rules.adascale(b0, to, b_noise)
    line = Line().add(f"Moving from the run's batch {fmt_count(b0)} to {to}: AdaScale's gain "
                      f"(1 + B/{fmt_count(b0)})/(1 + B/{to}) with B = {fmt_num(b_noise)} is ").add(fmt_factor(r), anchor_id)
    if family in ("adam", "sgd"):
        v.lr_rule = "adam-sqrt" if family == "adam" else "adascale"
        v.lr_factor = math.sqrt(r) if family == "adam" else r
        line.add(f"; {v.optimizer} takes " + ("its square root" if family == "adam" else "it as it is") + ", ×")
        line.add(fmt_factor(v.lr_factor), anchor_id)
        if math.isfinite(lr0):
            v.lr = lr0 * v.lr_factor
            line.add(f" of the run's learning rate {fmt_lr(lr0)}")
        v.lr_anchor = anchor_id
        v.because.append(line.add("."))
        return
    what = f"{v.optimizer} is neither SGD nor Adam-type" if v.optimizer else "the run file does not name its optimizer"
    v.because.append(line.add(f": with SGD multiply the learning rate by it, with an Adam-type optimizer by its square "
                              f"root ×{fmt_factor(math.sqrt(r))} ({what}; NoiseMonitor(optimizer=...) records it)."))


def _more_data(flags: Counter) -> Line:
    """The next step when the run cannot answer: more of the user's own run."""
    if flags.get("single_group"):
        return Line().add("Next: measure with ≥ 2 groups per step — split each step into k ≥ 2 micro-batches "
                          "(source='microbatch'), or use source='per_sample' without BatchNorm in training mode.")
    return Line().add("Next: measure more steps of this run (a longer run, or every=1 so that each step is "
                      "measured); the interval narrows as steps accumulate.")


__all__ = ["run_verdict"]
