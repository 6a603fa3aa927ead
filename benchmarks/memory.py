"""Peak CPU memory of one call: the high-water mark of bytes allocated during it.

CPU PyTorch keeps no allocator statistics (``torch.cuda.max_memory_allocated`` has no CPU
twin), so this module offers two measurements of the same quantity:

    peak = max over time of  (bytes allocated during the call that are still live)

Memory that was live before the call is the baseline and is not counted; freeing such
memory during the call does not lower the count either (neither method can see the size
of a block it did not see allocated). For a training step, that means ``zero_grad``
freeing last step's gradients does not offset this step's new ones: the result is what
the step allocates at its busiest moment.

* :func:`peak_bytes_profiler` (default): ``torch.profiler`` with ``profile_memory=True``
  records every allocation and free that goes through PyTorch's CPU allocator, including
  scratch tensors allocated inside kernels. The allocation events are replayed in time
  order, counting frees only of blocks allocated within the call.
* :func:`peak_bytes_dispatch`: a ``TorchDispatchMode`` that sees every ATen op's outputs,
  counts each newly created storage once, and subtracts it from a ``weakref.finalize``
  callback when the storage dies. It sees only tensors returned by ops, not scratch
  memory inside a kernel; it serves as an independent cross-check.

Both are checked on known allocation patterns by :func:`self_check`
(``python benchmarks/memory.py``).
"""
from __future__ import annotations

import contextlib
import os
import sys
import weakref
from typing import Callable, Dict, List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MiB = 1 << 20


# ---- profiler-based ---------------------------------------------------------------------
def _allocation_events(prof: "torch.profiler.profile") -> List[Tuple[int, int, int]]:
    """``(time_ns, ptr, signed_size)`` of every CPU allocator event, in time order."""
    from torch._C._profiler import _EventType

    events: List[Tuple[int, int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            f = node.extra_fields
            if f.device.type == "cpu":
                events.append((node.start_time_ns, f.ptr, f.alloc_size))
        stack.extend(node.children)
    events.sort(key=lambda e: e[0])  # stable: ties keep the recorded order
    return events


def peak_from_events(events: List[Tuple[int, int, int]]) -> int:
    """High-water mark of live in-call bytes from ``(time, ptr, signed size)`` events.

    A free (negative size) counts only if the pointer was allocated by an earlier event
    of the same list; frees of older blocks are ignored.
    """
    live_blocks: Dict[int, int] = {}
    live = peak = 0
    for _, ptr, size in events:
        if size > 0:
            live_blocks[ptr] = size
            live += size
            peak = max(peak, live)
        elif size < 0 and ptr in live_blocks:
            live -= live_blocks.pop(ptr)
    return peak


@contextlib.contextmanager
def _quiet_fd2():
    """Send file descriptor 2 to /dev/null: the profiler's C++ side logs every start/stop."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def peak_bytes_profiler(fn: Callable[[], object], quiet: bool = True) -> int:
    """Peak bytes allocated during ``fn()`` through the CPU allocator (see module doc).

    ``quiet`` hides the profiler's own stderr lines while it runs (``fn``'s too).
    """
    from torch.profiler import ProfilerActivity, profile

    with _quiet_fd2() if quiet else contextlib.nullcontext():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    return peak_from_events(_allocation_events(prof))


# ---- dispatch-mode-based ----------------------------------------------------------------
class StorageTracker(TorchDispatchMode):
    """Tracks bytes of storages created by ATen ops while the mode is active.

    An output storage is new when it is neither the storage of an input of the op (views,
    in-place and ``out=`` ops alias their inputs) nor already tracked. Its bytes are added
    on creation and removed by a ``weakref.finalize`` on the storage object, which PyTorch
    keeps alive for as long as the C++ storage lives (autograd-saved tensors included).
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: Dict[int, int] = {}
        self._finalizers: List[weakref.finalize] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {
            t.untyped_storage()._cdata
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage(), inputs)
        return out

    def _track(self, storage: torch.UntypedStorage, inputs: set) -> None:
        key = storage._cdata
        if key in inputs or key in self._sizes or storage.device.type == "meta":
            return
        size = storage.nbytes()
        self._sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        self._finalizers.append(weakref.finalize(storage, self._free, key))

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        # Storages still alive after the call must not call back into this object later.
        for fin in self._finalizers:
            fin.detach()
        self._finalizers.clear()
        return out


def peak_bytes_dispatch(fn: Callable[[], object]) -> int:
    """Peak bytes of op-created tensor storages during ``fn()`` (see module doc)."""
    with StorageTracker() as tracker:
        fn()
    return tracker.peak


METHODS: Dict[str, Callable[[Callable[[], object]], int]] = {
    "profiler": peak_bytes_profiler,
    "dispatch": peak_bytes_dispatch,
}


# ---- validation -------------------------------------------------------------------------
def _pattern(keep: List[torch.Tensor]) -> None:
    """Known pattern, sizes in MiB; expected peak 7 MiB (a + b + c)."""
    a = torch.empty(MiB // 4)  # 1 live 1
    b = torch.empty(MiB // 2)  # 2 live 3
    c = torch.empty(MiB)  # 4 live 7  <- peak
    del b  # live 5
    keep.clear()  # frees a 1 MiB block from before the call: not counted
    d = torch.empty(MiB // 2)  # 2 live 7 (peak unchanged)
    v = c.view(-1, 2)  # view: no new bytes
    v.mul_(0.0)  # in-place: no new bytes
    torch.add(a, 1.0, out=a)  # out=: no new bytes
    del c, v  # live 3
    e = torch.empty(3 * MiB // 4)  # 3 live 6
    del a, d, e


def _pattern_autograd() -> None:
    """Forward saves the exp output (4 MiB); backward makes a 4 MiB grad. Peak 8 MiB + ε."""
    w = torch.zeros(MiB, requires_grad=True)  # 4 MiB, live 4
    y = w.exp()  # 4 MiB saved by ExpBackward, live 8
    loss = y.sum()  # 4 bytes
    del y  # still saved by the graph
    loss.backward()  # grad_y (expand, no bytes) -> grad_w 4 MiB, graph freed
    del loss


def self_check(verbose: bool = True) -> Dict[str, Dict[str, int]]:
    """Run both methods on the known patterns; raise AssertionError on a wrong peak."""
    expected = {"pattern": 7 * MiB, "autograd": 12 * MiB}
    results: Dict[str, Dict[str, int]] = {}
    for name, measure in METHODS.items():
        keep = [torch.empty(MiB // 4)]
        p1 = measure(lambda: _pattern(keep))
        p2 = measure(_pattern_autograd)
        results[name] = {"pattern": p1, "autograd": p2}
        if verbose:
            print(f"{name:9s} pattern {p1 / MiB:.4f} MiB (expect 7)  "
                  f"autograd {p2 / MiB:.4f} MiB (expect 12: w 4 + saved exp 4 + grad 4)")
        for key, value in results[name].items():
            # small scalars (the loss, wrapped Python numbers) are allowed on top
            assert expected[key] <= value <= expected[key] + 4096, (name, key, value)
    return results


if __name__ == "__main__":
    self_check()
    print("memory self-check passed")
