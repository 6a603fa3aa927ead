"""AdaScale (Johnson et al., 2020): scale the learning rate of any ``torch.optim``
optimizer by the gain of a larger batch, read from a :class:`gradnoise.NoiseMonitor`.

A schedule ``lr(τ)`` written for the base batch ``B₀`` runs at batch ``B`` (scale
``S = B/B₀``) as::

    r_t   = (tr Σ/B₀ + |G|²) / (tr Σ/B + |G|²)       clipped to [min(1, S), max(1, S)]
    lr_t  = base_lr · lr_schedule(τ_t) · r_t          ("sgd"; √r_t for "adam-sqrt")
    τ_t+1 = τ_t + r_t

with ``tr Σ`` (per-sample covariance trace) and ``|G|²`` the monitor's *smoothed*
estimates summed over a parameter group (DESIGN.md §1; the paper's
``(σ² + μ²)/(σ²/S + μ²)`` with ``σ² = tr Σ/B₀``). Both are per-sample quantities, so a
gain for any batch size, changing every step, follows from the same record. The
estimates come from whatever source the monitor uses: per-sample norms (one worker, no
accumulation — fairscale's AdaScale needs ``n − 1 ≥ 1`` ranks or accumulation steps),
micro-batches or DDP ranks.

Undefined estimates (documented choice, tested):

* estimates are first clipped to their domain, ``tr Σ ≥ 0`` and ``|G|² ≥ 0``; so
  ``|G|² ≤ 0 < tr Σ`` gives ``r = S`` (the signal is not distinguishable from zero: the
  formula's limit, and what fairscale's and AdaptDL's clamps give) and
  ``tr Σ ≤ 0 < |G|²`` gives ``r = 1``;
* both ``≤ 0``, or either non-finite: the group keeps its last valid gain, clipped to
  the current bounds;
* before the monitor's first record every gain is 1 (the base learning rate; fairscale
  and AdaptDL start there too).

``B < B₀`` is allowed: ``S < 1`` and ``r ∈ [S, 1]`` (each step is worth less than a base
step).

``mode="adam-sqrt"`` (an approximation, labelled as such): the gain of the
preconditioned gradient ``P g`` with Adam's ``P = diag(1/(√v̂ + ε))``, each tensor's
``tr Σ_p`` and ``|G_p|²`` weighted by ``w_p = mean_j P_j²``
(:mod:`gradnoise.monitor.precond`), and the learning rate scaled by ``√r`` (AdaptDL's rule
for Adam); τ still grows by ``r``. ``v̂`` is read when a new monitor record is first used
(before this step's update, so one step behind; with ``every=k`` up to ``k`` steps); until
the optimizer has state (first step), the raw-gradient gain is used.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from ..errors import GradNoiseError
from ..monitor import names as _names
from ..monitor.precond import Preconditioner
from ..stats import rules

MODES = ("sgd", "adam-sqrt")
BatchSize = Union[None, int, float, Callable[[], float]]
Sums = Tuple[float, float]
_NAN2 = (math.nan, math.nan)


def gain_ratio(trace_cov: float, grad_sq_norm: float, batch_size: float, base_batch_size: float) -> float:
    """AdaScale's gain ``r = (tr Σ/B₀ + |G|²) / (tr Σ/B + |G|²)``: the learning-rate rule
    :func:`gradnoise.stats.rules.adascale` with ``B_noise = tr Σ/|G|²``.

    Args:
        trace_cov: ``tr Σ``, the per-sample gradient covariance trace (summed over the
            parameters that share the gain).
        grad_sq_norm: ``|G|²`` over the same parameters.
        batch_size: ``B``, the batch the step uses.
        base_batch_size: ``B₀``, the batch the learning rate was set for.

    Returns:
        ``r`` clipped to ``[min(1, S), max(1, S)]``, ``S = B/B₀``, after clipping both
        estimates at 0; NaN when either is not finite or both are ``≤ 0``.
    """
    B, B0 = float(batch_size), float(base_batch_size)
    if not (B > 0 and B0 > 0):
        raise ValueError(f"batch sizes must be > 0, got batch_size={batch_size}, base_batch_size={base_batch_size}")
    T, G = float(trace_cov), float(grad_sq_norm)
    if not (math.isfinite(T) and math.isfinite(G)):
        return math.nan
    T, G = max(T, 0.0), max(G, 0.0)
    if T == 0.0 and G == 0.0:
        return math.nan
    if G == 0.0:  # all noise: B_noise = inf, the limit of the rule is B/B₀
        return _clip(B / B0, B / B0)
    return _clip(rules.adascale(B0, B, T / G), B / B0)  # the rule with B_noise = tr Σ/|G|²


def _clip(r: float, scale: float) -> float:
    """``r`` into ``[min(1, S), max(1, S)]`` (unchanged while ``S`` is unknown)."""
    if not math.isfinite(scale):
        return r
    return min(max(r, min(1.0, scale)), max(1.0, scale))


def _check_batch(name: str, b) -> float:
    try:
        v = float(b)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {b!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be > 0, got {b!r}")
    return v


class AdaScale:
    """Learning-rate gains for a larger batch, over any ``torch.optim`` optimizer.

    Usage::

        monitor = gradnoise.NoiseMonitor(model, source="per_sample")
        ada = AdaScale(optimizer, monitor, base_batch_size=32, lr_schedule=lambda tau: ...)
        for x, y in loader:                      # batches of any size, changing or not
            loss_fn(model(x), y).backward()
            monitor.step()
            ada.step(batch_size=len(x))          # sets each group's lr, optimizer.step()
            optimizer.zero_grad()

    Args:
        optimizer: any ``torch.optim.Optimizer``; its groups' ``lr`` at construction (or
            when a group is added) are the base learning rates. AdaScale owns
            ``group["lr"]`` from then on: give the schedule as ``lr_schedule``.
        monitor: the :class:`~gradnoise.NoiseMonitor` of the model (only read: its
            ``model`` and ``last`` record).
        base_batch_size: ``B₀``, the batch size the base learning rates were set for.
        batch_size: ``B``: a number, a callable returning it (an adaptive sampler), or
            None for the batch size of the monitor's latest record. ``step(batch_size=)``
            overrides it.
        lr_schedule: ``τ -> multiplier`` of the base learning rates, as a run at the base
            batch would use after τ steps (default: constant 1).
        mode: ``"sgd"`` (the paper) or ``"adam-sqrt"`` (preconditioned gain, ``√r``;
            an approximation, see the module docstring).
        precond_every: ``"adam-sqrt"``: Adam's second moments are re-read every this many
            new records (they move on a time scale of ``1/(1 − β₂)`` steps; reading them
            is most of the variant's cost).

    Attributes:
        progress: τ, the scale-invariant step count (base-batch steps' worth).
        gain: per group, the ``r`` of the last step (1 before the first).
        model_gain: ``r`` of all mapped parameters together; it advances τ.
        scale: ``S = B/B₀`` of the last step (NaN while ``B`` is unknown).
        lrs: per group, the learning rate the last step used.
        base_lrs: per group, the base learning rates.
        steps: the number of ``step()`` calls.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, monitor, base_batch_size: float,
                 batch_size: BatchSize = None, lr_schedule: Optional[Callable[[float], float]] = None,
                 mode: str = "sgd", precond_every: int = 10):
        if not (isinstance(precond_every, int) and precond_every >= 1):
            raise ValueError(f"precond_every must be an int >= 1, got {precond_every!r}")
        self.precond_every = precond_every
        if not (hasattr(optimizer, "param_groups") and hasattr(optimizer, "step")):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not (isinstance(getattr(monitor, "model", None), nn.Module) and hasattr(monitor, "last")):
            raise TypeError(f"monitor must be a gradnoise.NoiseMonitor, got {type(monitor).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        if lr_schedule is not None and not callable(lr_schedule):
            raise TypeError(f"lr_schedule must be a callable tau -> multiplier, got {type(lr_schedule).__name__}")
        if batch_size is not None and not callable(batch_size):
            _check_batch("batch_size", batch_size)
        self.optimizer, self.monitor, self.mode = optimizer, monitor, mode
        self.base_batch_size = _check_batch("base_batch_size", base_batch_size)
        self.batch_size, self.lr_schedule = batch_size, lr_schedule
        inner, _ = _names.unwrap(monitor.model)
        self._name_of = {p: n for n, p in inner.named_parameters()}
        self._pairs: List[List[Tuple[nn.Parameter, str]]] = []
        self.base_lrs: List[float] = []
        self._valid: List[float] = []      # last valid gain per group
        self._valid_model = 1.0
        self._cache_rec, self._cache = None, None
        self._precond = Preconditioner(optimizer, self._name_of)
        self._weights: Optional[Dict[nn.Parameter, float]] = None
        self._weights_age = 0
        self._sync_groups()
        self.progress, self.steps = 0.0, 0
        self.gain, self.model_gain, self.scale = list(self._valid), 1.0, math.nan
        self.lrs = list(self.base_lrs)

    # ---- the step ------------------------------------------------------------------
    def step(self, closure=None, batch_size: BatchSize = None):
        """Set each group's ``lr = base_lr · lr_schedule(τ) · r`` (``√r`` for
        ``"adam-sqrt"``), call ``optimizer.step(closure)``, then ``τ += r``.

        Call after ``monitor.step()`` so that the gain uses this step's record.

        Args:
            closure: passed to ``optimizer.step``.
            batch_size: this step's ``B`` (overrides the constructor's).

        Returns:
            What ``optimizer.step`` returns.
        """
        B = self._current_batch(batch_size)
        gains, model_gain = self.gains(B)
        factor = 1.0 if self.lr_schedule is None else float(self.lr_schedule(self.progress))
        sqrt = self.mode == "adam-sqrt"
        lrs = []
        for group, base, r in zip(self.optimizer.param_groups, self.base_lrs, gains):
            lr = base * factor * (math.sqrt(r) if sqrt else r)
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
            lrs.append(lr)
        out = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        self.progress += model_gain
        self.steps += 1
        self.gain, self.model_gain, self.lrs = gains, model_gain, lrs
        self.scale = B / self.base_batch_size
        return out

    def gains(self, batch_size: float) -> Tuple[List[float], float]:
        """The per-group gains and the whole-model gain at ``batch_size`` from the
        monitor's latest record, without stepping (updates the last valid gains)."""
        self._sync_groups()
        B = float(batch_size)
        S = B / self.base_batch_size
        groups, model = self._sums()
        out = []
        for i, (t, g) in enumerate(groups):
            r = gain_ratio(t, g, B, self.base_batch_size) if math.isfinite(B) else math.nan
            if math.isfinite(r):
                self._valid[i] = r
            out.append(r if math.isfinite(r) else _clip(self._valid[i], S))
        r = gain_ratio(model[0], model[1], B, self.base_batch_size) if math.isfinite(B) else math.nan
        if math.isfinite(r):
            self._valid_model = r
        return out, (r if math.isfinite(r) else _clip(self._valid_model, S))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``optimizer.zero_grad``."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # ---- internals -----------------------------------------------------------------
    def _current_batch(self, given: BatchSize) -> float:
        b = given if given is not None else self.batch_size
        if callable(b):
            b = b()
        if b is None:
            rec = self.monitor.last
            if rec is None:
                return math.nan
            b = rec.raw.batch_size
        return _check_batch("batch_size", b)

    def _sync_groups(self) -> None:
        """Name the parameters of groups added since (optimizer.add_param_group)."""
        for i in range(len(self._pairs), len(self.optimizer.param_groups)):
            group = self.optimizer.param_groups[i]
            pairs = [(p, self._name_of[p]) for p in group["params"] if p in self._name_of]
            if not pairs:
                raise ValueError(f"param group {i} has no parameter of the monitored model")
            if self.mode == "adam-sqrt" and not ("betas" in group and "eps" in group):
                raise ValueError(f"mode='adam-sqrt' needs an Adam-type optimizer (betas, eps); "
                                 f"group {i} of {type(self.optimizer).__name__} lacks them")
            self._pairs.append(pairs)
            self.base_lrs.append(float(group["lr"]))
            self._valid.append(1.0)

    def _sums(self) -> Tuple[List[Sums], Sums]:
        """Per group and in all, ``(tr Σ, |G|²)`` (weighted in "adam-sqrt") of the
        latest record's smoothed statistics; NaN where nothing is known. Computed once
        per record (the Adam weights too: refreshed with each new record)."""
        rec = self.monitor.last
        if rec is None:
            return [_NAN2] * len(self._pairs), _NAN2
        if rec is not self._cache_rec or len(self._cache[0]) != len(self._pairs):
            weights = self._adam_weights() if self.mode == "adam-sqrt" else None
            self._cache_rec, self._cache = rec, self._weighted(rec.smoothed.by_param, weights)
        return self._cache

    def _adam_weights(self) -> Optional[Dict[nn.Parameter, float]]:
        """The preconditioner's per-tensor weights, re-read from Adam's state every
        ``precond_every`` new records (``v̂`` moves on a time scale of ``1/(1 − β₂)``
        steps, 1,000 at the default β₂; reading it costs ~15 µs per tensor) and while
        there is none yet."""
        if self._weights is None or self._weights_age >= self.precond_every:
            self._weights, self._weights_age = self._precond.weights() or None, 0
        self._weights_age += 1
        return self._weights

    def _weighted(self, by_param, weights: Optional[Dict[nn.Parameter, float]]) -> Tuple[List[Sums], Sums]:
        groups, T, G, n = [], 0.0, 0.0, 0
        for pairs in self._pairs:
            t = g = 0.0
            k = 0
            for p, name in pairs:
                s = by_param.get(name)
                w = 1.0 if weights is None else weights.get(p)
                if s is None or w is None:
                    continue
                t += w * s.trace_cov
                g += w * s.grad_sq_norm
                k += 1
            groups.append((t, g) if k else _NAN2)
            if k:
                T, G, n = T + t, G + g, n + 1
        return groups, ((T, G) if n else _NAN2)

    # ---- checkpoints ---------------------------------------------------------------
    def state_dict(self) -> dict:
        """τ, the step count, the last valid gains and the base learning rates."""
        return {"version": 1, "mode": self.mode, "base_batch_size": self.base_batch_size,
                "progress": self.progress, "steps": self.steps, "gains": list(self._valid),
                "model_gain": self._valid_model, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        """Continue a run from :meth:`state_dict` (same mode, base batch and groups)."""
        if state.get("version") != 1:
            raise GradNoiseError(f"unknown AdaScale state version {state.get('version')!r}")
        if state["mode"] != self.mode:
            raise GradNoiseError(f"state of a mode={state['mode']!r} AdaScale loaded into a mode={self.mode!r} one")
        if float(state["base_batch_size"]) != self.base_batch_size:
            raise GradNoiseError(f"state counts τ in steps of base batch {state['base_batch_size']}, "
                                 f"this AdaScale's is {self.base_batch_size}")
        self._sync_groups()
        if len(state["base_lrs"]) != len(self._pairs):
            raise GradNoiseError(f"state has {len(state['base_lrs'])} param groups, the optimizer {len(self._pairs)}")
        self.progress, self.steps = float(state["progress"]), int(state["steps"])
        self._valid = [float(r) for r in state["gains"]]
        self._valid_model = float(state["model_gain"])
        self.base_lrs = [float(x) for x in state["base_lrs"]]
        self.gain, self.model_gain = list(self._valid), self._valid_model

