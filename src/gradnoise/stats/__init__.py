"""Pure maths on tensors and floats: the gradient-noise estimators and their smoothing
(no modules, no I/O)."""
from . import smoothing
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
    "smoothing",
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
