"""The records of :class:`~gradnoise.control.batch_size.AdaptiveBatchSampler`: a noise
reading, the sampler's position, the plan of one optimizer step, and the ``Step`` a
training loop iterates (its micro-batches with their shares)."""
from __future__ import annotations

import math
from typing import List, NamedTuple, Tuple

class Reading(NamedTuple):
    """The monitor's smoothed ``B_simple`` and its 95 % interval at step ``step``."""

    step: int
    b_simple: float
    low: float
    high: float

    @classmethod
    def of(cls, rec) -> "Reading":
        lo, hi = rec.b_simple_interval
        return cls(int(rec.step), float(rec.smoothed.b_simple), float(lo), float(hi))

    @property
    def usable(self) -> bool:
        """A finite ``B_simple ≥ 0`` with an interval bounded above."""
        return math.isfinite(self.b_simple) and self.b_simple >= 0 and math.isfinite(self.high)


class Cursor(NamedTuple):
    """Where the sampler stands: the next step's epoch, position and index, the size."""

    epoch: int
    position: int
    step: int
    batch_size: int
    lr_multiplier: float


class StepPlan(NamedTuple):
    """One optimizer step as planned: the global size in force and the step's global
    sample count (less for an epoch's last step), this rank's micro-batches (index
    lists), their sizes and shares ``b_j/b``, and the cursor before it."""

    index: int
    epoch: int
    batch_size: int
    n_samples: int
    micro: List[List[int]]
    sizes: Tuple[int, ...]
    weights: Tuple[float, ...]
    lr_multiplier: float
    before: Cursor


class Step:
    """One optimizer step as the loader delivers it: iterate for ``(batch, weight)``.

    Attributes (from its plan): ``index``, ``epoch``, ``batch_size`` (the global size in
    force), ``n_samples`` (this step's global samples: ``batch_size``, or less for an
    epoch's last step), ``local_batch_size`` (this rank's samples), ``sizes``,
    ``weights`` (``sizes / local_batch_size``, sum to 1), ``lr_multiplier``;
    ``len(step)`` is its number of micro-batches. Micro-batches a loop leaves unread are
    skipped when the next step begins.
    """

    def __init__(self, plan: StepPlan, first, it):
        self.plan, self._first, self._it, self._taken = plan, first, it, 0
        self.index, self.epoch, self.batch_size = plan.index, plan.epoch, plan.batch_size
        self.n_samples = plan.n_samples
        self.sizes, self.weights, self.lr_multiplier = plan.sizes, plan.weights, plan.lr_multiplier
        self.local_batch_size = sum(plan.sizes)

    def __len__(self) -> int:
        return len(self.sizes)

    def __iter__(self):
        while self._taken < len(self.sizes):
            j = self._taken
            yield self._take(), self.weights[j]

    def _take(self):
        if self._taken == 0:
            batch, self._first = self._first, None
        else:
            try:
                batch = next(self._it)
            except StopIteration:
                raise RuntimeError("the loader ended inside a step: was the sampler used by another loader?") from None
        self._taken += 1
        return batch

    def _drain(self) -> None:
        while self._taken < len(self.sizes):
            self._take()
