"""Where the samples are in a tensor: the sample axis, followed through shape operations.

A forward pass of ``n`` samples starts from the model's inputs, whose dim 0 holds them.
Every tensor computed from them carries the samples on one dimension ``dim``, possibly
folded with other factors: that dimension has size ``outer · n · inner`` and index
``(o·n + i)·inner + r`` for sample ``i``. So

* ``[B, T, d]``                          -> ``Layout(0)``
* ``x.view(B·T, d)`` (sample-major)       -> ``Layout(0, inner=T)``
* ``x.transpose(0, 1)``: ``[T, B, d]``    -> ``Layout(1)``
* ``.reshape(T·B, d)`` of that (sample-minor) -> ``Layout(0, outer=T)``

:func:`to_samples` moves the samples of such a tensor to the front, ``[n, rest…]``, which
is what every rule computes with. The functions below give the layout of an operation's
output from its input's, without looking at values; ``None`` means the samples cannot be
followed (they were split across dimensions, or mixed), and a rule that later needs them
raises an error naming the operation.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch

Shape = Sequence[int]


class Layout(NamedTuple):
    """The sample axis of a tensor: dimension ``dim`` of size ``outer · n · inner``."""

    dim: int = 0
    outer: int = 1
    inner: int = 1

    def moved(self, dim: int) -> "Layout":
        return Layout(dim, self.outer, self.inner)


def default_layout(shape: Shape, n: int) -> Optional[Layout]:
    """Samples on dim 0, sample-major (``k`` rows per sample): what a tensor computed by
    operations that keep dim 0 has, such as ``[B·T, d]`` from ``view(-1, d)``."""
    if not shape or shape[0] % n or shape[0] < n:
        return None
    return Layout(0, 1, shape[0] // n)


def check(layout: Layout, shape: Shape, n: int) -> bool:
    """True when ``layout`` fits a tensor of ``shape`` for ``n`` samples."""
    return 0 <= layout.dim < len(shape) and shape[layout.dim] == layout.outer * n * layout.inner


def to_samples(t: torch.Tensor, layout: Layout, n: int) -> torch.Tensor:
    """``t`` with its samples first: ``[n, outer, inner, *other dims]`` flattened to
    ``[n, outer·inner, *other dims]`` (a view when possible; positions within a sample
    may be reordered, which no per-sample sum depends on)."""
    d = layout.dim
    if d == 0 and layout.outer == 1:
        return t.reshape(n, layout.inner, *t.shape[1:]) if layout.inner > 1 else t.unsqueeze(1)
    moved = t.movedim(d, 0)
    rest = moved.shape[1:]
    split = moved.reshape(layout.outer, n, layout.inner, *rest)
    return split.movedim(1, 0).reshape(n, layout.outer * layout.inner, *rest)


def sample_rows(t: torch.Tensor, layout: Layout, n: int) -> torch.Tensor:
    """``t`` as ``[n, positions, last dim]``: every position of a sample, samples first."""
    if layout.dim == 0 and layout.outer == 1:
        return t if t.dim() == 3 and t.shape[0] == n else t.reshape(n, -1, t.shape[-1])
    return to_samples(t, layout, n).reshape(n, -1, t.shape[-1])


# ---- propagation through shape operations ------------------------------------------------
def reshaped(layout: Layout, shape: Shape, new: Shape, n: int) -> Optional[Layout]:
    """Layout after ``reshape(new)`` of a tensor of ``shape`` (row-major order kept).

    In the flat order the sample index has stride ``u = inner · prod(shape[dim+1:])`` and
    spans ``n`` values; it lies within output dimension ``j`` when ``prod(new[j+1:])``
    divides ``u`` and ``u·n`` divides ``prod(new[j:])``."""
    after = 1
    for s in shape[layout.dim + 1:]:
        after *= s
    u = layout.inner * after
    v = u * n
    q = 1
    for j in range(len(new) - 1, -1, -1):
        span = q * new[j]
        if u % q == 0 and span % v == 0 and new[j] >= n:
            return Layout(j, span // v, u // q)
        q = span
    return None


def permuted(layout: Layout, order: Sequence[int]) -> Layout:
    """Layout after ``permute(order)``."""
    return layout.moved(list(order).index(layout.dim))


def transposed(layout: Layout, a: int, b: int) -> Layout:
    d = layout.dim
    return layout.moved(b if d == a else a if d == b else d)


def unsqueezed(layout: Layout, at: int) -> Layout:
    """Layout after ``unsqueeze(at)`` (``at`` already non-negative in the output)."""
    return layout.moved(layout.dim + 1) if at <= layout.dim else layout


def squeezed(layout: Layout, shape: Shape, dims: Sequence[int]) -> Optional[Layout]:
    """Layout after removing the size-1 dimensions ``dims`` (non-negative)."""
    dims = [d for d in dims if shape[d] == 1]
    if layout.dim in dims:
        return None if shape[layout.dim] != 1 else layout  # n = 1: nothing moves
    return layout.moved(layout.dim - sum(1 for d in dims if d < layout.dim))


def broadcast(layout: Layout, ndim: int, out_ndim: int) -> Layout:
    """Layout in an output of ``out_ndim`` dims broadcast from ``ndim`` dims (aligned at
    the right, as torch broadcasts)."""
    return layout.moved(layout.dim + out_ndim - ndim)


def reduced(layout: Layout, ndim: int, dims: Optional[Sequence[int]], keepdim: bool) -> Optional[Layout]:
    """Layout after a reduction over ``dims`` (None: all). None when the samples are
    reduced over (pooled)."""
    if dims is None:
        return None
    dims = [d % ndim for d in dims] if ndim else []
    if layout.dim in dims:
        return None
    return layout if keepdim else layout.moved(layout.dim - sum(1 for d in dims if d < layout.dim))


def narrowed(layout: Layout, dim: int, start: int, length: int, size: int, n: int) -> Optional[Layout]:
    """Layout after taking ``[start, start + length)`` of dimension ``dim`` (size ``size``).
    On the sample dimension only whole blocks of ``n·inner`` rows keep every sample."""
    if dim != layout.dim or (start == 0 and length == size):
        return layout
    block = n * layout.inner
    if start % block or length % block:
        return None
    return Layout(dim, length // block, layout.inner)


def joined(layout: Layout, dim: int, parts: int) -> Layout:
    """Layout after ``cat`` of ``parts`` tensors of this layout along ``dim``."""
    if dim != layout.dim:
        return layout
    return Layout(dim, layout.outer * parts, layout.inner)


def matmul_out(layout: Layout, ndim: int, other_ndim: int, out_ndim: int, first: bool) -> Optional[Layout]:
    """Layout of ``a @ b`` from one data operand's (``first``: it is ``a``). None when the
    samples lie on the contracted dimension (each output mixes samples)."""
    d = layout.dim
    if ndim == 1:
        return None
    kept = 1 if other_ndim == 1 else 2  # matrix dims of the output
    out_batch = out_ndim - kept
    if first:
        if d == ndim - 1:
            return None
        if d == ndim - 2:
            return layout.moved(out_batch)
    else:
        if d == ndim - 2:
            return None
        if d == ndim - 1:
            return layout.moved(out_ndim - 1)
    return layout.moved(d + out_batch - (ndim - 2))


def einsum_out(layout: Layout, equation: str, index: int) -> Optional[Layout]:
    """Layout of ``einsum(equation, …)`` from operand ``index``'s: the letter of the sample
    dimension, found in the output (None when it is summed over or repeated)."""
    eq = equation.replace(" ", "")
    if "->" not in eq or "." in eq:
        return None
    ins, out = eq.split("->")
    terms = ins.split(",")
    if index >= len(terms) or layout.dim >= len(terms[index]):
        return None
    letter = terms[index][layout.dim]
    if terms[index].count(letter) != 1 or out.count(letter) != 1:
        return None
    return layout.moved(out.index(letter))


def normalise_dims(dims, ndim: int) -> Tuple[int, ...]:
    """Non-negative dimension indices of ``dims`` (an int or a sequence)."""
    seq = dims if isinstance(dims, (list, tuple)) else (dims,)
    return tuple(int(d) % max(ndim, 1) for d in seq)
