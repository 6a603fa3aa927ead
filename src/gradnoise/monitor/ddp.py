"""DistributedDataParallel: ranks as groups, and the all-reduce the per-sample source
needs under DDP. Only a few scalars travel beyond what DDP already sends.

DDP averages the ranks' local gradients with equal weights, ``u = (1/R) Σ_r g_r``. With
``b_r`` samples on rank ``r`` (``B = Σ b_r``) the moments are::

    A = Σ_r (b_r/B) ||g_r||²      C = ||u||²      E[C] = |G|² + tr(Σ) · (1/R²) Σ_r 1/b_r

so the estimator takes ``combo_factor = (1/R²) Σ_r 1/b_r`` (``= 1/B`` for equal counts,
where it is DESIGN.md's formula). The ``b_r`` and ``1/b_r`` are all-reduced with the
``b_r ||g_r||²``: one tensor of ``P + 2`` numbers per measured step. FSDP2 reduces the
same average by a reduce-scatter: :mod:`gradnoise.monitor.fsdp`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ..errors import GradNoiseError
from .moments import Moments
from .sources import SampleCounter, Samples, _resolve, trainable


def allreduce_counts(process_group=None):
    """``f(sums [P], local_count) -> (Σ_r sums [P], B, combo_factor)`` over the ranks."""

    def reduce(sums: torch.Tensor, n: int) -> Tuple[torch.Tensor, float, float]:
        world = dist.get_world_size(process_group)
        extra = torch.tensor([float(n), 1.0 / n], dtype=torch.float64, device=sums.device)
        buf = torch.cat([sums.to(torch.float64), extra])
        dist.all_reduce(buf, group=process_group)
        return buf[:-2], float(buf[-2]), float(buf[-1]) / world**2

    return reduce


class RankSteps:
    """A step's life for a source whose groups are ranks: its hooks record only while
    ``_live``; ``counter`` (a :class:`SampleCounter`) counts this rank's samples."""

    counter: SampleCounter
    _live: bool = False

    def _start(self) -> None:
        self._live = True
        self.counter.take()
        self.counter.live = True

    def discard(self) -> None:
        self._live = False
        self.counter.live = False
        self.counter.take()

    def _stop(self, samples: Samples) -> int:
        """Stop recording; this rank's sample count of the step."""
        self._live = False
        self.counter.live = False
        return sum(_resolve(self.counter.take(), samples, "ddp source"))


class DdpSource(RankSteps):
    """Groups are ranks: each rank's local gradient (all its micro-batches of the step),
    read in a DDP communication hook before the all-reduce, against the all-reduced one."""

    name = "ddp"

    def __init__(self, model: nn.Module, reduction: str, process_group=None):
        if not isinstance(model, nn.parallel.DistributedDataParallel):
            raise GradNoiseError("source='ddp' needs the model wrapped in DistributedDataParallel")
        self.reduction, self.group = reduction, process_group
        self.params = trainable(model)
        self._name_of = {id(p): n for n, p in self.params.items()}
        self.counter = SampleCounter(model)
        self._live = False
        self._local = {}
        try:
            model.register_comm_hook(None, self._comm_hook)
        except RuntimeError as e:
            raise GradNoiseError(
                "source='ddp' must be set up before the first forward pass and needs the "
                f"model's only communication hook ({e})"
            ) from e

    def _comm_hook(self, state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        if self._live:
            norms = torch._foreach_norm(bucket.gradients())
            for p, v in zip(bucket.parameters(), norms):
                self._local[id(p)] = v
        return allreduce_hook(self.group, bucket)

    def begin(self) -> None:
        self._local = {}
        self._start()

    def end(self, samples: Samples) -> Optional[Moments]:
        b = self._stop(samples)
        names = [n for n, p in self.params.items() if id(p) in self._local and p.grad is not None]
        if not names:
            return None
        local = torch.stack([self._local[id(self.params[n])] for n in names]).double().square()
        if self.reduction == "sum":
            local = local / b**2  # local gradient = b · local mean
        total, B, f = allreduce_counts(self.group)(b * local, b)
        grads = [self.params[n].grad.detach() for n in names]
        mean_sq = torch.stack(torch._foreach_norm(grads)).double().square()
        world = dist.get_world_size(self.group)
        if self.reduction == "sum":
            # DDP's average of local sums is (B/R) × the count-weighted mean
            mean_sq = mean_sq * (world / B) ** 2
            f = None
        return Moments(names, (total / B).tolist(), mean_sq.tolist(), int(B), world, f)

    def close(self) -> None:
        self._live = False
        self.counter.close()
