"""Smoothing a run's per-step statistics: one debiased EMA of ``tr(Σ)`` and ``|G|²`` for
the whole model and one for each parameter (:mod:`gradnoise.stats.smoothing`)."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Dict, Tuple

from ..stats import NoiseStats, from_estimates, smoothing


class NoiseSmoother:
    """Debiased EMAs (decay ``beta``) of the per-step estimates, total and per parameter.

    A step whose estimates are not finite is never folded in (the caller decides).
    """

    def __init__(self, beta: float = 0.95):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.total = smoothing.init()
        self.by_param: Dict[str, smoothing.EmaState] = {}

    def update(self, raw: NoiseStats) -> None:
        """Fold one step's ``raw`` statistics (with ``by_param``) in."""
        self.total = smoothing.update(self.total, raw.trace_cov, raw.grad_sq_norm, self.beta)
        for name, s in raw.by_param.items():
            state = self.by_param.get(name, smoothing.init())
            self.by_param[name] = smoothing.update(state, s.trace_cov, s.grad_sq_norm, self.beta)

    def smoothed(self, batch_size: int, n_groups: int) -> Tuple[NoiseStats, Tuple[float, float]]:
        """Smoothed statistics (with ``by_param``) and the 95 % interval of ``b_simple``."""
        t, s = smoothing.means(self.total, self.beta)
        whole = from_estimates(t, s, batch_size, n_groups)
        parts = {}
        for name, state in self.by_param.items():
            pt, ps = smoothing.means(state, self.beta)
            parts[name] = from_estimates(pt, ps, batch_size, n_groups)
        interval = smoothing.ratio_interval(self.total, self.beta) if self.total.count else (math.nan, math.nan)
        return replace(whole, by_param=parts), interval

    def state_dict(self) -> dict:
        return {
            "beta": self.beta,
            "total": tuple(self.total),
            "by_param": {k: tuple(v) for k, v in self.by_param.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.beta = float(state["beta"])
        self.total = smoothing.EmaState(*state["total"])
        self.by_param = {k: smoothing.EmaState(*v) for k, v in state["by_param"].items()}
