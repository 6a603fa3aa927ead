"""Numbers for people, as the files hold them: the one place that prints a measured value.

Run and study files write an undefined number as ``null`` and an unbounded interval end
as ``"inf"`` / ``"-inf"`` (:mod:`gradnoise.formats`); :func:`~gradnoise.formats.to_float`
turns every such value into a float (NaN for undefined). The ``fmt_*`` functions print
floats for people, with ``"—"`` for anything undefined, so neither the page nor a
terminal line shows ``nan`` or ``None``. The studies' summary lines and the report both
use them (neither imports the other); pure, no numpy.
"""
from __future__ import annotations

import math
from typing import Any, Tuple

from .formats import interval, to_float

DASH = "—"
_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


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


# One precision per quantity, wherever the page (verdict, tables, figure labels) shows it:
# a number repeated on the page reads the same everywhere ("1.61", never "1.6" beside it).
NUMBER_DIGITS = 3   # measured values: B_simple, B_crit, B_noise, tr(Σ), |G|², losses, z, ratios
FACTOR_DIGITS = 2   # "×0.36": one method's steps or examples against another's


def fmt_lr(v: Any) -> str:
    """A learning rate (a grid value, ``ε_max``, or ``ε(B)`` from the fitted law)."""
    return fmt_num(v, NUMBER_DIGITS)


def fmt_z(v: Any) -> str:
    """A deviation in standard errors (the law study's ``z``)."""
    return fmt_num(v, NUMBER_DIGITS)


def fmt_factor(v: Any) -> str:
    """How many times one quantity is another, without the ``×`` (``"0.36"``)."""
    return fmt_num(v, FACTOR_DIGITS)


def fmt_share(v: Any) -> str:
    """A fraction in [0, 1] as a percentage: ``"49.3 %"``; ``"—"`` when undefined."""
    x = to_float(v)
    return fmt_num(None) if not math.isfinite(x) else f"{fmt_num(100 * x, NUMBER_DIGITS)} %"


UNDETERMINED = "not determined from these steps"


def domain_interval(v: Any) -> Tuple[float, float]:
    """``(low, high)`` of a file interval clipped to ``[0, inf]``: every interval gradnoise
    writes is of a quantity that cannot be negative (``B_simple``, ``tr(Σ)``, ``|G|²``,
    ``B_crit``, ``B_noise``); a file of version 1 could still hold ``-inf``."""
    low, high = interval(v)
    return (max(low, 0.0) if not math.isnan(low) else low), (max(high, 0.0) if not math.isnan(high) else high)


def fmt_interval(v: Any, digits: int = 3, signed: bool = False) -> str:
    """A file interval of a quantity ≥ 0, for people: ``"[8.1, 20.4]"``; ``"≥ 66"`` when
    only the lower end is bounded; :data:`UNDETERMINED` when neither is; ``"—"`` when
    undefined. ``signed``: a quantity that may be negative (a difference), not clipped."""
    low, high = interval(v) if signed else domain_interval(v)
    if signed and not (math.isnan(low) or math.isnan(high)):
        return f"[{fmt_num(low, digits)}, {fmt_num(high, digits)}]"
    if math.isnan(low) or math.isnan(high):
        return DASH
    if math.isinf(high):
        return UNDETERMINED if low <= 0 else f"≥ {fmt_num(low, digits)}"
    return f"[{fmt_num(low, digits)}, {fmt_num(high, digits)}]"


def fmt_with_interval(value: Any, iv: Any, digits: int = 3, signed: bool = False) -> str:
    """``"12.3 [8.1, 20.4]"``, ``"84.2 (95 % interval ≥ 66)"``, ``"84.2 (interval not
    determined from these steps)"``; the value alone when the interval is undefined, and
    ``"—"`` when the value is."""
    text = fmt_num(value, digits)
    band = fmt_interval(iv, digits, signed)
    if text == DASH or band == DASH:
        return text
    if band.startswith("["):
        return f"{text} {band}"
    return f"{text} (interval {band})" if band == UNDETERMINED else f"{text} (95 % interval {band})"


def fmt_factor_interval(v: Any, iv: Any) -> str:
    """A ratio with its interval, ``"×3 [1.5, 6.7]"`` (factor precision; ``"—"`` when
    undefined)."""
    text = fmt_with_interval(v, iv, FACTOR_DIGITS)
    return text if text == DASH else f"×{text}"
