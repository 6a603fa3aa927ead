"""Binding of the positional-or-keyword arguments that rules receive from the router."""
from __future__ import annotations

from typing import Any, List, Sequence


def bind(args: Sequence, kwargs: dict, names: Sequence[str], defaults: Sequence = ()) -> List[Any]:
    """Values of ``names`` taken from ``args`` then ``kwargs``; the last
    ``len(defaults)`` names fall back to ``defaults``, the others to None."""
    first_default = len(names) - len(defaults)
    values = []
    for i, name in enumerate(names):
        if i < len(args):
            values.append(args[i])
        elif name in kwargs:
            values.append(kwargs[name])
        else:
            values.append(defaults[i - first_default] if i >= first_default else None)
    return values
