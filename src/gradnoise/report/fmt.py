"""Numbers as the files hold them, and as the report prints them.

The number formatting itself (``fmt_num``, ``fmt_with_interval``, one precision per
quantity, ``"—"`` for anything undefined) lives in :mod:`gradnoise.numbers`, shared with
the studies' summary lines; it is re-exported here with the report's own helpers: arrays
of file numbers (:func:`floats`), text fields (:func:`fmt_text`) and file names (:func:`slug`).
"""
from __future__ import annotations

import math
import re
from typing import Any, Optional, Sequence

import numpy as np

from ..formats import interval, to_float
from ..numbers import (DASH, FACTOR_DIGITS, NUMBER_DIGITS, UNDETERMINED, domain_interval, fmt_count, fmt_factor, fmt_factor_interval,
                       fmt_interval, fmt_lr, fmt_num, fmt_share, fmt_with_interval, fmt_z)

__all__ = ["DASH", "FACTOR_DIGITS", "NUMBER_DIGITS", "UNDETERMINED", "domain_interval", "floats", "fmt_count",
           "fmt_factor", "fmt_factor_interval", "fmt_interval", "fmt_lr", "fmt_num", "fmt_share", "fmt_text", "fmt_with_interval", "fmt_z",
           "interval", "slug", "to_float"]


def floats(values: Sequence[Any]) -> np.ndarray:
    """``to_float`` of each value, as a float64 array of shape ``[len(values)]``."""
    return np.array([to_float(v) for v in values], dtype=np.float64)


def fmt_text(v: Optional[Any]) -> str:
    """A string field for display; ``"—"`` for ``None`` or an empty string."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return DASH
    text = str(v)
    return text if text.strip() else DASH


def slug(text: str) -> str:
    """A file-name-safe lower-case name: letters, digits, ``-`` and ``_`` only."""
    out = re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-").lower()
    return out or "figure"

