"""From a monitor's run file to advice: the critical batch size and the learning-rate
change a batch-size change calls for.

The maths is pure and lives in :mod:`gradnoise.stats.advice` (the report uses it without
importing the controls); this module is its public name under :mod:`gradnoise.control`.
"""
from __future__ import annotations

from ..stats.advice import advise, powers_of_two_around

__all__ = ["advise", "powers_of_two_around"]
