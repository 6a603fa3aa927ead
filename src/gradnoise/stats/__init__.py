"""Pure maths on tensors and floats: the gradient-noise estimators and their smoothing
(no modules, no I/O)."""
from . import rules, smoothing
from .clients import FLAG_CLIENT_TOO_SMALL, FLAG_SINGLE_CLIENT, ClientMoments, ClientNoise, client_moments
from .clients import decompose as decompose_clients
from .noise import (
    FLAG_NON_FINITE,
    FLAG_NONPOSITIVE,
    FLAG_SINGLE_GROUP,
    NoiseStats,
    finite_population_factor,
    from_estimates,
    from_groups,
    from_moments,
    from_per_sample,
    total,
)

__all__ = [
    "rules",
    "smoothing",
    "FLAG_CLIENT_TOO_SMALL",
    "FLAG_SINGLE_CLIENT",
    "ClientMoments",
    "ClientNoise",
    "client_moments",
    "decompose_clients",
    "FLAG_NON_FINITE",
    "FLAG_NONPOSITIVE",
    "FLAG_SINGLE_GROUP",
    "NoiseStats",
    "finite_population_factor",
    "from_estimates",
    "from_groups",
    "from_moments",
    "from_per_sample",
    "total",
]
