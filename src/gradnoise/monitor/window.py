"""A sliding-window noise meter for one's own online (streaming) training loop.

An online learner sees each sample once, often one at a time (SGD at ``B = 1``), so no
batch of the step holds enough samples to estimate the noise. :class:`WindowNoise` keeps
the last ``window`` samples of the stream and, when asked, measures the per-sample
gradient noise of those ``n`` samples *at the current parameters* ``θ_t``, with exact
per-sample norms from :func:`gradnoise.capture` (one extra forward/backward of the
window; DESIGN.md §1, the case ``k = B = n``)::

    trace_cov    = (Σ_i ||g_i||² − n ||ḡ||²) / (n − 1)        unbiased tr(Σ)
    grad_sq_norm = ||ḡ||² − trace_cov / n                       unbiased |G|²
    b_simple     = trace_cov / grad_sq_norm
    update_noise = lr² · trace_cov / b                          E||Δθ − E Δθ||² of SGD at batch b

with ``g_i = ∇l_i(θ_t)`` never scaled by 1/n. The window's samples were *seen* at earlier
parameters ``θ_{t−1}, θ_{t−2}, …``; the meter does not reuse the gradients the optimizer
took from them, it re-evaluates every one at ``θ_t``. That is the point: the result is
the noise of the next update at the weights the learner has now, over the recent stream
distribution. Under drift the window mixes the last ``window`` samples' distributions —
a longer window gives a less noisy estimate that lags the drift more. The estimates are
unbiased when the window's samples are i.i.d. draws of one distribution (no finite-window
correction is applied: the window is a sample of the stream, not the population).

The model's ``.grad`` tensors are saved, set aside for the measurement and put back
(the very same tensors), no optimizer is touched, and the random-number state (CPU, and
the CUDA devices the window lives on) is restored afterwards, so the meter can be called
at any point of the loop outside a forward/backward pair — typically right after
``optimizer.step()`` — and the training run goes on exactly as without it. The model's
mode (train/eval) is left as it is: in training mode a random layer (dropout) adds its
own noise to the measured one. A layer that mixes samples (BatchNorm in training mode)
has no per-sample gradients: :func:`gradnoise.capture` refuses it.

Example::

    meter = WindowNoise(model, F.cross_entropy, window=64, every=50, lr=0.05)
    for x, y in stream:                      # x [b, ...], y [b]
        opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()
        m = meter.step(x, y)                 # push; measure every 50th call, else None
        if m is not None and m.ok:
            print(m.trace_cov, m.b_simple, m.update_noise)
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..capture import Capture
from ..stats.noise import FLAG_NON_FINITE, FLAG_NONPOSITIVE, FLAG_SINGLE_GROUP, NoiseStats

Inputs = Union[torch.Tensor, Tuple[torch.Tensor, ...]]


def _count(name: str, value, low: int = 1) -> int:
    """``value`` as an int ≥ ``low``; ValueError for anything else (floats, bools too)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < low:
        raise ValueError(f"{name} must be an integer ≥ {low}, got {value!r}")
    return int(value)


def _rate(value) -> Optional[float]:
    """A learning rate: None, or a finite number > 0; ValueError otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(value)) or float(value) <= 0:
        raise ValueError(f"lr must be a finite number > 0 (or None), got {value!r}")
    return float(value)

_REASONS = {
    FLAG_SINGLE_GROUP: "the window holds fewer than two samples: the covariance needs at least two",
    FLAG_NON_FINITE: "the window's gradients contain NaN or inf (a non-finite input, target or loss)",
    FLAG_NONPOSITIVE: "the estimate of |G|² is ≤ 0 (noise dominates the window), so b_simple is undefined",
}


@dataclass(frozen=True)
class WindowStats:
    """The noise of the window's samples at the parameters of the moment it was measured.

    Attributes:
        n: samples in the window.
        trace_cov: unbiased ``tr(Σ)`` per sample (NaN when the window holds < 2 samples
            or its gradients are not finite).
        grad_sq_norm: unbiased ``|G|²`` (may be ≤ 0: then ``b_simple`` is NaN and flagged).
        b_simple: ``trace_cov / grad_sq_norm`` (NaN when flagged).
        mean_sq_norm: ``||ḡ||²`` of the window-mean gradient.
        lr: the learning rate used for ``update_noise`` (None when none was given).
        batch_size: ``b``, the batch of the SGD update ``update_noise`` refers to.
        update_noise: ``lr² · trace_cov / b``, the noise ``E||Δθ − EΔθ||²`` of one plain
            SGD update at batch ``b`` of i.i.d. samples from these parameters; NaN without
            ``lr`` (another optimizer's update is not ``lr·g``: measure it, see the
            ``online`` study).
        pushed: samples pushed into the meter so far (the stream position).
        flag: None when every number is defined, else ``single_group`` (window < 2),
            ``non_finite`` or ``grad_sq_norm_nonpositive``.
        stats: the full :class:`~gradnoise.stats.NoiseStats` (``by_param`` per parameter).
    """

    n: int
    trace_cov: float
    grad_sq_norm: float
    b_simple: float
    mean_sq_norm: float
    lr: Optional[float]
    batch_size: int
    update_noise: float
    pushed: int
    flag: Optional[str] = None
    stats: Optional[NoiseStats] = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        """True when ``trace_cov``, ``grad_sq_norm`` and ``b_simple`` are all defined."""
        return self.flag is None

    @property
    def reason(self) -> Optional[str]:
        """Why the result is flagged (None when it is not)."""
        return None if self.flag is None else _REASONS[self.flag]

    def noise_at(self, b: float) -> float:
        """``tr(Σ)/b``: the noise of a mini-batch gradient of ``b`` i.i.d. samples."""
        return self.trace_cov / b

    def update_noise_at(self, lr: float, b: float = 1) -> float:
        """``lr² · tr(Σ)/b``: the noise of a plain SGD update at rate ``lr``, batch ``b``."""
        return lr * lr * self.trace_cov / b


class WindowNoise:
    """Per-sample gradient noise over a sliding window of the most recent samples.

    Args:
        model: the model being trained (never modified; its ``.grad`` are restored).
        loss_fn: ``loss_fn(model(x), y)``, the mean over the batch (``reduction="mean"``)
            or the sum (``reduction="sum"``).
        window: how many of the most recent samples to keep (older ones are evicted).
        every: :meth:`step` measures at every ``every``-th call (1: at every call).
        lr: learning rate for ``update_noise`` (can be given per :meth:`measure`).
        batch_size: ``b`` of the SGD update ``update_noise`` refers to (default 1).
        reduction: ``"mean"`` or ``"sum"``, that of ``loss_fn``.
        chunk: at most this many window samples per forward/backward (None: one pass).
        rules: custom capture rules, as for :func:`gradnoise.capture`.

    Raises:
        ValueError: ``window``, ``every``, ``batch_size`` or ``chunk`` not an integer ≥ 1,
            ``lr`` not a finite number > 0, or an unknown ``reduction``.
        TypeError: ``model`` is not an ``nn.Module`` or ``loss_fn`` is not callable.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, window: int = 64, every: int = 1,
                 lr: Optional[float] = None, batch_size: int = 1, reduction: str = "mean",
                 chunk: Optional[int] = None, rules=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"WindowNoise needs an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.model, self.loss_fn = model, loss_fn
        self.window, self.every = _count("window", window), _count("every", every)
        self.lr, self.batch_size = _rate(lr), _count("batch_size", batch_size)
        self.reduction, self.rules = reduction, rules
        self.chunk = None if chunk is None else _count("chunk", chunk)
        self._x: Optional[Tuple[torch.Tensor, ...]] = None
        self._y: Optional[torch.Tensor] = None
        self._tuple = False
        self.pushed = 0
        self.calls = 0
        self.last: Optional[WindowStats] = None

    def __len__(self) -> int:
        return 0 if self._y is None else int(self._y.shape[0])

    def clear(self) -> None:
        """Empty the window (the stream position ``pushed`` is kept)."""
        self._x = self._y = None

    def push(self, x: Inputs, y: torch.Tensor) -> None:
        """Append the samples just seen, ``x`` ``[b, ...]`` (or a tuple of such tensors)
        and ``y`` ``[b, ...]``; only the last ``window`` samples are kept."""
        xs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
        if not xs or not all(torch.is_tensor(t) and t.dim() > 0 for t in xs + (y,)):
            raise ValueError("push tensors with the samples on dim 0: x (or a non-empty tuple of them) and y")
        sizes = {int(t.shape[0]) for t in xs} | {int(y.shape[0])}
        if len(sizes) != 1:
            raise ValueError(f"inputs and targets disagree on the number of samples: {sorted(sizes)}")
        if self._x is not None and (len(xs) != len(self._x) or self._tuple != isinstance(x, (tuple, list))):
            raise ValueError("push the same kind of inputs every time (a tensor, or a tuple of the same length)")
        self._tuple = isinstance(x, (tuple, list))
        xs, y = tuple(t.detach() for t in xs), y.detach()
        if self._x is None:
            self._x, self._y = tuple(t[-self.window:].clone() for t in xs), y[-self.window:].clone()
        else:
            self._x = tuple(torch.cat([old, new])[-self.window:] for old, new in zip(self._x, xs))
            self._y = torch.cat([self._y, y])[-self.window:]
        self.pushed += sizes.pop()

    def step(self, x: Inputs, y: torch.Tensor, lr: Optional[float] = None,
             batch_size: Optional[int] = None) -> Optional[WindowStats]:
        """:meth:`push`, then :meth:`measure` at every ``every``-th call (else None)."""
        self.push(x, y)
        self.calls += 1
        return self.measure(lr, batch_size) if self.calls % self.every == 0 else None

    def samples(self) -> Tuple[Inputs, Optional[torch.Tensor]]:
        """The window's ``(x, y)`` (oldest first), as pushed."""
        if self._x is None:
            return None, None
        return (self._x if self._tuple else self._x[0]), self._y

    def measure(self, lr: Optional[float] = None, batch_size: Optional[int] = None) -> WindowStats:
        """The noise of the window's samples at the current parameters (module docstring).

        Args:
            lr: learning rate for ``update_noise`` (default: the meter's).
            batch_size: ``b`` for ``update_noise`` (default: the meter's).
        """
        lr = self.lr if lr is None else _rate(lr)
        b = self.batch_size if batch_size is None else _count("batch_size", batch_size)
        n = len(self)
        if n < 2:
            stats = NoiseStats(n, n, math.nan, math.nan, math.nan, math.nan, math.nan, FLAG_SINGLE_GROUP)
        else:
            stats = self._stats()
        update = lr * lr * stats.trace_cov / b if lr is not None else math.nan
        self.last = WindowStats(n, stats.trace_cov, stats.grad_sq_norm, stats.b_simple, stats.mean_sq_norm,
                                lr, b, update, self.pushed, stats.flag, stats)
        return self.last

    def _stats(self) -> NoiseStats:
        """One capture over the window (in chunks), with ``.grad`` set aside and restored."""
        params = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        saved: Dict[str, Optional[torch.Tensor]] = {name: p.grad for name, p in params.items()}
        n = len(self)
        step = n if self.chunk is None else self.chunk
        cuda = sorted({t.device.index or 0 for t in self._x + (self._y,) if t.device.type == "cuda"})
        try:
            for p in params.values():
                p.grad = None
            with torch.random.fork_rng(devices=cuda), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="gradnoise: this batch has NaN", category=RuntimeWarning)
                with torch.enable_grad(), Capture(self.model, self.reduction, self.rules) as cap:
                    for i in range(0, n, step):
                        xs = tuple(t[i:i + step] for t in self._x)
                        yb = self._y[i:i + step]
                        loss = self.loss_fn(self.model(*xs), yb)
                        share = len(yb) / n if self.reduction == "mean" else 1.0
                        (loss * share).backward()
            return cap.stats()
        finally:
            for name, p in params.items():
                p.grad = saved[name]


__all__ = ["WindowNoise", "WindowStats"]
