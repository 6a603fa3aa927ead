"""Pure maths on tensors and floats: the gradient-noise estimators (no modules, no I/O)."""
from .noise import (
    FLAG_NON_FINITE,
    FLAG_NONPOSITIVE,
    FLAG_SINGLE_GROUP,
    NoiseStats,
    finite_population_factor,
    from_groups,
    from_moments,
    from_per_sample,
    total,
)

__all__ = [
    "FLAG_NON_FINITE",
    "FLAG_NONPOSITIVE",
    "FLAG_SINGLE_GROUP",
    "NoiseStats",
    "finite_population_factor",
    "from_groups",
    "from_moments",
    "from_per_sample",
    "total",
]
