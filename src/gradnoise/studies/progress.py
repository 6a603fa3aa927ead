"""Progress bars for long loops: tqdm on stderr, silent with ``quiet`` or when stderr is
not a terminal (logs and CI stay clean)."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


def bar(total: int, desc: str, quiet: bool = False):
    """A tqdm bar of ``total`` units; use ``.update(n)`` and ``.close()`` (or ``with``)."""
    disable = quiet or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, disable=disable, leave=False, dynamic_ncols=True, file=sys.stderr)
