"""Convolutions, 1- to 3-D, and transposed convolutions: per-sample weight gradients.

Kernel (:class:`ConvForm`): for input ``x`` ``[n·k, C_in, *S]`` (``k`` rows per sample,
sample-major) and output gradient ``δ`` ``[n·k, C_out, *S']``, with ``U_n`` the unfolded
patches of sample ``n`` (``[g, C_in/g·kernel, P]``, ``P`` output positions of its rows)::

    G_n = δ_n U_nᵀ   per group                 (a factored form on unfolded patches)
    ||G_n||² = Σ_{t,s} (u_t·u_s)(δ_t·δ_s)      Gram route, O(P²(C_in·kernel + C_out))

materialised by one grouped weight-gradient convolution with the batch folded into the
groups (``[1, c·C_in, *S]``, ``c·groups`` groups), or, at few positions, by batched
products on the unfolded patches. The layer's weight gradient is ``Σ_n G_n`` when
materialised, else the convolution's own weight gradient; the Gram route is taken where
few positions meet many channels (late CNN stages).

A transposed convolution ``y = conv_transpose(x, W)`` is the input-gradient of a
convolution with the same ``W``, so its weight gradient is that convolution's weight
gradient with the roles swapped: input ``δ``, output gradient ``x`` (:class:`ConvForm`
with ``x ← δ``, ``δ ← x``). Biases: ``g_n^b = Σ_s δ_ns``.

String padding: ``"valid"`` is zero padding; ``"same"`` pads ``dilation·(k − 1)`` in
total per dimension, the extra element on the right when it is odd (as torch does).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..errors import UnsupportedUseError
from . import amp
from .args import bind
from .forms import Dense
from .layout import Layout, to_samples
from .site import Site

_conv_backward = torch.ops.aten.convolution_backward


@dataclass(frozen=True)
class ConvForm:
    """Per-sample weight gradients of a convolution (see the module docstring); ``conf``
    is ``(stride, padding, dilation, groups)``, ``k`` rows per sample."""

    x: torch.Tensor
    gy: torch.Tensor
    weight_shape: Tuple[int, ...]
    conf: tuple
    k: int = 1

    @property
    def n(self) -> int:
        return self.x.shape[0] // self.k

    @property
    def has_gram(self) -> bool:
        return len(self.weight_shape) <= 4

    def slice(self, lo: int, hi: int) -> "ConvForm":
        k = self.k
        return replace(self, x=self.x[lo * k: hi * k], gy=self.gy[lo * k: hi * k])

    def factor_dims(self) -> Tuple[int, int, int]:
        """``(T, R, C)`` per group: positions, output channels, input channels × kernel."""
        g = self.conf[3]
        kernel = _prod(self.weight_shape[2:])
        return self.k * _prod(self.gy.shape[2:]), self.weight_shape[0] // g, self.weight_shape[1] * kernel

    @property
    def grouped(self) -> bool:
        """Materialise by the grouped convolution (from 196 positions per sample, in 3-D,
        and for depthwise layers), else by batched products of the unfolded factors: at 8×8
        positions (ResNet-18 at 64²) the grouped convolution cost 3-8× the plain weight
        gradient, the batched products 2.3-2.5× (2 CPU threads)."""
        return self.factor_dims()[0] >= 196 or not self.has_gram or self.weight_shape[1] == 1

    def chunk_cost(self, route: str) -> int:
        """Elements one sample needs on ``route``: its gradients and the unfolded input
        the grouped convolution holds as scratch, or the unfolded factors (and the Gram
        matrices)."""
        t, r, c = self.factor_dims()
        g = self.conf[3]
        if route == "materialise" and self.grouped:  # scratch: about half the unfolded input
            # (measured); a depthwise convolution (one input channel per group) has none
            return g * (r * c + (t * c // 2 if self.weight_shape[1] > 1 else 0))
        if route == "materialise":
            return g * (r * c + t * (r + c))
        return g * (2 * t * t + t * (r + c))

    def max_chunk(self, route: str) -> int:
        """Samples per call at most: one where a sample has ≥ 3136 output positions, so the
        grouped convolution is a dense one (measured on ResNet-50's 7×7 stem: 0.8-0.9×
        the plain weight gradient per sample, 1.3-1.7× with two or more samples folded)."""
        return 1 if route == "materialise" and self.factor_dims()[0] >= 3136 else self.n

    def gram_below(self, chunk: int) -> float:
        """Take the Gram route while its extra cost ``T(R + C)`` is below this share of the
        weight gradient's ``T·R·C``. Measured on ResNet-50 at 224² and ResNet-18 at 64²
        (1-2 CPU threads): the grouped convolution costs 1.0-1.8× the plain weight gradient
        from 14×14 positions up; below, materialising costs 2-2.5× (batched products), so
        the Gram route wins wherever it costs less than the weight gradient."""
        return 0.5 if self.factor_dims()[0] >= 196 else 1.0

    def elements(self) -> int:
        t, r, c = self.factor_dims()
        return self.conf[3] * t * (r + c)

    def gram_sq_norms(self) -> torch.Tensor:
        u, d = _unfold(self.x, self.gy, self.weight_shape, self.conf, self.k)
        gram = torch.bmm(u.transpose(1, 2), u).mul_(torch.bmm(d.transpose(1, 2), d))
        return gram.sum((1, 2)).view(self.n, self.conf[3]).sum(1).to(torch.float64 if u.dtype == torch.float64 else torch.float32)

    def materialise(self) -> torch.Tensor:
        """``G_n`` ``[n, *weight_shape]``: by the grouped weight-gradient convolution, or
        ``δ_n U_nᵀ`` by batched products (see :attr:`grouped`)."""
        if not self.grouped:
            u, d = _unfold(self.x, self.gy, self.weight_shape, self.conf, self.k)
            return torch.bmm(d, u.transpose(1, 2)).view(self.n, *self.weight_shape)
        g = _grouped_weight_grads(self.x, self.gy, self.weight_shape, self.conf)
        return g.view(-1, self.k, *self.weight_shape).sum(1) if self.k > 1 else g

    def total(self) -> torch.Tensor:
        stride, padding, dilation, groups = self.conf
        w = self.x.new_empty(()).expand(self.weight_shape)  # shape only
        return _conv_backward(self.gy, self.x, w, None, stride, padding, dilation, False,
                              [0] * len(stride), groups, [False, True, False])[1]


def _prod(s) -> int:
    out = 1
    for v in s:
        out *= v
    return out


def _unfold(x, gy, weight_shape, conf, k: int):
    """Unfolded input ``[c·g, C_in/g·kernel, k·P]`` and output gradient
    ``[c·g, C_out/g, k·P]`` of ``c`` samples (``k`` rows each, side by side); 1-D and 2-D."""
    stride, padding, dilation, groups = conf
    x2, gy2 = (x, gy) if x.dim() == 4 else (x.unsqueeze(2), gy.unsqueeze(2))
    kernel = weight_shape[2:] if len(weight_shape) == 4 else (1, weight_shape[2])
    two = lambda v, pad=1: list(v) if len(v) == 2 else [pad, v[0]]  # noqa: E731
    u = F.unfold(x2, kernel, dilation=two(dilation), padding=two(padding, 0), stride=two(stride))
    c, pos, c_out = x.shape[0] // k, u.shape[2], weight_shape[0]
    u = u.view(c, k, groups, -1, pos).permute(0, 2, 3, 1, 4).reshape(c * groups, -1, k * pos)
    d = gy2.reshape(c, k, groups, c_out // groups, pos).permute(0, 2, 3, 1, 4).reshape(c * groups, c_out // groups, k * pos)
    return u, d


def _grouped_weight_grads(x, gy, weight_shape, conf) -> torch.Tensor:
    """``G`` of every row ``[rows, C_out, C_in/groups, *kernel]``: one grouped
    weight-gradient convolution with the rows folded into the groups."""
    stride, padding, dilation, groups = conf
    c, c_out = x.shape[0], weight_shape[0]
    folded_w = x.new_empty(()).expand(c * c_out, *weight_shape[1:])  # shape only
    g = _conv_backward(
        gy.reshape(1, c * c_out, *gy.shape[2:]),
        x.reshape(1, c * x.shape[1], *x.shape[2:]),
        folded_w, None, stride, padding, dilation, False, [0] * len(stride), c * groups,
        [False, True, False],
    )[1]
    return g.view(c, *weight_shape)


def _bias_form(gy: torch.Tensor, n: int) -> Dense:
    """``g_n^b = Σ δ_n`` over positions and rows: ``[n, C_out]``."""
    return Dense(gy.flatten(2).sum(2).view(n, -1, gy.shape[1]).sum(1))


def _sample_major(t: torch.Tensor, lay: Layout, n: int) -> torch.Tensor:
    """Rows of ``t`` (samples on dim 0) ordered sample by sample."""
    return t if lay.outer == 1 else to_samples(t, lay, n).flatten(0, 1)


class ConvFn(torch.autograd.Function):
    """A convolution (``transposed``: a transposed one) whose backward hands the per-sample
    forms to its site and returns the weight gradient the store sums from them."""

    @staticmethod
    def forward(ctx, x, weight, bias, conf, out_pad, transposed: bool, site: Site, lay: Layout):
        ctx.save_for_backward(x, weight)
        ctx.conf, ctx.out_pad, ctx.transposed = conf, out_pad, transposed
        ctx.site, ctx.lay, ctx.has_bias = site, lay, bias is not None
        stride, padding, dilation, groups = conf
        return torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, transposed, out_pad, groups)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        site: Site = ctx.site
        n, lay = site.n, ctx.lay
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _conv_backward(gy, x, weight, None, stride, padding, dilation, ctx.transposed, ctx.out_pad,
                                groups, [True, False, False])[0]
        xs, ds = _sample_major(x, lay, n), _sample_major(gy, lay, n)
        k = x.shape[0] // n
        if ctx.needs_input_grad[1] or "weight" in site:
            src, dst = (ds, xs) if ctx.transposed else (xs, ds)
            form = ConvForm(src, dst, tuple(weight.shape), ctx.conf, k)
            gw = site.give("weight", form, want_sum=ctx.needs_input_grad[1])
        if ctx.has_bias and (ctx.needs_input_grad[2] or "bias" in site):
            gb = site.give("bias", _bias_form(ds, n), want_sum=ctx.needs_input_grad[2])
        return gx, gw, gb, None, None, None, None, None


def _ntuple(v, d: int) -> List[int]:
    return list(v) if isinstance(v, (list, tuple)) else [int(v)] * d


def _explicit_padding(x, padding, kernel: Sequence[int], dilation: List[int]):
    """Turn string padding into numbers, padding ``x`` itself where "same" is uneven."""
    d = len(kernel)
    if not isinstance(padding, str):
        return x, _ntuple(padding, d)
    if padding == "valid":
        return x, [0] * d
    if padding != "same":
        raise ValueError(f"unknown padding {padding!r}")
    totals = [dl * (k - 1) for dl, k in zip(dilation, kernel)]
    if all(t % 2 == 0 for t in totals):
        return x, [t // 2 for t in totals]
    pads: List[int] = []
    for t in reversed(totals):  # F.pad lists the last dimension first
        pads += [t // 2, t - t // 2]
    return F.pad(x, pads), [0] * d


def _apply(cap, x, weight, bias, conf, out_pad, transposed: bool, what: str):
    wref, bref = cap.ref(weight), cap.ref(bias)
    d = weight.dim() - 2
    if x.dim() != d + 2:
        raise UnsupportedUseError(
            f"{what} on an unbatched input of shape {tuple(x.shape)} (parameter "
            f"'{cap.name_of((wref or bref).params[0])}'): per-sample gradients need a "
            "leading sample dimension"
        )
    lay, n = cap.layout(x, what)
    if lay.dim != 0:
        raise UnsupportedUseError(f"{what} meets data whose samples lie on dim {lay.dim}, "
                                  "not on the batch dimension 0 of the convolution")
    # the budget: the layer's input again, for the grouped convolution's scratch
    site = cap.site({"weight": wref, "bias": bref}, n, budget=2 * x.numel())
    site.use("weight")
    site.use("bias")
    (x, weight, bias), ctx = amp.cast(x.device.type, (x, weight, bias))
    with ctx:
        y = ConvFn.apply(x, weight, bias, conf, out_pad, transposed, site, lay)
    cap.record_layout(y, lay)
    return y


def handle_conv(cap, func, args, kwargs):
    """Rule-table entry for ``torch.conv1d/2d/3d``."""
    x, weight, bias, stride, padding, dilation, groups = bind(
        args, kwargs, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"), (None, 1, 0, 1, 1)
    )
    if cap.ref(x) is not None:
        return cap.direct(func, args, kwargs)
    if cap.ref(weight) is None and cap.ref(bias) is None:
        return func(*args, **kwargs)
    d = weight.dim() - 2
    stride, dilation = _ntuple(stride, d), _ntuple(dilation, d)
    x, padding = _explicit_padding(x, padding, weight.shape[2:], dilation)
    conf = (stride, padding, dilation, int(groups))
    return _apply(cap, x, weight, bias, conf, [0] * d, False, f"conv{d}d")


def handle_conv_transpose(cap, func, args, kwargs):
    """Rule-table entry for ``torch.conv_transpose1d/2d/3d``."""
    x, weight, bias, stride, padding, out_pad, groups, dilation = bind(
        args, kwargs, ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"),
        (None, 1, 0, 0, 1, 1),
    )
    if cap.ref(x) is not None:
        return cap.direct(func, args, kwargs)
    if cap.ref(weight) is None and cap.ref(bias) is None:
        return func(*args, **kwargs)
    d = weight.dim() - 2
    conf = (_ntuple(stride, d), _ntuple(padding, d), _ntuple(dilation, d), int(groups))
    return _apply(cap, x, weight, bias, conf, _ntuple(out_pad, d), True, f"conv_transpose{d}d")


__all__ = ["ConvForm", "ConvFn", "handle_conv", "handle_conv_transpose"]
