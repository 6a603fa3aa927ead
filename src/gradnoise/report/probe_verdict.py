"""The verdict from a branch probe (``gradnoise-probe``): the critical batch measured on
the user's model, and what it says of the cheap noise scale.

* **batch size** — McCandlish's ``B_noise`` from the branches' steps to the target where
  its interval has a positive lower end, else Merrill's largest batch within tolerance
  (a lower bound where every size was within it);
* **learning rate** — the rule the branches used from the parent's rate (square root for
  Adam-type optimizers, linear for SGD) at that batch size;
* **calibration** — the measured value over ``B_simple`` (preconditioned for Adam), the
  factor :func:`calibration` hands to a run's verdict on the same page.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

from .decision import TaskVerdict, determined, round_batch
from .files import Input
from .fmt import domain_interval, fmt_count, fmt_factor_interval, fmt_lr, fmt_num, fmt_with_interval, to_float
from ..formats import probe_ratio
from .line import Line


def calibration(probe: Input) -> Dict[str, Optional[float]]:
    """``{"raw": ratio, "preconditioned": ratio}`` of a probe file (None where undefined)."""
    return {"raw": probe_ratio(probe.header, False)[0], "preconditioned": probe_ratio(probe.header, True)[0]}


def _reading(doc: Dict[str, Any]) -> Tuple[Optional[float], bool]:
    """``(batch, lower_bound)`` from the branches."""
    mc, me = doc.get("mccandlish") or {}, doc.get("merrill") or {}
    if mc.get("b_noise") is not None and determined(domain_interval(mc.get("interval"))):
        return to_float(mc["b_noise"]), False
    if me.get("b_crit") is not None:
        return to_float(me["b_crit"]), bool(me.get("reason"))  # every size within the tolerance: at least this
    return None, False


def probe_verdict(probe: Input, anchor_id: str) -> TaskVerdict:
    """The :class:`TaskVerdict` of one probe file."""
    doc = probe.header
    mc, me, px = doc.get("mccandlish") or {}, doc.get("merrill") or {}, doc.get("proxy") or {}
    opt = doc.get("optimizer") or {}
    name = str(doc.get("task") or probe.path.name)
    step = (doc.get("checkpoint") or {}).get("step")
    where = f"at step {fmt_count(step)}" if step is not None else "at this checkpoint"
    line = Line().add(f"Branches {where} ({fmt_count(len(doc.get('branches') or []))} of them) measured B_crit ≈ ")
    line.add(fmt_with_interval(mc.get("b_noise"), mc.get("interval")), anchor_id)
    line.add(" from steps to the target" + (f" ({mc['reason']})" if mc.get("reason") else ""))
    line.add("; the largest batch within tolerance of the best loss on the budget was ")
    line.add(fmt_with_interval(me.get("b_crit"), me.get("interval")), anchor_id).add(".")
    batch, lower = _reading(doc)
    because = [line]
    adam = opt.get("family") == "adam"
    ratio, ratio_key = probe_ratio(doc, adam and probe_ratio(doc, True)[0] is not None)
    key = "preconditioned" if ratio_key == "preconditioned_ratio" else "b_simple"
    if px.get(key) is not None:
        cal = Line().add(f"The {'preconditioned' if key == 'preconditioned' else 'raw'} noise scale at the same "
                         "weights is B_simple ≈ ").add(fmt_with_interval(px.get(key), px.get(f"{key}_interval")),
                                                       anchor_id)
        if ratio is not None:
            iv = px.get(f"{ratio_key}_interval")
            cal.add(f": the measured critical batch is {fmt_factor_interval(ratio, iv)} it (gradnoise schedule "
                    "--calibration uses this factor).")
        else:
            cal.add(".")
        because.append(cal)
    if batch is None:
        return TaskVerdict(name, False, because, Line().add(
            "Next: " + (mc.get("reason") or me.get("reason") or "rerun the probe with more seeds or a larger budget")
            + "."), optimizer=opt.get("class"),
            why_not="the branches cannot tell where the steps stop falling with the batch")
    v = TaskVerdict(name, True, because, Line(), round_batch(batch), lower, "branch B_crit",
                    optimizer=opt.get("class"), stage=f"{where} (loss {fmt_num((doc.get('checkpoint') or {}).get('loss'))})")
    lr0, base = to_float(doc.get("lr")), to_float(doc.get("base_batch"))
    if math.isfinite(lr0) and base > 0:
        r = v.batch / base
        v.lr_rule = "sqrt" if doc.get("lr_rule") == "sqrt" else "linear"
        v.lr = lr0 * (math.sqrt(r) if v.lr_rule == "sqrt" else r)
        v.lr_anchor = anchor_id
        because.append(Line().add(f"The branches scaled the parent's learning rate {fmt_lr(lr0)} at batch "
                                  f"{fmt_count(base)} by the {'square-root' if v.lr_rule == 'sqrt' else 'linear'} "
                                  "rule" + (" (each size's best of the grid)" if len(doc.get("lr_grid") or []) > 1
                                            else "") + "."))
    v.next_step = Line().add(f"Next: train at batch ≈ {v.batch} from here; probe again later (the critical batch "
                             f"grows as the loss falls), or let gradnoise schedule grow it from a monitored run "
                             f"calibrated by this file.")
    return v


__all__ = ["calibration", "probe_verdict"]
