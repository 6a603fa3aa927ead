"""FSDP2 (``torch.distributed.fsdp.fully_shard``): the monitor's three sources on a
model sharded over a 1-D device mesh of ``R`` ranks.

FSDP2 keeps each parameter as a DTensor shard. In forward and backward it computes with
an unsharded copy ``u`` (made at the first all-gather, then reused); after a backward it
reduce-scatters ``u.grad`` into the sharded ``p.grad``, divided by the data-parallel size
``R`` (torch 2.14's default; after ``set_gradient_divide_factor(f)`` by ``f``, which is
undone here). So ``p.grad = (1/R) Σ_r g_r``, as under DDP, and with ``b_r`` samples on
rank ``r`` (``B = Σ b_r``) every source uses DESIGN.md §1 with the weights DDP has:

* ``"per_sample"``: the capture follows ``u``; the ranks' ``Σ_i ||g_i||²`` and counts
  are all-reduced, ``combo_factor = (1/R²) Σ_r 1/b_r`` (see :mod:`.ddp`).
* ``"ddp"``: groups are ranks; ``||g_r||²`` is ``||u.grad||²`` when FSDP2
  reduce-scatters it (a post-accumulate hook on ``u`` reads it at each backward, the one
  FSDP2 calls on the sharded parameter after its reduce-scatter keeps the last). The
  step's backward passes must end in one reduce-scatter:
  ``model.set_requires_gradient_sync(False)`` on all but the last.
* ``"microbatch"``: groups are every backward pass of every rank, ``k = Σ_r k_r``, read
  by gradient hooks on ``u``. Rank ``r``'s pass ``j`` enters ``p.grad`` with weight
  ``w_rj = b_rj / (R b_r)``, so ``combo_factor = Σ w_rj²/b_rj = (1/R²) Σ_r 1/b_r`` again.
  With or without gradient sync between the passes.

``C = ||Δp.grad||²`` (what the step added to ``p.grad``) is summed over the shards by one
all-reduce of ``P`` numbers; ``A`` and the counts by another of ``P + 3``.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..capture.fsdp import fsdp_params, local_shard
from ..errors import GradNoiseError
from .ddp import RankSteps, allreduce_counts
from .moments import Moments
from .sources import MicrobatchSource, PerSampleSource, SampleCounter, Samples, sq_norm, trainable


class Sharding:
    """What the FSDP2 sources share: name -> ``FSDPParam``, the mesh's group and size."""

    def __init__(self, model: nn.Module, fsdp: Dict[str, object]):
        named = trainable(model)
        loose = [n for n in named if n not in fsdp]
        if loose:
            raise GradNoiseError(
                f"parameter '{loose[0]}' is not sharded by fully_shard, so no rank sees its "
                "reduced gradient: call fully_shard on the root module too")
        self.fsdp = fsdp
        mesh = next(iter(fsdp.values())).sharded_param.device_mesh
        self.group, self.world = mesh.get_group(), mesh.size()
        by_fp = {id(fp): n for n, fp in fsdp.items()}
        self.groups = []  # (FSDP2 module, its param groups, names of their parameters)
        for m in model.modules():
            if hasattr(m, "_get_fsdp_state"):
                state = m._get_fsdp_state()
                pgs = [g for g in getattr(state, "_fsdp_param_groups", None) or [state._fsdp_param_group] if g]
                self.groups.append((m, pgs, [by_fp[id(fp)] for g in pgs for fp in g.fsdp_params if id(fp) in by_fp]))

    def watch(self, new: Callable[[str, nn.Parameter], None]) -> List:
        """Call ``new(name, u)`` once for each unsharded parameter ``u`` FSDP2 computes
        with, from forward pre-hooks on the FSDP2 modules (after their unshard)."""
        seen: Dict[str, nn.Parameter] = {}

        def look(names: List[str]) -> None:
            for name in names:
                u = getattr(self.fsdp[name], "_unsharded_param", None)
                if u is not None and seen.get(name) is not u:
                    seen[name] = u
                    new(name, u)

        look(list(self.fsdp))
        return [m.register_forward_pre_hook(lambda *_, names=names: look(names)) for m, _, names in self.groups]

    def c_scale(self) -> Dict[str, float]:
        """``(f/R)²`` per name: what turns ``||p.grad||²`` into that of ``(1/R) Σ_r g_r``
        when FSDP2 divides the summed gradients by ``f`` (default ``f = R``)."""
        out = {}
        for _, pgs, names in self.groups:
            for g in pgs:
                f = getattr(g, "gradient_divide_factor", None) or self.world
                out.update((n, (f / self.world) ** 2) for n in names)
        return out

    def mean_sq(self, names: List[str], deltas: List[torch.Tensor]) -> torch.Tensor:
        """``[P]`` float64 ``C`` of the whole gradients from this rank's shards."""
        sq = torch.stack(torch._foreach_norm(deltas)).double().square()
        dist.all_reduce(sq, group=self.group)
        scale = self.c_scale()
        return sq * torch.tensor([scale[n] for n in names], dtype=torch.float64, device=sq.device)

    def allreduce(self, sums: torch.Tensor, n: int, groups: int):
        """``(Σ_r sums, B, (1/R²) Σ_r 1/b_r, Σ_r groups)`` over the mesh."""
        extra = torch.tensor([float(n), 1.0 / n, float(groups)], dtype=torch.float64, device=sums.device)
        buf = torch.cat([sums.to(torch.float64), extra])
        dist.all_reduce(buf, group=self.group)
        return buf[:-3], float(buf[-3]), float(buf[-2]) / self.world**2, int(round(float(buf[-1])))


def fsdp_source(model: nn.Module, source: str, reduction: str, rules=None):
    """The source for a model sharded by FSDP2, or None when it is not."""
    fsdp = fsdp_params(model, list(trainable(model).items()))
    if not fsdp:
        return None
    sh = Sharding(model, fsdp)
    if source == "per_sample":
        return FsdpPerSampleSource(model, reduction, rules, sh)
    if source == "ddp":
        return FsdpDdpSource(model, reduction, sh)
    return FsdpMicrobatchSource(model, reduction, sh)


def _step_delta(grad: torch.Tensor, before: Optional[torch.Tensor]) -> torch.Tensor:
    g = local_shard(grad.detach())
    return g if before is None else g - before


def _snapshot(p: nn.Parameter) -> Optional[torch.Tensor]:
    return None if p.grad is None else local_shard(p.grad.detach()).clone()


class FsdpPerSampleSource(PerSampleSource):
    """Per-sample norms on an FSDP2 model: the capture follows the unsharded parameters
    and sums the shards' ``C``; sums and counts are all-reduced as under DDP."""

    def __init__(self, model: nn.Module, reduction: str, rules, sh: Sharding):
        super().__init__(model, reduction, rules, allreduce_counts(sh.group))
        self.sh = sh

    def end(self, samples: Samples) -> Optional[Moments]:
        n = None if self._cap is None else self._cap.store.batch_size
        m = super().end(samples)
        if m is None:
            return None
        scale = self.sh.c_scale()
        mean_sq = [c * scale[k] for k, c in zip(m.names, m.mean_sq)]
        if self.reduction == "sum":  # p.grad = (1/R) Σ_i g_i = (B/R)·ḡ; the capture divided by n²
            mean_sq = [c * (n * self.sh.world / m.batch_size) ** 2 for c in mean_sq]
            return Moments(m.names, m.group_sq, mean_sq, m.batch_size, m.n_groups)
        return Moments(m.names, m.group_sq, mean_sq, m.batch_size, m.n_groups, m.combo_factor)


class FsdpDdpSource(RankSteps):
    """Groups are ranks: each rank's unsharded gradient of the step, as FSDP2
    reduce-scatters it, against the reduced one."""

    name = "ddp"

    def __init__(self, model: nn.Module, reduction: str, sh: Sharding):
        self.reduction, self.sh = reduction, sh
        self.params = trainable(model)
        self.counter = SampleCounter(model)
        self._live = False
        self._pending: Dict[str, torch.Tensor] = {}
        self._local: Dict[str, torch.Tensor] = {}
        self._before: Dict[str, Optional[torch.Tensor]] = {}
        self._twice: Optional[str] = None
        self._handles: List = []
        self._handles += sh.watch(self._watch)
        self._handles += [fp.sharded_param.register_post_accumulate_grad_hook(
            lambda _, name=name: self._reduced(name)) for name, fp in sh.fsdp.items()]

    def _watch(self, name: str, u: nn.Parameter) -> None:
        self._handles.append(u.register_post_accumulate_grad_hook(lambda _, name=name: self._accumulated(name)))

    def _accumulated(self, name: str) -> None:
        """After a backward pass accumulated into ``u.grad``: the rank's gradient so far."""
        if not self._live:
            return
        fp = self.sh.fsdp[name]
        if name not in self._before:
            self._before[name] = _snapshot(self.params[name])
        g, acc = fp._unsharded_param.grad.detach(), getattr(fp, "unsharded_accumulated_grad", None)
        self._pending[name] = sq_norm(g if acc is None else acc + g)  # reduce dtype: FSDP2 keeps a sum

    def _reduced(self, name: str) -> None:
        """FSDP2 has reduce-scattered ``name``'s gradient into its shard."""
        if self._live and name in self._pending:
            if name in self._local:
                self._twice = name
            self._local[name] = self._pending.pop(name)

    def begin(self) -> None:
        self._pending, self._local, self._before, self._twice = {}, {}, {}, None
        self._start()

    def end(self, samples: Samples) -> Optional[Moments]:
        b = self._stop(samples)
        if self._twice is not None:
            raise GradNoiseError(
                f"source='ddp' under FSDP2: '{self._twice}' was reduce-scattered twice in one step, so "
                "no rank saw its whole local gradient: call model.set_requires_gradient_sync(False) "
                "before all but the step's last backward()")
        if self._pending and not self._local:
            raise GradNoiseError(
                "source='ddp' under FSDP2: no reduce-scatter ran in this step; the step's last "
                "backward() needs model.set_requires_gradient_sync(True)")
        names = [n for n, p in self.params.items() if n in self._local and p.grad is not None]
        if not names:
            return None
        local = torch.stack([self._local[n] for n in names]).double()
        if self.reduction == "sum":
            local = local / b**2  # local gradient = b · local mean
        total, B, f, _ = self.sh.allreduce(b * local, b, 1)
        deltas = [_step_delta(self.params[n].grad, self._before.get(n)) for n in names]
        mean_sq = self.sh.mean_sq(names, deltas)
        if self.reduction == "sum":  # (1/R) Σ_r b_r·mean_r = (B/R)·ḡ
            mean_sq, f = mean_sq * (self.sh.world / B) ** 2, None
        return Moments(names, (total / B).tolist(), mean_sq.tolist(), int(B), self.sh.world, f)

    def close(self) -> None:
        self.discard()
        for h in self._handles:
            h.remove()
        self._handles = []
        self.counter.close()


class FsdpMicrobatchSource(MicrobatchSource):
    """Groups are the backward passes of all ranks, read by gradient hooks on FSDP2's
    unsharded parameters (kept for the monitor's life, acting only on measured steps)."""

    min_passes = 1  # one pass per rank is k = R ≥ 2 groups already

    def __init__(self, model: nn.Module, reduction: str, sh: Sharding):
        super().__init__(model, reduction)
        self.sh = sh
        self._live = False
        self._u_handles: List = []
        self._u_handles += sh.watch(self._watch)

    def _watch(self, name: str, u: nn.Parameter) -> None:
        hook = self._hook(name, u)
        self._u_handles.append(u.register_hook(lambda g: hook(g) if self._live else None))

    def begin(self) -> None:
        self._passes, self._before = [], {}
        self.counter.take()
        self.counter.live = self._live = True

    def end(self, samples: Samples) -> Optional[Moments]:
        self._live = False
        return super().end(samples)

    def discard(self) -> None:
        self._live = False
        super().discard()

    def _snapshot(self, name: str) -> Optional[torch.Tensor]:
        return _snapshot(self.params[name])

    def _moments(self, names: List[str], group_sq: torch.Tensor, b: torch.Tensor) -> Moments:
        n = int(b.sum())
        total, B, f, k = self.sh.allreduce((b * group_sq).sum(0), n, b.shape[0])
        deltas = [_step_delta(self.params[x].grad, self._before.get(x)) for x in names]
        mean_sq = self.sh.mean_sq(names, deltas)
        if self.reduction == "sum":  # (1/R) Σ_r Σ_j b_rj·mean_rj = (B/R)·ḡ
            mean_sq, f = mean_sq * (self.sh.world / B) ** 2, None
        return Moments(names, (total / B).tolist(), mean_sq.tolist(), int(B), k, f)

    def close(self) -> None:
        self._live = False
        for h in self._u_handles:
            h.remove()
        self._u_handles = []
        super().close()
