"""The forms in which a rule hands over one use's per-sample gradients ``G_n``.

* :class:`Factored` — ``G_n = Σ_t r_nt ⊗ c_nt``: a Linear weight (``r = δ`` the output
  gradient, ``c = a`` the input), a convolution on unfolded patches, a transposed use
  (``w.t()``: the factors swap). ``rows`` may cover a span ``[start, start + R)`` of the
  parameter's rows (a slice ``w[e:2e]`` of a packed projection).
* :class:`Lookup` — a table ``[V, C]`` looked up with ids: row ``v`` of ``G_n`` is
  ``Σ_{t: id_nt = v} c_nt`` (``r_nt`` is the one-hot vector of ``id_nt``; id −1 is a
  position that gives no gradient, such as ``padding_idx``).
* :class:`Dense` — ``G_n`` itself, ``[n, *shape]``.

Nothing here materialises ``[n, numel]`` for a factored form unless asked to
(:meth:`Factored.materialise`). Squared norms and inner products follow from the factors::

    ||G_n||²      = Σ_{t,s} (r_t·r_s)(c_t·c_s)                 O(T²(R + C))
    ⟨G_n, G'_n⟩   = Σ_{t,s} (r_t·r'_s)(c_t·c'_s)               (r·r' over the rows both span)
    Lookup:  r_t·r'_s = r'_s[id_t]   and   [id_t = id'_s] for two lookups

A use whose partner use arrives later in the backward pass is reduced to its *projection*
on the partner's forward factor ``x`` (the partner's input ``a``, or its ids), known since
the forward pass: ``Q_t = G_n x_t`` (contracted on ``x``'s side), ``[n, T, d]``; when the
partner's own factor ``y`` arrives, ``⟨G_n, G^partner_n⟩ = Σ_t y_t·Q_t``. For a tied
table and output layer that is ``Q_t = Σ_s δ_s[id_t] h_s``: ``O(T²·d)``, never ``[n, V·d]``.

Shapes: ``n`` samples, ``T`` positions per sample. Every result is in the accumulation
dtype: float64 stays float64, anything else is float32.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch

ONE_PASS = 1 << 16  # rows up to this many elements: one fused norm (within ~3e-7 in float32)
_BLOCK = 1 << 12     # longer rows: partial norms of this many elements, added in float64


def acc(t: torch.Tensor) -> torch.Tensor:
    """``t`` in its accumulation dtype: float64 stays, anything else becomes float32."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def sq_norms(t: torch.Tensor) -> torch.Tensor:
    """``Σ t²`` over every dimension but the first: ``[n, …] -> [n]``.

    Rows longer than 65536 elements are summed in blocks of 4096 by one fused norm kernel
    each, and the blocks' squares added in float64: within ~1e-8 of a float64 sum on rows
    of tens of millions of float32 entries (one norm over the whole row drifts by ~5e-3
    there), at the speed of the fused kernel. Half-precision input is read in float32."""
    n = t.shape[0]
    low = t.dtype in (torch.float16, torch.bfloat16)
    dtype = torch.float32 if low else None
    if t.dim() == 1:  # a scalar parameter's gradients
        return acc(t).square()
    if t.numel() <= ONE_PASS * max(n, 1):
        return torch.linalg.vector_norm(t, dim=tuple(range(1, t.dim())), dtype=dtype).square()
    flat = t.reshape(n, -1)
    m = flat.shape[1]
    full = m - m % _BLOCK
    parts = torch.linalg.vector_norm(flat[:, :full].reshape(n, -1, _BLOCK), dim=2, dtype=dtype)
    total = parts.double().square().sum(1)
    if full < m:
        total += torch.linalg.vector_norm(flat[:, full:], dim=1, dtype=dtype).double().square()
    return total.to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def _gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[n, T, d] × [n, S, d] -> [n, T, S]`` of inner products, in the accumulation dtype."""
    return torch.bmm(acc(a), acc(b).transpose(1, 2))


class Factored(NamedTuple):
    """``G_n = Σ_t rows[n, t] ⊗ cols[n, t]``: ``rows`` ``[n, T, R]`` covering parameter
    rows ``[start, start + R)`` of ``num_rows``, ``cols`` ``[n, T, C]``.

    ``fwd`` names the factor known since the forward pass (``"cols"``: a Linear's input;
    ``"rows"``: the input of a transposed use)."""

    rows: torch.Tensor
    cols: torch.Tensor
    num_rows: Optional[int] = None  # rows of the whole parameter (None: R, no span)
    start: int = 0
    fwd: str = "cols"
    sq: Optional[torch.Tensor] = None  # ||G_n||², when the rule has it already

    @property
    def n(self) -> int:
        return self.rows.shape[0]

    @property
    def positions(self) -> int:
        return self.rows.shape[1]

    def slice(self, lo: int, hi: int) -> "Factored":
        return self._replace(rows=self.rows[lo:hi], cols=self.cols[lo:hi],
                             sq=None if self.sq is None else self.sq[lo:hi])

    def swapped(self) -> "Factored":
        """The same gradients transposed (a use of ``w.t()``); only for whole rows."""
        return Factored(self.cols, self.rows, self.cols.shape[-1], 0, "rows" if self.fwd == "cols" else "cols")

    def gram_sq_norms(self) -> torch.Tensor:
        """``||G_n||² = Σ_{t,s} (r_t·r_s)(c_t·c_s)``, ``[n]``."""
        if self.sq is not None:
            return self.sq
        if self.positions == 1:
            return sq_norms(self.rows) * sq_norms(self.cols)
        return (_gram(self.rows, self.rows) * _gram(self.cols, self.cols)).sum((1, 2))

    def materialise(self) -> torch.Tensor:
        """``G_n`` ``[n, R, C]`` (rows of the span only)."""
        return torch.bmm(self.rows.transpose(1, 2), self.cols)

    def total(self) -> torch.Tensor:
        """``Σ_n G_n`` ``[R, C]``."""
        r, c = self.rows, self.cols
        return r.reshape(-1, r.shape[-1]).t().mm(c.reshape(-1, c.shape[-1]))

    def elements(self) -> int:
        """Elements of one sample's factors."""
        return self.positions * (self.rows.shape[-1] + self.cols.shape[-1])

    def factor_dims(self) -> Tuple[int, int, int]:
        """``(T, R, C)``: positions, rows and columns of one sample's factors."""
        return self.positions, self.rows.shape[-1], self.cols.shape[-1]

    def gram_below(self, chunk: int) -> float:
        """With the sum wanted: materialise whenever chunks hold ≥ 8 samples (or the whole
        batch), as batched products then cost little beyond the weight gradient they
        replace; also in chunks of 2+ for long sequences (T ≥ 128) where the Gram route
        costs over ``64·R·C/T²`` of the weight gradient (ViT-S/16's 197 tokens); else Gram
        where cheaper. Measured on 1-2 CPU threads."""
        t = self.positions
        if chunk >= min(self.n, 8):
            return 0.0
        if chunk >= 2 and t >= 128:
            return 64.0 / t
        return 1.0

    def backward_factor(self) -> Tuple[str, torch.Tensor]:
        return ("rows", self.rows) if self.fwd == "cols" else ("cols", self.cols)


class Lookup(NamedTuple):
    """A table ``[num_rows, C]``: ``G_n[v] = Σ_{t: ids[n, t] = v} cols[n, t]``; ids −1 give
    no gradient. ``ids`` ``[n, T]`` (int64), ``cols`` ``[n, T, C]``."""

    ids: torch.Tensor
    cols: torch.Tensor
    num_rows: int

    @property
    def n(self) -> int:
        return self.ids.shape[0]

    def slice(self, lo: int, hi: int) -> "Lookup":
        return self._replace(ids=self.ids[lo:hi], cols=self.cols[lo:hi])

    def gram_sq_norms(self) -> torch.Tensor:
        """``Σ_{t,s} [id_t = id_s] (c_t·c_s)``: rows summed per distinct ``(n, id)``."""
        n, dim = self.n, self.cols.shape[-1]
        keys = (torch.arange(n, device=self.ids.device).view(n, 1) * self.num_rows + self.ids).reshape(-1)
        rows = acc(self.cols.reshape(-1, dim))
        keep = self.ids.reshape(-1) >= 0
        keys, rows = keys[keep], rows[keep]
        uniq, inverse = torch.unique(keys, return_inverse=True)
        sums = rows.new_zeros(uniq.shape[0], dim).index_add_(0, inverse, rows)
        return rows.new_zeros(n).index_add_(0, uniq // self.num_rows, sq_norms(sums))

    def materialise(self) -> torch.Tensor:
        """``G_n`` ``[n, V, C]`` (memory ``n·V·C``: for small tables only)."""
        n, dim = self.n, self.cols.shape[-1]
        keep = self.ids.reshape(-1) >= 0
        keys = (torch.arange(n, device=self.ids.device).view(n, 1) * self.num_rows + self.ids).reshape(-1)[keep]
        rows = self.cols.reshape(-1, dim)[keep]
        return rows.new_zeros(n * self.num_rows, dim).index_add_(0, keys, rows).view(n, self.num_rows, dim)

    def total(self) -> torch.Tensor:
        keep = self.ids.reshape(-1) >= 0
        rows = self.cols.reshape(-1, self.cols.shape[-1])[keep]
        return rows.new_zeros(self.num_rows, rows.shape[1]).index_add_(0, self.ids.reshape(-1)[keep], rows)

    def elements(self) -> int:
        return self.cols.shape[1] * (self.cols.shape[-1] + 1)

    def backward_factor(self) -> Tuple[str, torch.Tensor]:
        return "cols", self.cols


class Dense(NamedTuple):
    """``G_n`` itself: ``grads`` ``[n, *shape]``."""

    grads: torch.Tensor
    sq: Optional[torch.Tensor] = None  # ||G_n||², when the rule has it already

    @property
    def n(self) -> int:
        return self.grads.shape[0]

    def slice(self, lo: int, hi: int) -> "Dense":
        return Dense(self.grads[lo:hi], None if self.sq is None else self.sq[lo:hi])

    def gram_sq_norms(self) -> torch.Tensor:
        return sq_norms(self.grads) if self.sq is None else self.sq

    def materialise(self) -> torch.Tensor:
        return self.grads

    def total(self) -> torch.Tensor:
        return self.grads.sum(0)

    def elements(self) -> int:
        return self.grads[0].numel()


Form = Union[Factored, Lookup, Dense]


class ForwardFactor(NamedTuple):
    """A use's factor known since the forward pass, samples first: ``side`` ``"cols"``
    (``x`` ``[n, T, C]``) or ``"rows"`` (``x`` ``[n, T, R]`` for parameter rows
    ``[start, start + R)``, or ids ``[n, T]`` of a table, −1 for none)."""

    side: str
    x: torch.Tensor
    start: int = 0

    @property
    def is_ids(self) -> bool:
        return not self.x.is_floating_point()

    def slice(self, lo: int, hi: int) -> "ForwardFactor":
        return self._replace(x=self.x[lo:hi])


def _rows_weights(f: ForwardFactor, rows: torch.Tensor, start: int) -> torch.Tensor:
    """``W[n, t, s] = x_t · r_s`` over the parameter rows both cover: the forward factor
    ``f`` (rows side) against row factors ``rows`` ``[n, S, R]`` at ``start``."""
    r = acc(rows)
    if f.is_ids:
        local = f.x - start
        inside = (local >= 0) & (local < r.shape[-1]) & (f.x >= 0)
        idx = local.clamp(0, r.shape[-1] - 1)  # [n, T]
        w = torch.gather(r, 2, idx.unsqueeze(1).expand(-1, r.shape[1], -1))  # [n, S, T]
        return w.transpose(1, 2) * inside.unsqueeze(2).to(w.dtype)
    lo, hi = max(f.start, start), min(f.start + f.x.shape[-1], start + r.shape[-1])
    if hi <= lo:
        return r.new_zeros(r.shape[0], f.x.shape[1], r.shape[1])
    return _gram(f.x[..., lo - f.start: hi - f.start], r[..., lo - start: hi - start])


def project(form: Form, f: ForwardFactor, span: Tuple[int, int]) -> torch.Tensor:
    """``Q_t = G_n`` contracted with ``x_t`` of the forward factor ``f`` on its side:
    ``[n, T, d]`` on the other side. For ``f`` on the cols side ``d`` is the partner's row
    span ``span = (start, R)``; on the rows side ``d = C``."""
    if isinstance(form, Dense):
        g = form.grads
        return _project_dense(g.reshape(g.shape[0], g.shape[1] if g.dim() > 1 else 1, -1), f, span)
    if isinstance(form, Lookup):
        if f.side == "cols":  # Σ_s (x_t·c_s) onehot(id_s): rows of the partner's span
            w = _gram(f.x, form.cols)  # [n, T, S]
            start, size = span
            local = form.ids - start
            keep = ((local >= 0) & (local < size) & (form.ids >= 0)).to(w.dtype)
            out = w.new_zeros(w.shape[0], w.shape[1], size)
            idx = local.clamp(0, size - 1).unsqueeze(1).expand(-1, w.shape[1], -1)
            return out.scatter_add_(2, idx, w * keep.unsqueeze(1))
        ids = f.x if f.is_ids else None
        if ids is not None:
            eq = (ids.unsqueeze(2) == form.ids.unsqueeze(1)) & (ids.unsqueeze(2) >= 0)
            return torch.bmm(eq.to(acc(form.cols).dtype), acc(form.cols))
        return torch.bmm(_rows_weights(f, _onehot_rows(form), 0), acc(form.cols))
    if f.side == "cols":
        rows_q = torch.bmm(_gram(f.x, form.cols), acc(form.rows))  # [n, T, R_form]
        return _realign(rows_q, form.start, span)
    return torch.bmm(_rows_weights(f, form.rows, form.start), acc(form.cols))


def _onehot_rows(form: Lookup) -> torch.Tensor:
    """The one-hot row factors ``[n, T, V]`` of a lookup (only for a small table met by
    a dense row factor, a rare pairing)."""
    oh = torch.zeros(*form.ids.shape, form.num_rows, dtype=acc(form.cols).dtype, device=form.ids.device)
    return oh.scatter_(2, form.ids.clamp(min=0).unsqueeze(2), (form.ids >= 0).unsqueeze(2).to(oh.dtype))


def _realign(t: torch.Tensor, start: int, span: Tuple[int, int]) -> torch.Tensor:
    """``t`` ``[…, R]`` over parameter rows ``[start, start + R)`` re-expressed over the
    rows ``span = (start', R')``, zero where ``t`` has none."""
    s2, size = span
    if start == s2 and t.shape[-1] == size:
        return t
    out = t.new_zeros(*t.shape[:-1], size)
    lo, hi = max(start, s2), min(start + t.shape[-1], s2 + size)
    if hi > lo:
        out[..., lo - s2: hi - s2] = t[..., lo - start: hi - start]
    return out


def _project_dense(g: torch.Tensor, f: ForwardFactor, span: Tuple[int, int]) -> torch.Tensor:
    """Projection of dense ``G_n`` ``[n, R, C]`` (the whole parameter, 2-D)."""
    g = acc(g)
    if f.side == "cols":
        start, size = span
        return torch.bmm(acc(f.x), g[:, start: start + size].transpose(1, 2))  # [n, T, R']
    if f.is_ids:
        n, t = f.x.shape
        idx = f.x.clamp(min=0)
        rows = torch.gather(g, 1, idx.unsqueeze(2).expand(n, t, g.shape[2]))
        return rows * (f.x >= 0).unsqueeze(2).to(rows.dtype)
    return torch.bmm(acc(f.x), g[:, f.start: f.start + f.x.shape[-1]])


def cross(q: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``Σ_t y_t · Q_t`` ``[n]``: a use's backward factor ``y`` ``[n, T, d]`` against the
    projection ``Q`` of earlier uses on its forward factor."""
    return (acc(y) * q).sum((1, 2))


def inner(form: Form, f: ForwardFactor, span: Tuple[int, int], y: torch.Tensor) -> torch.Tensor:
    """``⟨G_n, G'_n⟩`` ``[n]`` of ``form`` and a use with forward factor ``f`` and backward
    factor ``y``: ``cross(project(form, f, span), y)``, except a lookup met on the column
    side, whose projection would be ``[n, T, V]``: there ``Σ_{t,s} (x_t·c_s) y_t[id_s]``."""
    if isinstance(form, Lookup) and f.side == "cols":
        start, size = span
        local = form.ids - start
        keep = ((local >= 0) & (local < size) & (form.ids >= 0)).to(acc(y).dtype)
        idx = local.clamp(0, size - 1).unsqueeze(1).expand(-1, y.shape[1], -1)  # [n, T, S]
        picked = torch.gather(acc(y), 2, idx) * keep.unsqueeze(1)                # y_t[id_s]
        return (picked * _gram(f.x, form.cols)).sum((1, 2))
    return cross(project(form, f, span), y)


def as_matrix(form: Form, rows: int, cols: int) -> torch.Tensor:
    """Dense ``G_n`` of a form over the whole parameter viewed as ``[rows, cols]``,
    ``[n, rows, cols]``: for the running sum of uses that a later dense use needs."""
    g = acc(form.materialise())
    if isinstance(form, Factored) and (form.start != 0 or g.shape[1] != rows):
        full = g.new_zeros(g.shape[0], rows, cols)
        full[:, form.start: form.start + g.shape[1]] = g
        return full
    return g.reshape(g.shape[0], rows, cols)
