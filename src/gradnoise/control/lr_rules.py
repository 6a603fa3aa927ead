"""The learning-rate rules for a change of batch size: :mod:`gradnoise.stats.rules` (kept
importable here, where the controls that use them live)."""
from ..stats.rules import adam_sqrt, adascale, linear, optimal_lr, sqrt

__all__ = ["adam_sqrt", "adascale", "linear", "optimal_lr", "sqrt"]
