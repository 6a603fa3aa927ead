"""Where the monitor's per-step moments come from.

* :class:`PerSampleSource` — exact per-sample norms from :func:`gradnoise.capture`
  (``k = B`` groups of one sample). Under DistributedDataParallel the ranks' sums and
  sample counts are all-reduced (a few scalars).
* :class:`MicrobatchSource` — the gradient of each ``backward()`` call of the step,
  read by parameter hooks as its squared norm (no copies): groups are micro-batches. It
  works on any model, BatchNorm in training mode included.
* :class:`~gradnoise.monitor.ddp.DdpSource` — groups are data-parallel ranks.
* :mod:`gradnoise.monitor.fsdp` — the three on a model sharded by FSDP2's ``fully_shard``.

Each source has ``begin()`` (a measured step starts), ``end(samples) -> Moments`` and
``close()``. Conventions: within a step, each micro-batch loss is scaled by its share
``b_j/B`` of the step's samples (``reduction="mean"``) or is a plain sum (``"sum"``);
forward and backward alternate per micro-batch. Sample counts come from the leading
dimension of the model's first tensor input unless ``end`` is told.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..capture import Capture
from ..capture.compiled import hold_eager, refuse_compiled_region
from ..errors import CaptureStateError, GradNoiseError
from .moments import Moments

Samples = Union[None, int, Sequence[int]]


def sq_norm(t: torch.Tensor) -> torch.Tensor:
    """``||t||²`` as a 0-d tensor, in float32 at least."""
    low = t.dtype in (torch.float16, torch.bfloat16)
    return torch.linalg.vector_norm(t, dtype=torch.float32 if low else None).square()


def trainable(model: nn.Module) -> Dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def forward_pre_hook(model: nn.Module, owner, method: str, with_kwargs: bool = False):
    """Register ``owner.<method>`` as a forward pre-hook of ``model`` through a weak
    reference, acting only for ``model`` itself: a ``copy.deepcopy`` of the model copies
    its hooks, and the copy's forward must not drive this monitor. Where ``torch.compile``
    inlines the model's hooks (a ``torch.nn`` container, an in-place ``model.compile()``)
    Dynamo traces it: a waiting per-sample monitor has compiled code run eagerly, so a
    capture is never opened inside a graph."""
    ref = weakref.ref(owner)

    def hook(module, *args):
        target = ref()
        if target is not None and module is target.model:
            return getattr(target, method)(module, *args)
        return None

    return model.register_forward_pre_hook(hook, with_kwargs=with_kwargs)


class SampleCounter:
    """Counts samples per forward pass of ``model`` from its first tensor input's dim 0,
    and its positions per sample where that input is token ids (an integer tensor
    ``[B, T, …]``: ``T·…``; None otherwise)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.sizes: List[int] = []
        self.tokens: List[Optional[int]] = []
        self.live = False
        self._handle = forward_pre_hook(model, self, "_pre", with_kwargs=True)

    def _pre(self, module, args, kwargs):
        if not self.live or not torch.is_grad_enabled():
            return
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor) and a.dim() > 0:
                ids = a.dim() >= 2 and not (a.is_floating_point() or a.is_complex() or a.dtype == torch.bool)
                self.sizes.append(int(a.shape[0]))
                self.tokens.append(a[0].numel() if ids else None)
                return

    def take(self) -> List[int]:
        sizes, self.sizes, self.tokens = self.sizes, [], []
        return sizes

    def shape(self) -> Tuple[int, Optional[float]]:
        """``(passes, tokens per sample)`` counted since the last :meth:`take`, then
        cleared; tokens per sample is None unless every pass had token ids."""
        sizes, tokens = self.sizes, self.tokens
        self.take()
        if not sizes or None in tokens:
            return len(sizes), None
        return len(sizes), sum(t * b for t, b in zip(tokens, sizes)) / sum(sizes)

    def close(self) -> None:
        self._handle.remove()


def _resolve(counted: List[int], samples: Samples, what: str) -> List[int]:
    if samples is None:
        if not counted:
            raise GradNoiseError(
                f"no samples were counted for this step ({what}): the model saw no batched "
                "tensor input; pass the counts to monitor.step(samples=...)"
            )
        return counted
    return [int(samples)] if isinstance(samples, int) else [int(s) for s in samples]


class PerSampleSource:
    """Per-sample norms from the capture engine, opened at the step's first forward."""

    name = "per_sample"

    def __init__(self, model: nn.Module, reduction: str, rules=None, allreduce: Optional[Callable] = None,
                 world: Optional[int] = None):
        """``allreduce``: :func:`~gradnoise.monitor.ddp.allreduce_counts` under data
        parallelism. ``world``: the DDP world size ``R``, given when ``p.grad`` is DDP's
        average ``(1/R) Σ_r`` of the ranks' gradients and nothing else corrects ``C``
        for it (a subclass that applies its own correction passes None)."""
        self.model, self.reduction, self.rules, self.allreduce = model, reduction, rules, allreduce
        self.world = world
        self._cap: Optional[Capture] = None
        self._pending = False
        self._release: Optional[weakref.finalize] = None
        self._handle = forward_pre_hook(model, self, "_open", with_kwargs=True)

    def _open(self, module, args, kwargs):
        if self._pending and torch.is_grad_enabled():
            self._pending = False
            # scope="forward": the router is on only while the model's forward runs, so
            # an exception before step() leaves nothing of gradnoise active
            cap = Capture(self.model, self.reduction, self.rules, scope="forward").__enter__()
            self._cap = cap
            cap.forward_starts(module, args, kwargs)  # its own pre-hook joins from the next call

    def begin(self) -> None:
        """A measured step comes: from here until its :meth:`end` (or until this source is
        closed or garbage collected), compiled code runs eagerly, so that the step's forward
        is seen by the capture however the model was compiled (a stance set inside a compiled
        call would not reach the rest of it)."""
        self._pending = True
        if self._release is None:
            refuse_compiled_region("a per-sample monitor stepped")
            self._release = weakref.finalize(self, hold_eager())

    def _close(self) -> Optional[Capture]:
        self._pending = False
        cap, self._cap = self._cap, None
        try:
            if cap is not None:
                cap.__exit__(None, None, None)
        finally:
            if self._release is not None:
                self._release()
                self._release = None
        return cap

    def end(self, samples: Samples) -> Optional[Moments]:
        cap = self._close()
        if cap is None:
            return None
        norms = cap.per_sample_sq_norms
        if not norms:
            return None
        names = list(norms)
        n = cap.batch_size
        sums, c = cap.sq_norm_sums, cap.mean_sq_norms
        mean_sq = [c[k] for k in names]
        if self.allreduce is None:
            return Moments(names, [sums[k] / n for k in names], mean_sq, n, n)
        total, count, inv = self.allreduce(torch.tensor([sums[k] for k in names], dtype=torch.float64), n)
        if self.world is not None and self.reduction == "sum":
            # DDP's average of the ranks' sum losses: p.grad = (1/R) Σ_i g_i = (B/R)·ḡ,
            # and the capture divided ||p.grad||² by n², so C = mean_sq · (n·R/B)²; every
            # sample weighs 1/B in ḡ, so the combination factor is the plain 1/B (None)
            mean_sq = [c * (n * self.world / count) ** 2 for c in mean_sq]
            inv = None
        return Moments(names, (total / count).tolist(), mean_sq, int(count), int(count), inv)

    def discard(self) -> None:
        self._close()

    def close(self) -> None:
        self.discard()
        self._handle.remove()


class MicrobatchSource:
    """Group-mean gradients of each backward pass, through parameter hooks."""

    name = "microbatch"
    min_passes = 2  # groups a step needs on this process

    def __init__(self, model: nn.Module, reduction: str):
        self.reduction = reduction
        self.params = trainable(model)
        self.counter = SampleCounter(model)
        self._handles: list = []
        self._passes: List[Dict[str, torch.Tensor]] = []
        self._before: Dict[str, Optional[torch.Tensor]] = {}
        self._warned = False
        self._measured = 0  # measured steps that reached end()

    def begin(self) -> None:
        self._passes, self._before = [], {}
        self.counter.take()
        self.counter.live = True
        self._handles = [p.register_hook(self._hook(n, p)) for n, p in self.params.items()]

    def _hook(self, name: str, p: nn.Parameter):
        def hook(grad: torch.Tensor) -> None:
            if name not in self._before:  # the step's first pass: note what p.grad held
                self._before[name] = self._snapshot(name)
            passes = self._passes
            n_pass = len(self.counter.sizes)
            while len(passes) < n_pass:
                passes.append({})
            if not passes:
                passes.append({})
            current = passes[-1]
            sq = sq_norm(grad.detach())
            current[name] = current[name] + sq if name in current else sq

        return hook

    def end(self, samples: Samples) -> Optional[Moments]:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.counter.live = False
        sizes = _resolve(self.counter.take(), samples, "microbatch source")
        passes = self._passes
        if not passes:
            return None
        if len(sizes) != len(passes):
            raise CaptureStateError(
                f"{len(sizes)} micro-batch sizes for {len(passes)} backward passes in this step: "
                "the monitor counts a micro-batch at each forward call of the model it "
                "watches, so watch the module whose forward runs (or pass samples= to match "
                "the backward calls)"
            )
        self._measured += 1
        if len(passes) < self.min_passes:
            self._single(len(passes))
        B = sum(sizes)
        names = [n for n, p in self.params.items() if p.grad is not None]
        if not names:
            return None
        # [k, P] squared norms of each pass's gradient; a pass that missed a parameter
        # gave it zero gradient
        first = next((v for p in passes for v in p.values()), torch.zeros(()))
        zero = torch.zeros((), dtype=first.dtype, device=first.device)
        per_pass = torch.stack([torch.stack([p.get(n, zero) for n in names]) for p in passes]).double()
        b = torch.tensor(sizes, dtype=torch.float64, device=per_pass.device).unsqueeze(1)
        # pass gradient = (b/B)·group mean ("mean") or b·group mean ("sum")
        group_sq = per_pass * (B / b) ** 2 if self.reduction == "mean" else per_pass / b**2
        return self._moments(names, group_sq, b)

    def _single(self, k: int) -> None:
        """A step with one backward pass has one group: ``tr(Σ)`` is undefined
        (``single_group``). On the first measured step that is a set-up mistake, refused
        with the recipe; later (a short last accumulation, say) the step is flagged and
        skipped, with one warning."""
        what = (f"the microbatch source needs at least two backward() calls per optimizer step "
                f"(gradient accumulation); this step had {k}, one group, so tr(Σ) is undefined (single_group)")
        if self._measured == 1:
            raise GradNoiseError(f"{what}: split each step's batch into k ≥ 2 micro-batches, one forward and "
                                 "backward() each with its mean loss times b_j/B, then call monitor.step() once; "
                                 "or use source='ddp' across ranks, or source='per_sample' without BatchNorm")
        if not self._warned:
            self._warned = True
            warnings.warn(f"gradnoise: {what}; such steps are flagged single_group and skipped",
                          RuntimeWarning, stacklevel=4)

    def _moments(self, names: List[str], group_sq: torch.Tensor, b: torch.Tensor) -> Moments:
        """The step's moments from ``[k, P]`` squared group-mean norms and ``[k, 1]`` sizes."""
        B = int(b.sum())
        grads = [self._delta(n) for n in names]
        mean_sq = torch.stack(torch._foreach_norm(grads)).double().square()
        if self.reduction == "sum":
            mean_sq = mean_sq / B**2
        a = (b / B * group_sq).sum(0)
        return Moments(names, a.tolist(), mean_sq.tolist(), B, b.shape[0])

    def _snapshot(self, name: str) -> Optional[torch.Tensor]:
        """A copy of what ``p.grad`` holds before the step's first pass reaches it."""
        g = self.params[name].grad
        return None if g is None else g.detach().clone()

    def _delta(self, name: str) -> torch.Tensor:
        g = self.params[name].grad.detach()
        before = self._before.get(name)
        return g if before is None else g - before

    def discard(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.counter.live = False
        self.counter.take()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.counter.close()
