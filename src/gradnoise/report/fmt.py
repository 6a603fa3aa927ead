"""Numbers as the files hold them, and as the report prints them.

Run and study files write an undefined number as ``null`` and an unbounded interval end
as ``"inf"`` / ``"-inf"``. :func:`to_float` turns every such value into a float (NaN for
undefined); the ``fmt_*`` functions print floats for people, with ``"—"`` for anything
undefined, so the page never shows ``nan`` or ``None``.
"""
from __future__ import annotations

import math
import re
from typing import Any, Optional, Sequence

import numpy as np

DASH = "—"
_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def to_float(v: Any) -> float:
    """A float from a file value: numbers as they are, ``"inf"``/``"-inf"`` as ±inf,
    ``None`` and anything else as NaN."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v.strip().lower() in ("inf", "+inf", "-inf"):
        return -math.inf if v.strip().startswith("-") else math.inf
    return math.nan


def floats(values: Sequence[Any]) -> np.ndarray:
    """``to_float`` of each value, as a float64 array of shape ``[len(values)]``."""
    return np.array([to_float(v) for v in values], dtype=np.float64)


def interval(v: Any) -> tuple:
    """``(low, high)`` floats from a file's ``[low, high]`` (NaN ends when malformed)."""
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return to_float(v[0]), to_float(v[1])
    return math.nan, math.nan


def fmt_num(v: Any, digits: int = 3) -> str:
    """``v`` with ``digits`` significant digits; powers of ten as ``1.2×10⁵`` outside
    ``[10⁻³, 10⁴)``; ``"∞"``/``"−∞"`` for infinities; ``"—"`` when undefined."""
    x = to_float(v)
    if math.isnan(x):
        return DASH
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e4:
        rounded = float(f"{x:.{digits}g}")
        decimals = max(0, digits - 1 - math.floor(math.log10(abs(rounded))))
        text = f"{rounded:.{decimals}f}"
        text = text.rstrip("0").rstrip(".") if "." in text else text
        return text.replace("-", "−")
    mantissa, exponent = f"{x:.{digits - 1}e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".") if "." in mantissa else mantissa
    power = str(int(exponent)).translate(_SUPERSCRIPT)
    return f"{mantissa.replace('-', '−')}×10{power}"


def fmt_count(v: Any) -> str:
    """An integer count (batch size, steps, examples); ``"—"`` when undefined."""
    x = to_float(v)
    if not math.isfinite(x):
        return fmt_num(x)
    if x.is_integer() and abs(x) < 1e12:
        return str(int(x))
    return fmt_num(x)


def fmt_interval(v: Any, digits: int = 3) -> str:
    """``"[low, high]"`` of a file interval; ``"—"`` when both ends are undefined."""
    low, high = interval(v)
    if math.isnan(low) and math.isnan(high):
        return DASH
    return f"[{fmt_num(low, digits)}, {fmt_num(high, digits)}]"


def fmt_with_interval(value: Any, iv: Any, digits: int = 3) -> str:
    """``"12.3 [8.1, 20.4]"``: a value and its interval (the interval left out when undefined)."""
    text = fmt_num(value, digits)
    band = fmt_interval(iv, digits)
    return text if band == DASH else f"{text} {band}"


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
