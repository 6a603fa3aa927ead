"""Pure maths on tensors and floats: the gradient-noise estimators and their smoothing,
the decision rules and fits (no modules, no I/O).

The client decomposition (:mod:`gradnoise.stats.clients`) works on tensors and is loaded
on first use, so the float-only parts (``rules``, ``smoothing``, ``fits``, ``advice``,
``noise``) import without torch — the report uses them.
"""
from __future__ import annotations

import importlib
from typing import Any

from . import rules, smoothing
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

# public name -> its name in gradnoise.stats.clients (which imports torch), loaded on first use
_CLIENTS = {
    "FLAG_CLIENT_TOO_SMALL": "FLAG_CLIENT_TOO_SMALL",
    "FLAG_SINGLE_CLIENT": "FLAG_SINGLE_CLIENT",
    "ClientMoments": "ClientMoments",
    "ClientNoise": "ClientNoise",
    "client_moments": "client_moments",
    "decompose_clients": "decompose",
}


def __getattr__(name: str) -> Any:
    if name not in _CLIENTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(".clients", __name__), _CLIENTS[name])
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_CLIENTS))


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
