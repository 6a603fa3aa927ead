"""A controlled landscape with a sharp and a flat basin, and walkers driven by SGD noise
or by isotropic noise of the same magnitude (the ``escape`` study, part a).

The loss of sample ``i`` is the landscape shifted by its data point, ``f_i(θ) = f(θ − z_i)``,
``θ = (x, y)``, with ``N`` fixed points ``z_i ~ N(0, s² I)``, and ``f`` two quadratic
wells in ``x`` joined smoothly (a soft minimum of temperature ``τ``):

    f(x, y) = y²/2 − τ log(exp(−q_s(x)/τ) + exp(−q_f(x)/τ)),
    q_s = h_s (x − x_s)²/2,   q_f = h_f (x − x_f)²/2 − δ,

a sharp well (curvature ``h_s``) at ``x_s`` and a flat, slightly deeper one (``h_f``,
``δ`` lower) at ``x_f``. Near a minimum the per-sample gradient noise is ``s² H²``: it is
strongest along the sharp direction, the one that leads out of the sharp well (Zhu et al.
2019, "The anisotropic noise in stochastic gradient descent"). Isotropic noise of the
same magnitude adds ``N(0, tr(Σ_B)/2 · I)`` to the full-data gradient, with ``Σ_B`` the
exact covariance of the size-``B`` batch mean at the walker's point (drawn without
replacement: ``tr(Σ)/B · (N − B)/(N − 1)``), so both kinds of noise carry the same
``tr(Σ_B)`` per step.

Pure numpy, vectorised over walkers: ``[W, N, 2]`` per step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

from ..stats.smoothing import Z95


@dataclass(frozen=True)
class Landscape:
    """The two-well loss (module docstring) and its data points."""

    h_sharp: float = 50.0
    x_sharp: float = -0.3
    h_flat: float = 1.0
    x_flat: float = 0.3
    drop: float = 0.05     # δ: how much deeper the flat well is
    tau: float = 0.01      # softness of the join
    spread: float = 0.05   # s, the data points' standard deviation
    n: int = 64

    def points(self, rng: np.random.Generator) -> np.ndarray:
        """The data points ``z`` ``[N, 2]``."""
        return rng.normal(0.0, self.spread, size=(self.n, 2))

    def grad(self, theta: np.ndarray) -> np.ndarray:
        """``∇f`` at points ``theta`` ``[..., 2]`` -> ``[..., 2]``."""
        x, y = theta[..., 0], theta[..., 1]
        qs = 0.5 * self.h_sharp * (x - self.x_sharp) ** 2
        qf = 0.5 * self.h_flat * (x - self.x_flat) ** 2 - self.drop
        ws = 1.0 / (1.0 + np.exp(np.clip((qs - qf) / self.tau, -60, 60)))  # softmax weight of the sharp well
        gx = ws * self.h_sharp * (x - self.x_sharp) + (1 - ws) * self.h_flat * (x - self.x_flat)
        return np.stack([gx, y], axis=-1)

    def sharp(self, x: np.ndarray) -> np.ndarray:
        """True where ``x`` lies in the sharp well's part of the line (before the join)."""
        return 0.5 * self.h_sharp * (x - self.x_sharp) ** 2 < 0.5 * self.h_flat * (x - self.x_flat) ** 2 - self.drop


def per_sample(land: Landscape, theta: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Per-sample gradients ``∇f(θ_w − z_i)``: ``theta`` ``[W, 2]``, ``z`` ``[N, 2]`` -> ``[W, N, 2]``."""
    return land.grad(theta[:, None, :] - z[None, :, :])


def walk(land: Landscape, z: np.ndarray, lr: float, batch: int, steps: int, walkers: int, kind: str,
         rng: np.random.Generator) -> Tuple[np.ndarray, float]:
    """Run ``walkers`` walkers from the sharp minimum for ``steps`` steps.

    Args:
        kind: ``"sgd"`` (mean gradient of ``batch`` samples drawn without replacement) or
            ``"isotropic"`` (the full-data gradient plus isotropic Gaussian noise of the
            SGD noise's trace at the walker's point).

    Returns:
        ``(final x [W], noise level)``: the noise level ``ε·tr(Σ_B)`` at the start (the
        sharp minimum), with ``Σ_B`` the covariance of the batch mean.
    """
    if kind not in ("sgd", "isotropic"):
        raise ValueError(f"kind must be 'sgd' or 'isotropic', got {kind!r}")
    n = len(z)
    fpc = (n - batch) / (n - 1) if n > 1 else 0.0
    theta = np.tile([land.x_sharp, 0.0], (walkers, 1))
    level = None
    for _ in range(steps):
        g = per_sample(land, theta, z)                      # [W, N, 2]
        mean = g.mean(1)
        trace = ((g - mean[:, None, :]) ** 2).sum(-1).mean(1) * n / (n - 1)   # tr Σ (sample covariance)
        if level is None:
            level = float(lr * np.mean(trace) / batch * fpc)
        if kind == "sgd":
            idx = np.argsort(rng.random((walkers, n)), axis=1)[:, :batch]
            step = np.take_along_axis(g, idx[:, :, None], axis=1).mean(1)
        else:
            step = mean + rng.normal(size=mean.shape) * np.sqrt(trace * fpc / batch / 2.0)[:, None]
        theta = theta - lr * step
    return theta[:, 0], level


def wilson(k: int, n: int, z: float = Z95) -> Tuple[float, float]:
    """Wilson's 95 % interval for a proportion ``k/n`` (inside [0, 1])."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
