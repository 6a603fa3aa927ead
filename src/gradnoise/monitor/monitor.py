"""``gradnoise.NoiseMonitor``: the gradient noise of every optimizer step of a training
loop, smoothed, with an interval, per parameter, written to sinks.

Usage (two added lines)::

    monitor = gradnoise.NoiseMonitor(model, optimizer=optimizer, sinks=["run.jsonl"])
    for x, y in loader:
        loss = loss_fn(model(x), y)
        loss.backward()                         # any number of backward() calls per step
        rec = monitor.step(loss=loss)           # before clipping and optimizer.step()
        optimizer.step(); optimizer.zero_grad()

``optimizer`` and ``loss`` are optional: with them the run file carries what advice for
the run needs (the optimizer's class and hyper-parameters, the learning rate and loss of
each measured step, and for Adam-type optimizers the noise of the update direction).

``step()`` returns a :class:`~gradnoise.monitor.record.StepRecord` on measured steps
(every ``every``-th) and None on the others, which cost next to nothing: no router, no
hooks (the DDP communication hook only checks a flag).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import replace
from typing import Iterable, Optional

import torch.distributed as dist
from torch import nn

from .. import formats
from ..capture.compiled import require_stances, unwrap as unwrap_compiled
from ..errors import GradNoiseError
from . import names as _names
from . import precond
from .ddp import DdpSource, allreduce_counts
from .fsdp import fsdp_source
from .moments import Moments
from .record import LayerNoise, StepRecord
from .sinks import as_sink
from .smoother import NoiseSmoother
from .sources import MicrobatchSource, PerSampleSource, SampleCounter, Samples

SOURCES = ("per_sample", "microbatch", "ddp")


def check_options(source: str, reduction: str, every: int) -> None:
    """Refuse an unknown source or reduction, or ``every < 1``, with a clear message."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}; got {source!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if int(every) < 1:
        raise ValueError(f"every must be ≥ 1, got {every}")


class NoiseMonitor:
    """Measure the gradient noise of each optimizer step.

    Args:
        model: the model being trained, possibly wrapped in DistributedDataParallel or
            sharded with FSDP2's ``fully_shard`` (on a 1-D mesh, root included; make the
            monitor after sharding), see :mod:`gradnoise.monitor.fsdp`.
        source: ``"per_sample"`` (exact per-sample norms), ``"microbatch"`` (each
            ``backward()`` call of a step is a group; needs ≥ 2 per step; works with
            BatchNorm; under FSDP2 the passes of all ranks) or ``"ddp"`` (each rank is a group).
        sinks: where records go: :mod:`gradnoise.monitor.sinks` objects, paths ending in
            ``.jsonl``/``.csv``, or anything with ``log_metrics(metrics, step)``.
        every: measure every ``every``-th step (step 0 first).
        beta: EMA decay of the smoothed statistics.
        reduction: ``"mean"``: each micro-batch loss is the mean over its samples times
            its share of the step's samples; ``"sum"``: losses are sums.
        scaler: a ``torch.amp.GradScaler`` whose scale is in the gradients when
            ``step()`` is called (call it before ``scaler.unscale_``); its scale is
            removed and overflow steps are flagged and skipped.
        rules: extra capture rules (per-sample source), see :func:`gradnoise.capture`.
        process_group: the DDP process group (default: the world; FSDP2: its mesh's).
        optimizer: the run's optimizer (read only): its class and hyper-parameters go in
            the run file's header, its learning rate in each step line, and for an
            Adam-type optimizer the preconditioned noise (:mod:`gradnoise.monitor.precond`).
    """

    def __init__(
        self,
        model: nn.Module,
        source: str = "per_sample",
        sinks: Iterable = (),
        every: int = 1,
        beta: float = 0.95,
        reduction: str = "mean",
        scaler=None,
        rules=None,
        process_group=None,
        optimizer=None,
    ):
        check_options(source, reduction, every)
        if optimizer is not None and not hasattr(optimizer, "param_groups"):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        require_stances(model)
        given, model = model, unwrap_compiled(model)  # torch.compile(model): the model inside it
        self.model, self.every, self.scaler = model, int(every), scaler
        self.source = source
        inner, self._prefix = _names.unwrap(given)
        layers = _names.layers(inner)
        self._smoother = NoiseSmoother(beta, {p: layer for layer, e in layers.items() for p in e["params"]})
        self._sinks = [as_sink(s) for s in sinks]
        names = [n for n, p in inner.named_parameters() if p.requires_grad]
        self.optimizer = optimizer
        self._precond = None
        if optimizer is not None and precond.family(optimizer) == "adam":
            self._precond = precond.Preconditioner(optimizer, {p: n for n, p in inner.named_parameters()})
        world = dist.get_world_size(process_group) if dist.is_available() and dist.is_initialized() else 1
        head = formats.run_header(source, self.every, beta, names, layers,
                                  precond.describe(optimizer) if optimizer is not None else None, world)
        for s in self._sinks:
            if hasattr(s, "open"):
                s.open(head)
        # hooks last, so that a sink that fails to open leaves nothing on the model
        self._source = self._make_source(model, given, source, reduction, rules, process_group)
        self._inputs = SampleCounter(given)  # passes and tokens of the measured steps
        self._step = 0
        self._warned_empty = False
        self.last: Optional[StepRecord] = None
        self._begin()

    @staticmethod
    def _make_source(model, given, source, reduction, rules, group):
        """``given``: a ``torch.compile`` wrapper of ``model`` (or ``model``), whose forward hooks
        always run eagerly, where the hooks of the model inside may be compiled without them."""
        sharded = fsdp_source(model, source, reduction, rules)  # FSDP2 (fully_shard)
        if sharded is not None:
            return sharded
        ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        if source == "microbatch":
            if ddp:
                raise GradNoiseError(
                    "source='microbatch' sees one rank's micro-batches while p.grad is "
                    "averaged over ranks, so its numbers would be biased: under "
                    "DistributedDataParallel use source='ddp' or source='per_sample'"
                )
            return MicrobatchSource(given, reduction)
        if source == "ddp":
            return DdpSource(model, reduction, group)
        if ddp:
            world = dist.get_world_size(group)
            return PerSampleSource(given, reduction, rules, allreduce_counts(group), world)
        return PerSampleSource(given, reduction, rules)

    @property
    def step_index(self) -> int:
        """Index of the next optimizer step."""
        return self._step

    def _measured(self, index: int) -> bool:
        return index % self.every == 0

    def _begin(self) -> None:
        self._inputs.take()
        self._inputs.live = True
        self._source.begin()

    def step(self, samples: Samples = None, loss=None) -> Optional[StepRecord]:
        """Close this optimizer step: call after its backward passes, before gradient
        clipping and ``optimizer.step()``.

        Args:
            samples: sample counts when the model's first tensor input does not carry
                them on dim 0: an int (the step's local total) or one int per micro-batch.
            loss: the step's training loss (a number or a tensor; read on measured steps
                only), recorded so that advice can relate the noise to the loss.

        Returns:
            The step's record, or None on a step that is not measured.
        """
        index = self._step
        self._step += 1
        rec = None
        if self._measured(index):
            self._inputs.live = False
            shape = self._inputs.shape()
            moments = self._source.end(samples)
            if moments is not None:
                rec = self._record(index, moments, _loss_value(loss), shape)
            elif not self._warned_empty:
                self._warned_empty = True
                warnings.warn(
                    f"gradnoise: step {index} was to be measured but no gradient reached the "
                    f"{type(self.model).__name__} the monitor watches (was its forward called, "
                    "and loss.backward() before monitor.step()?)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        if self._measured(self._step):
            self._begin()
        return rec

    def _record(self, index: int, m: Moments, loss: Optional[float], shape) -> StepRecord:
        scale = float(self.scaler.get_scale()) if self.scaler is not None else None
        raw = m.stats(scale**2 if scale else 1.0)
        if self._prefix:  # the user's names, not the wrappers'
            raw = replace(raw, by_param={_names.strip(k, self._prefix): v for k, v in raw.by_param.items()})
        skipped = not (math.isfinite(raw.trace_cov) and math.isfinite(raw.grad_sq_norm))
        if not skipped:
            self._smoother.update(raw, self._precond.by_name() if self._precond is not None else None)
        smoothed, interval = self._smoother.smoothed(raw.batch_size, raw.n_groups)
        t_iv, g_iv = self._smoother.intervals()
        pre = self._smoother.preconditioned(raw.batch_size, raw.n_groups)
        rec = StepRecord(index, self.source, raw, smoothed, interval, skipped, raw.flag, scale, t_iv, g_iv,
                         self._smoother.layers(raw.batch_size, raw.n_groups), loss,
                         precond.current_lr(self.optimizer) if self.optimizer is not None else None,
                         shape[0] or None, shape[1], LayerNoise(*pre) if pre is not None else None)
        for s in self._sinks:
            s.write(rec)
        self.last = rec
        return rec

    # ---- checkpoints -------------------------------------------------------------
    def state_dict(self) -> dict:
        """The step counter and the EMAs, for a checkpoint."""
        return {"version": 1, "source": self.source, "every": self.every, "step": self._step,
                "smoother": self._smoother.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue a run: its step counter and averages (call before the next step)."""
        if state.get("version") != 1:
            raise GradNoiseError(f"unknown NoiseMonitor state version {state.get('version')!r}")
        if state["source"] != self.source:
            raise GradNoiseError(f"state of a '{state['source']}' monitor loaded into a '{self.source}' one")
        self._source.discard()
        self._step = int(state["step"])
        self.every = int(state["every"])
        self._smoother.load_state_dict(state["smoother"])
        if self._measured(self._step):
            self._begin()

    # ---- lifetime ------------------------------------------------------------------
    def close(self) -> None:
        """Remove every hook and close the sinks."""
        self._source.close()
        self._inputs.close()
        for s in self._sinks:
            if hasattr(s, "close"):
                s.close()

    def __enter__(self) -> "NoiseMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _loss_value(loss) -> Optional[float]:
    """A loss given to ``step`` as a float (a tensor is read: one transfer, on measured
    steps only); None when not given."""
    if loss is None:
        return None
    try:
        return float(loss.detach() if hasattr(loss, "detach") else loss)
    except (TypeError, ValueError, RuntimeError):
        raise GradNoiseError(f"monitor.step(loss=...) needs a number or a one-element tensor, "
                             f"got {type(loss).__name__}") from None
