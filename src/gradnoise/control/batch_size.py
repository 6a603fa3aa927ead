"""``AdaptiveBatchSampler``: a DataLoader batch sampler whose batch size follows the
smoothed noise scale ``B_simple`` of a :class:`~gradnoise.NoiseMonitor`.

The loop (one ``Step`` per optimizer step, its micro-batches with their shares)::

    monitor = gradnoise.NoiseMonitor(model, source="per_sample")
    sampler = AdaptiveBatchSampler(len(dataset), monitor=monitor, base_batch_size=32,
                                   rule="c*b_simple", c=1.0, max_batch=1024,
                                   max_device_batch=128, adjust_every=100,
                                   optimizer=opt, lr_rule="sqrt")
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=2)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for step in sampler.steps(loader):             # one optimizer step
            for j, ((x, y), weight) in enumerate(step):    # weight = b_j / b, sums to 1
                with model.no_sync() if ddp and j < len(step) - 1 else nullcontext():
                    (loss_fn(model(x), y) * weight).backward()   # loss_fn: mean
            monitor.step()
            opt.step(); opt.zero_grad()

Each index list the sampler yields is one micro-batch; ``sampler.steps(loader)`` groups
the loader's batches back into steps (from a queue of step plans the sampler fills as
the loader draws indices, so prefetching workers are fine; the loader must deliver in
order). Scaling each micro-batch's mean loss by its share ``b_j/b`` of the step's
(local) samples makes the accumulated gradient the step's mean gradient, the convention
of the monitor's ``per_sample`` and ``microbatch`` sources (``reduction="mean"``).

Sizes. ``batch_size`` is global: under DDP each of the ``R`` ranks gets ``B/R``, and
``B`` is a multiple of ``q = multiple_of × R`` in ``[min_batch, max_batch]``. A rank's
``B/R`` samples are split into ``ceil(B/R / max_device_batch)`` micro-batches of sizes
differing by at most one.

Adjustment. At the start of every step whose index is a positive multiple of
``adjust_every`` (or, with ``"epoch"``, at each epoch's first step after the first) the
sampler reads ``monitor.last`` (the latest record, however old) — it never steps the
monitor — and, on rank 0, proposes:

* ``"c*b_simple"``: ``c · B_simple`` on the grid; taken when ``|B'/B − 1| > min_gain``;
* ``"goodput"``: the grid size maximising throughput × statistical efficiency
  (:mod:`~gradnoise.control.batch_rules`); taken when the goodput rises by more than
  ``min_gain``. ``step_time`` is the seconds of one optimizer step of ``B`` samples: a
  callable, an ``(α, β)`` pair for ``α + βB``, or None: ``α + βB`` fitted to what
  :meth:`AdaptiveBatchSampler.record_step_time` (or ``steps(loader, timed=True)``) was
  told; while that fit is undetermined (one size seen so far) the ``c*b_simple`` rule
  decides, which gives the fit its second size.

The size is kept when the smoothed ``B_simple`` is undefined (NaN/inf, no record yet)
or its 95 % interval is unbounded above. Under DDP rank 0's decision is broadcast
(``torch.distributed``, when initialised), so every rank agrees.

Learning rate. With ``lr_rule`` (:mod:`~gradnoise.control.lr_rules`) and an
``optimizer`` every param group's lr becomes ``base_lr · m(base_batch_size, B)`` (base
lrs captured at construction; AdaScale's ``m`` uses ``B_simple`` of the decision). Only
``param_groups[i]["lr"]`` is written; the optimizer state (Adam's ``exp_avg``,
``exp_avg_sq``, ``step``) is never reset or rescaled. That is what keeps Adam right:
``exp_avg`` estimates the mean gradient ``G`` whatever ``B``; ``exp_avg_sq`` estimates
``G² + diag(Σ)/B``, so after a growth it is too large for about ``1/(1 − β₂)`` steps
(smaller updates, the safe side) and then forgets; a reset would throw away the scale
and restart the bias correction. The last, smaller step of an epoch keeps the lr of
the size in force. With ``steps()`` the lr changes when the step that uses the new size begins;
iterating the loader directly, when the sampler plans that step (the same moment with
``num_workers=0``, earlier with prefetching workers).
A scheduler that sets lrs itself should multiply in ``step.lr_multiplier`` instead.

Epochs. Each epoch draws a permutation of ``range(dataset_size)`` from a generator
seeded with ``seed + epoch`` (same seed and epoch, same order on every rank, as
:class:`~torch.utils.data.DistributedSampler`); a step takes the next ``B`` of it and
rank ``r`` its positions ``r, r+R, …`` — disjoint shards. A final ``m < B`` samples are
dropped with ``drop_last=True``, else they form a smaller last step (padded to a
multiple of ``R`` with the epoch's first samples, as DistributedSampler pads). After a
full pass the sampler moves to the next epoch itself; ``set_epoch(e)`` restarts at the
beginning of epoch ``e`` unless ``e`` is the current epoch (so a resumed run calling it
continues mid-epoch). ``len(sampler)`` is the micro-batches of one full epoch at the
current size, an estimate when the size changes during the epoch.

Fixed schedule. With ``schedule=`` (a ``gradnoise-schedule`` object or the path of
the JSON ``gradnoise schedule run.jsonl --format json`` writes, :mod:`~gradnoise.control.schedule`)
the sampler reads no noise: at the start of every step the size and lr multiplier are
those of the schedule's segment in force after the global samples consumed so far (all
ranks, all epochs, padding included; an epoch's smaller last step counts what it took).
Each size must be a multiple of ``q`` in the bounds. The optimizer's lrs (captured at
construction: the rates tuned for the schedule's ``base_batch``) are multiplied by the
segment's ``lr_multiplier``, the schedule's own rule, so ``lr_rule`` and ``monitor``
must be None. ``base_batch_size`` defaults to the schedule's first size.

Checkpoints. ``state_dict()`` between steps holds the epoch, position, step counter,
size, lr multiplier and base lrs, the last noise reading and the step-time points; the
permutation is a function of ``(seed, epoch)``, so that is the whole generator state;
it also holds the samples consumed (a fixed schedule's clock; 0 when absent).
A resumed run continues identically (with ``num_workers=0``; with prefetching workers
no sample is lost or repeated, but steps already planned may be re-decided).
"""
from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from typing import Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from . import batch_rules as br
from .batch_plan import Cursor, Reading, Step, StepPlan
from . import lr_rules
from .schedule import segments_from_json

RULES = ("c*b_simple", "goodput")
LR_RULES = ("linear", "sqrt", "adascale")


def _world(num_replicas, rank, group) -> Tuple[int, int, bool]:
    on = dist.is_available() and dist.is_initialized()
    world = int(num_replicas) if num_replicas is not None else (dist.get_world_size(group) if on else 1)
    r = int(rank) if rank is not None else (dist.get_rank(group) if on else 0)
    if world < 1 or not 0 <= r < world:
        raise ValueError(f"rank must lie in [0, num_replicas={world}), got {r}")
    return world, r, on and world > 1


def _positive_int(name: str, v, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


class AdaptiveBatchSampler(Sampler):
    """Batch sampler whose global batch size follows the monitor's smoothed ``B_simple``
    (see the module docstring for the loop and the rules).

    Args:
        dataset_size: ``N``, or a sized dataset.
        monitor: a :class:`~gradnoise.NoiseMonitor` (anything with ``.last``), read only;
            None keeps the size (e.g. on ranks other than 0).
        base_batch_size: ``B₀``, the starting global size the base lrs are tuned for; a
            multiple of ``multiple_of × num_replicas`` in the bounds.
        rule: ``"c*b_simple"`` or ``"goodput"``. c: the factor of ``c*b_simple``.
        min_batch, max_batch: global bounds (``max_batch`` default ``N``).
        multiple_of: each rank's batch is a multiple of it.
        adjust_every: steps between adjustment points, or ``"epoch"``.
        min_gain: hysteresis, the relative gain a change must exceed.
        max_device_batch: the largest micro-batch per rank (None: no split).
        optimizer, lr_rule: ``"linear"``, ``"sqrt"``, ``"adascale"`` or None.
        step_time: the goodput rule's ``time(B)``: callable, ``(α, β)`` or None (fitted).
        drop_last, shuffle, seed: the epoch's order, as DistributedSampler.
        num_replicas, rank, process_group: default from ``torch.distributed`` if initialised.
        schedule: a fixed schedule to follow instead of the noise (a ``gradnoise-schedule``
            dict or its JSON file's path; module docstring), or None.
    """

    def __init__(self, dataset_size, monitor=None, base_batch_size: Optional[int] = None, rule: str = "c*b_simple",
                 c: float = 1.0, min_batch: int = 1, max_batch: Optional[int] = None, multiple_of: int = 1,
                 adjust_every=100, min_gain: float = 0.05, max_device_batch: Optional[int] = None,
                 optimizer=None, lr_rule: Optional[str] = None, step_time=None, drop_last: bool = False,
                 shuffle: bool = True, seed: int = 0, num_replicas: Optional[int] = None,
                 rank: Optional[int] = None, process_group=None, schedule=None):
        n = dataset_size if isinstance(dataset_size, int) else len(dataset_size)
        self._fixed = None if schedule is None else self._load_schedule(schedule, monitor, lr_rule)
        if base_batch_size is None:
            base_batch_size = 32 if self._fixed is None else self._fixed[0][1]
        for name, v in (("dataset_size", n), ("base_batch_size", base_batch_size), ("min_batch", min_batch),
                        ("multiple_of", multiple_of)):
            _positive_int(name, v)
        _positive_int("max_batch", max_batch, allow_none=True)
        _positive_int("max_device_batch", max_device_batch, allow_none=True)
        if adjust_every != "epoch":
            _positive_int("adjust_every (or 'epoch')", adjust_every)
        if rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)}; got {rule!r}")
        if lr_rule is not None and lr_rule not in LR_RULES:
            raise ValueError(f"lr_rule must be one of {', '.join(LR_RULES)} or None; got {lr_rule!r}")
        if not (isinstance(c, (int, float)) and math.isfinite(c) and c > 0):
            raise ValueError(f"c must be a finite number > 0, got {c!r}")
        if not (isinstance(min_gain, (int, float)) and math.isfinite(min_gain) and min_gain >= 0):
            raise ValueError(f"min_gain must be a finite number ≥ 0, got {min_gain!r}")
        self._linear = self._check_step_time(step_time)
        self.num_replicas, self.rank, self._distributed = _world(num_replicas, rank, process_group)
        self.q = multiple_of * self.num_replicas
        self.lo, self.hi = br.grid_bounds(min_batch, n if max_batch is None else max_batch, self.q)
        sizes = [("a schedule size", b) for _, b, _ in self._fixed or []] + [("base_batch_size", base_batch_size)]
        for what, b in sizes:
            if b % self.q or not self.lo <= b <= self.hi:
                raise ValueError(f"{what}={b} must be a multiple of multiple_of × num_replicas "
                                 f"= {self.q} in [{self.lo}, {self.hi}]")
        self.dataset_size, self.monitor, self.base_batch_size = n, monitor, base_batch_size
        self.rule, self.c, self.min_gain, self.adjust_every = rule, float(c), float(min_gain), adjust_every
        self.max_device_batch, self.drop_last, self.shuffle, self.seed = max_device_batch, drop_last, shuffle, seed
        self.optimizer, self.lr_rule, self.step_time, self.process_group = optimizer, lr_rule, step_time, process_group
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups] if optimizer is not None else []
        self._cur = Cursor(0, 0, 0, base_batch_size, 1.0)
        self._samples = 0  # global samples of the steps planned so far (a fixed schedule's clock)
        if self._fixed is not None:
            self._follow()
        self._times = br.LinearStepTime()
        self._saved_reading: Optional[Reading] = None
        self._perm: Tuple[int, Optional[List[int]]] = (-1, None)
        self._queue: deque = deque()
        self._consuming, self._gen, self._applied = False, 0, 1.0
        self._last_size: Optional[int] = None

    @staticmethod
    def _load_schedule(schedule, monitor, lr_rule) -> List[Tuple[int, int, float]]:
        if monitor is not None or lr_rule is not None:
            raise ValueError("a fixed schedule reads no noise and carries its own lr rule: "
                             "pass monitor=None and lr_rule=None with schedule=")
        if isinstance(schedule, (str, os.PathLike)):
            where = os.fspath(schedule)
            try:
                with open(where, encoding="utf-8") as f:
                    schedule = json.load(f)
            except (OSError, ValueError) as e:
                raise ValueError(f"{where}: cannot read the schedule ({e})") from None
            return segments_from_json(schedule, where)
        return segments_from_json(schedule)

    @staticmethod
    def _check_step_time(step_time) -> Optional[Tuple[float, float]]:
        if step_time is None or callable(step_time):
            return None
        try:
            alpha, beta = (float(v) for v in step_time)
        except (TypeError, ValueError):
            raise ValueError(f"step_time must be a callable, an (alpha, beta) pair or None; got {step_time!r}") from None
        if not (alpha >= 0 and beta > 0 and math.isfinite(alpha + beta)):
            raise ValueError(f"step_time (alpha, beta) needs alpha ≥ 0 and beta > 0, got ({alpha}, {beta})")
        return alpha, beta

    # ---- what the loop sees --------------------------------------------------------
    @property
    def batch_size(self) -> int:
        """The global batch size of the next step planned."""
        return self._cur.batch_size

    @property
    def local_batch_size(self) -> int:
        return self._cur.batch_size // self.num_replicas

    @property
    def micro_batch_sizes(self) -> List[int]:
        """This rank's micro-batch sizes of a full step at the current size."""
        return br.split(self.local_batch_size, self.max_device_batch)

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step at the current size."""
        return len(self.micro_batch_sizes)

    @property
    def lr_multiplier(self) -> float:
        return self._cur.lr_multiplier

    @property
    def epoch(self) -> int:
        return self._cur.epoch

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps of a full epoch at the current size."""
        full, rest = divmod(self.dataset_size, self._cur.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __len__(self) -> int:
        """Micro-batches one full epoch yields at the current size (an estimate)."""
        b, R, m = self._cur.batch_size, self.num_replicas, self.max_device_batch
        full, rest = divmod(self.dataset_size, b)
        n = full * len(br.split(b // R, m))
        return n + (len(br.split(-(-rest // R), m)) if rest and not self.drop_last else 0)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` at its beginning, unless it is the current epoch."""
        if int(epoch) != self._cur.epoch:
            self._cur = self._cur._replace(epoch=int(epoch), position=0)

    def record_step_time(self, seconds: float, batch_size: Optional[int] = None) -> None:
        """Report that an optimizer step of ``batch_size`` samples (default: the step
        ``steps()`` handed out last, else the current size) took ``seconds``."""
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"seconds must be a finite number > 0, got {seconds!r}")
        self._times.add(batch_size or self._last_size or self._cur.batch_size, seconds)

    # ---- decisions -----------------------------------------------------------------
    def _reading(self) -> Optional[Reading]:
        rec = getattr(self.monitor, "last", None) if self.monitor is not None else None
        saved = self._saved_reading
        if rec is not None and (saved is None or rec.step >= saved.step):
            return Reading.of(rec)
        return saved

    def _time_model(self):
        if callable(self.step_time):
            return self.step_time, None
        lin = self._linear or self._times.fit()
        if lin is None:
            return None
        return (lambda b, a=lin[0], s=lin[1]: a + s * b), lin

    def _propose(self, r: Reading) -> int:
        """Rank 0's choice for the next steps (the current size when not worth it)."""
        cur, args = self._cur.batch_size, (self.q, self.lo, self.hi)
        model = self._time_model() if self.rule == "goodput" else None
        if model is None:
            new = br.proportional(r.b_simple, self.c, *args)
            gain = abs(new / cur - 1.0)
        else:
            fn, lin = model
            new = br.best_goodput(r.b_simple, self.base_batch_size, *args, step_time=fn, linear=lin)
            g = [br.goodput(b, r.b_simple, self.base_batch_size, fn) for b in (new, cur)]
            gain = g[0] / g[1] - 1.0
        return new if gain > self.min_gain else cur

    def _broadcast(self, size: int, b_noise: float) -> Tuple[int, float]:
        dev = "cuda" if dist.get_backend(self.process_group) == "nccl" else "cpu"
        t = torch.tensor([float(size), b_noise], dtype=torch.float64, device=dev)
        src = 0 if self.process_group is None else dist.get_global_rank(self.process_group, 0)
        dist.broadcast(t, src=src, group=self.process_group)
        return int(t[0].item()), float(t[1].item())

    def _multiplier(self, size: int, b_noise: float) -> float:
        if self.lr_rule is None:
            return 1.0
        if self.lr_rule == "adascale":
            m = lr_rules.adascale(self.base_batch_size, size, b_noise)
            return self._cur.lr_multiplier if math.isnan(m) else m
        return getattr(lr_rules, self.lr_rule)(self.base_batch_size, size)

    def _follow(self) -> None:
        """Fixed mode: the size and lr multiplier of the segment in force at ``_samples``."""
        _, size, mult = [seg for seg in self._fixed if seg[0] <= self._samples][-1]
        if (size, mult) != (self._cur.batch_size, self._cur.lr_multiplier):
            self._cur = self._cur._replace(batch_size=size, lr_multiplier=mult)

    def _decide(self) -> None:
        size, b_noise = self._cur.batch_size, math.nan
        if self.rank == 0:
            r = self._reading()
            if r is not None and r.usable:
                size, b_noise = self._propose(r), r.b_simple
        if self._distributed:
            size, b_noise = self._broadcast(size, b_noise)
        if size != self._cur.batch_size:
            self._cur = self._cur._replace(batch_size=size, lr_multiplier=self._multiplier(size, b_noise))

    def _apply_lr(self, mult: float) -> None:
        self._applied = mult
        if self.optimizer is None or (self.lr_rule is None and self._fixed is None):
            return
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            if isinstance(g["lr"], torch.Tensor):
                g["lr"].fill_(base * mult)
            else:
                g["lr"] = base * mult

    # ---- the epoch's indices -------------------------------------------------------
    def _permutation(self, epoch: int) -> List[int]:
        if self._perm[0] != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                perm = torch.randperm(self.dataset_size, generator=g).tolist()
            else:
                perm = list(range(self.dataset_size))
            self._perm = (epoch, perm)
        return self._perm[1]

    def _epoch_over(self) -> bool:
        left = self.dataset_size - self._cur.position
        return left <= 0 or (self.drop_last and left < self._cur.batch_size)

    def _adjust_due(self) -> bool:
        c = self._cur
        if self.adjust_every == "epoch":
            return c.position == 0 and c.step > 0
        return c.step > 0 and c.step % self.adjust_every == 0

    def _shard(self, perm: List[int], start: int, take: int) -> List[int]:
        R, N = self.num_replicas, self.dataset_size
        if take % R == 0:
            return perm[start + self.rank:start + take:R]
        idx = perm[start:start + take] + [perm[i % N] for i in range(R - take % R)]
        return idx[self.rank::R]

    def _next_plan(self, perm: List[int]) -> Optional[StepPlan]:
        before = self._cur
        if self._fixed is not None:
            self._follow()
        elif self._adjust_due():
            self._decide()
        c = self._cur
        if self._epoch_over():
            self._cur = c._replace(epoch=c.epoch + 1, position=0)
            return None
        take = min(c.batch_size, self.dataset_size - c.position)
        local = self._shard(perm, c.position, take)
        sizes = br.split(len(local), self.max_device_batch)
        bounds = [sum(sizes[:j]) for j in range(len(sizes) + 1)]
        micro = [local[bounds[j]:bounds[j + 1]] for j in range(len(sizes))]
        self._cur = c._replace(position=c.position + take, step=c.step + 1)
        self._samples += len(local) * self.num_replicas
        if self._epoch_over():
            self._cur = self._cur._replace(epoch=c.epoch + 1, position=0)
        return StepPlan(c.step, c.epoch, c.batch_size, len(local) * self.num_replicas, micro, tuple(sizes),
                        tuple(s / len(local) for s in sizes), c.lr_multiplier, before)

    def __iter__(self) -> Iterator[List[int]]:
        self._gen += 1
        gen = self._gen
        self._queue.clear()
        if self._epoch_over():
            self._cur = self._cur._replace(epoch=self._cur.epoch + 1, position=0)
        epoch = self._cur.epoch
        perm = self._permutation(epoch)
        while gen == self._gen and self._cur.epoch == epoch:
            plan = self._next_plan(perm)
            if plan is None:
                return
            if self._consuming:
                self._queue.append(plan)
            elif plan.lr_multiplier != self._applied:
                self._apply_lr(plan.lr_multiplier)
            yield from plan.micro

    def steps(self, loader, timed: bool = False) -> Iterator[Step]:
        """The loader's micro-batches grouped into optimizer steps (see the module
        docstring). With ``timed`` the seconds from one step's start to the next's are
        reported to :meth:`record_step_time` (the goodput rule's fitted step time)."""
        if getattr(loader, "batch_sampler", self) is not self:
            raise ValueError("steps(loader) needs DataLoader(dataset, batch_sampler=this sampler)")
        if not getattr(loader, "in_order", True):
            raise ValueError("steps(loader) needs a loader that delivers in order (in_order=True)")
        self._consuming, prev = True, None
        self._queue.clear()
        try:
            it = iter(loader)
            while True:
                try:
                    first = next(it)
                except StopIteration:
                    return
                if timed and prev is not None:
                    self._times.add(prev[0], time.perf_counter() - prev[1])
                if not self._queue:
                    raise RuntimeError("a batch arrived that this sampler did not plan: is another "
                                       "iterator drawing from the sampler, or was it reset mid-epoch?")
                plan = self._queue.popleft()
                if plan.lr_multiplier != self._applied:
                    self._apply_lr(plan.lr_multiplier)
                self._last_size = plan.n_samples
                step = Step(plan, first, it)
                prev = (plan.n_samples, time.perf_counter())
                yield step
                step._drain()
        finally:
            self._consuming = False
            if self._queue:  # left early: resume at the first step not handed out
                self._cur, self._gen = self._queue[0].before, self._gen + 1
                self._samples -= sum(p.n_samples for p in self._queue)
            self._queue.clear()

    # ---- checkpoints ---------------------------------------------------------------
    def _resume_point(self) -> Cursor:
        return self._queue[0].before if self._consuming and self._queue else self._cur

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue identically (call between steps)."""
        r = self._reading()
        planned = sum(p.n_samples for p in self._queue) if self._consuming else 0
        return {"version": 1, "dataset_size": self.dataset_size, "num_replicas": self.num_replicas,
                "seed": self.seed, "shuffle": self.shuffle, "cursor": list(self._resume_point()),
                "base_lrs": list(self.base_lrs), "reading": None if r is None else list(r),
                "step_times": self._times.state_dict(), "samples": self._samples - planned}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`; sets the optimizer's lrs for the restored size."""
        if state.get("version") != 1:
            raise ValueError(f"unknown AdaptiveBatchSampler state version {state.get('version')!r}")
        for key in ("dataset_size", "num_replicas", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(f"state has {key}={state[key]!r}, this sampler {getattr(self, key)!r}")
        e, pos, step, b, m = state["cursor"]
        if b % self.q:
            raise ValueError(f"state batch size {b} is not a multiple of {self.q}")
        self._cur = Cursor(int(e), int(pos), int(step), int(b), float(m))
        if self.optimizer is not None and len(state["base_lrs"]) == len(self.base_lrs):
            self.base_lrs = [float(v) for v in state["base_lrs"]]
        self._saved_reading = None if state["reading"] is None else Reading(*state["reading"])
        self._times.load_state_dict(state["step_times"])
        self._samples = int(state.get("samples", 0))
        self._queue.clear()
        self._gen += 1
        self._apply_lr(self._cur.lr_multiplier)
