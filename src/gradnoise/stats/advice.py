"""From a monitor's run file to advice: the critical batch size and the learning-rate
change a batch-size change calls for.

The critical batch size is estimated by the smoothed noise scale ``B_simple`` of the
run's last measured steps (McCandlish et al., 2018: ``B_crit ≈ B_simple`` when the
Hessian is well conditioned), with the monitor's 95 % interval; the learning-rate
multipliers are :mod:`gradnoise.stats.rules`. Pure function of the step dicts of a
``gradnoise-run`` file (``gradnoise.read_run``): no torch, no I/O, so the report can use
it; :mod:`gradnoise.control.recommend` re-exports it.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Dict, Iterable, List, Optional, Sequence

from .rules import adascale, linear, sqrt
def _float(v: Any) -> float:
    if v is None:
        return math.nan
    return float(v)  # also "inf" / "-inf"


def powers_of_two_around(b: int, below: int = 2, above: int = 3) -> List[int]:
    """``[b/4, b/2, 2b, 4b, 8b]`` for ``below=2, above=3`` (at least 1, no duplicates)."""
    out = [max(1, b // 2**i) for i in range(below, 0, -1)] + [b * 2**i for i in range(1, above + 1)]
    return sorted({v for v in out if v != b})


def advise(steps: Sequence[Dict[str, Any]], batch_size: Optional[int] = None,
           to_batches: Optional[Iterable[int]] = None) -> Dict[str, Any]:
    """Advice from the step lines of a run file.

    Args:
        steps: step dicts as :func:`gradnoise.read_run` returns them.
        batch_size: the batch size the learning rate was tuned for; default the median
            ``batch_size`` of the steps used.
        to_batches: batch sizes to compare; default powers of two around ``batch_size``
            and the critical batch size rounded to a power of two.

    Returns:
        ``{"batch_size", "b_crit", "b_crit_interval", "steps", "step", "reason",
        "rules": [{"to_batch", "linear", "sqrt", "adascale"}]}``; ``b_crit`` is the
        smoothed ``B_simple`` of the last step not skipped (NaN with a ``reason`` when
        there is none).

    Raises:
        ValueError: when ``steps`` is empty.
    """
    if not steps:
        raise ValueError("the run file has no steps yet")
    usable = [s for s in steps if not s.get("skipped") and s.get("smoothed", {}).get("b_simple") is not None]
    reason = None
    if usable:
        last = usable[-1]
        b_crit = _float(last["smoothed"]["b_simple"])
        lo, hi = (_float(v) for v in (last.get("b_simple_interval") or (None, None)))
    else:
        last, b_crit, lo, hi = steps[-1], math.nan, math.nan, math.nan
        reason = "no step has a defined smoothed B_simple (|G|² not yet above zero, or every step skipped)"
    used = usable or list(steps)
    if batch_size is None:
        sizes = [s.get("batch_size") for s in used]
        if not all(isinstance(b, (int, float)) and b >= 1 for b in sizes):
            raise ValueError("a step has no valid batch_size; pass the batch size the learning rate was tuned for")
        batch_size = int(statistics.median(sizes))
    if to_batches is None:
        targets = set(powers_of_two_around(batch_size))
        if math.isfinite(b_crit) and b_crit >= 1:
            targets.add(2 ** round(math.log2(b_crit)))
        targets.discard(batch_size)
        to_batches = sorted(targets)
    rules = [
        {"to_batch": int(b), "linear": linear(batch_size, b), "sqrt": sqrt(batch_size, b),
         "adascale": adascale(batch_size, b, b_crit)}
        for b in to_batches
    ]
    return {"batch_size": batch_size, "b_crit": b_crit, "b_crit_interval": [lo, hi], "steps": len(usable),
            "step": last.get("step"), "reason": reason, "rules": rules}
