"""The two moments every source reduces a step to (DESIGN.md §1), per parameter.

``A_p = Σ_j (b_j/B)||g_p⁽ʲ⁾||²`` and ``C_p = ||Σ_j w_j g_p⁽ʲ⁾||²`` (``w_j = b_j/B`` unless
``combo_factor`` says otherwise), with ``B`` samples in ``k`` groups.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from .. import stats as _stats


@dataclass
class Moments:
    """Per-parameter moments of one step."""

    names: List[str]
    group_sq: List[float]
    mean_sq: List[float]
    batch_size: int
    n_groups: int
    combo_factor: Optional[float] = None

    def stats(self, scale: float = 1.0) -> _stats.NoiseStats:
        """Statistics with ``by_param``; ``scale`` divides both moments (``S²`` for a
        GradScaler's loss scale ``S``)."""
        parts = {
            name: _stats.from_moments(a / scale, c / scale, self.batch_size, self.n_groups, None, self.combo_factor)
            for name, a, c in zip(self.names, self.group_sq, self.mean_sq)
        }
        return _stats.total(parts)
