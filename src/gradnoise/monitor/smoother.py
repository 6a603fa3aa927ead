"""Smoothing a run's per-step statistics: one debiased EMA of ``tr(Σ)`` and ``|G|²`` for
the whole model, one for each parameter, one for each layer (its parameters' sums) and,
for an Adam-type optimizer, one of the preconditioned sums ``Σ_p w_p tr Σ_p`` and
``Σ_p w_p |G_p|²`` (:mod:`gradnoise.monitor.precond`; :mod:`gradnoise.stats.smoothing`)."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Dict, Mapping, Optional, Tuple

from ..stats import NoiseStats, from_estimates, smoothing
from .precond import weighted
from .record import LayerNoise

Interval = Tuple[float, float]


class NoiseSmoother:
    """Debiased EMAs (decay ``beta``) of the per-step estimates, total, per parameter and
    per layer.

    Args:
        beta: the decay.
        layer_of: parameter name -> its layer's name (a parameter missing from it is
            in no layer).

    A step whose estimates are not finite is never folded in (the caller decides).
    """

    def __init__(self, beta: float = 0.95, layer_of: Optional[Mapping[str, str]] = None):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.layer_of = dict(layer_of or {})
        self.total = smoothing.init()
        self.by_param: Dict[str, smoothing.EmaState] = {}
        self.by_layer: Dict[str, smoothing.EmaState] = {}
        self.precond = smoothing.init()

    def update(self, raw: NoiseStats, weights: Optional[Mapping[str, float]] = None) -> None:
        """Fold one step's ``raw`` statistics (with ``by_param``) in; ``weights``
        (name -> Adam's ``w_p``, when the optimizer has state) feed the preconditioned EMA."""
        self.total = smoothing.update(self.total, raw.trace_cov, raw.grad_sq_norm, self.beta)
        if weights:
            t, g = weighted(raw.by_param, weights)
            if math.isfinite(t) and math.isfinite(g):
                self.precond = smoothing.update(self.precond, t, g, self.beta)
        sums: Dict[str, Tuple[float, float]] = {}
        for name, s in raw.by_param.items():
            self.by_param[name] = smoothing.update(self.by_param.get(name, smoothing.init()), s.trace_cov,
                                                   s.grad_sq_norm, self.beta)
            layer = self.layer_of.get(name)
            if layer is not None:
                t, g = sums.get(layer, (0.0, 0.0))
                sums[layer] = (t + s.trace_cov, g + s.grad_sq_norm)
        for layer, (t, g) in sums.items():
            if math.isfinite(t) and math.isfinite(g):
                self.by_layer[layer] = smoothing.update(self.by_layer.get(layer, smoothing.init()), t, g, self.beta)

    def smoothed(self, batch_size: int, n_groups: int) -> Tuple[NoiseStats, Interval]:
        """Smoothed statistics (with ``by_param``) and the 95 % interval of ``b_simple``."""
        whole = self._stats(self.total, batch_size, n_groups)
        parts = {name: self._stats(state, batch_size, n_groups) for name, state in self.by_param.items()}
        return replace(whole, by_param=parts), _ratio_interval(self.total, self.beta)

    def preconditioned(self, batch_size: int, n_groups: int) -> Optional[Tuple[NoiseStats, Interval]]:
        """The smoothed preconditioned statistics and their ``b_simple`` interval; None
        before any step had weights."""
        if not self.precond.count:
            return None
        return self._stats(self.precond, batch_size, n_groups), _ratio_interval(self.precond, self.beta)

    def intervals(self) -> Tuple[Interval, Interval]:
        """95 % intervals of the smoothed total ``tr(Σ)`` and ``|G|²``."""
        return smoothing.mean_interval(self.total, self.beta)

    def layers(self, batch_size: int, n_groups: int) -> Dict[str, LayerNoise]:
        """Layer -> its smoothed statistics and ``b_simple`` interval."""
        return {name: LayerNoise(self._stats(state, batch_size, n_groups), _ratio_interval(state, self.beta))
                for name, state in self.by_layer.items()}

    def _stats(self, state: smoothing.EmaState, batch_size: int, n_groups: int) -> NoiseStats:
        t, s = smoothing.means(state, self.beta)
        return from_estimates(t, s, batch_size, n_groups)

    def state_dict(self) -> dict:
        return {
            "beta": self.beta,
            "total": tuple(self.total),
            "by_param": {k: tuple(v) for k, v in self.by_param.items()},
            "by_layer": {k: tuple(v) for k, v in self.by_layer.items()},
            "precond": tuple(self.precond),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (a state saved before layers were smoothed starts
        the layers' averages afresh)."""
        self.beta = float(state["beta"])
        self.total = smoothing.EmaState(*state["total"])
        self.by_param = {k: smoothing.EmaState(*v) for k, v in state["by_param"].items()}
        self.by_layer = {k: smoothing.EmaState(*v) for k, v in state.get("by_layer", {}).items()}
        self.precond = smoothing.EmaState(*state.get("precond", ()))


def _ratio_interval(state: smoothing.EmaState, beta: float) -> Interval:
    return smoothing.ratio_interval(state, beta) if state.count else (math.nan, math.nan)
