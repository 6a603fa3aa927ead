"""Progress bars for long loops: tqdm on stderr, silent with ``quiet`` or when stderr is
not a terminal (logs and CI stay clean). ``gradnoise study`` shows one overall line
(``study 3/5: critical-batch on digits-mlp``) with each study's own bar below it."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


def bar(total: int, desc: str, quiet: bool = False, position: int = 1):
    """A tqdm bar of ``total`` units; use ``.update(n)`` and ``.close()`` (or ``with``).
    ``position`` 1 puts it under the overall line (:func:`overall`)."""
    disable = quiet or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, disable=disable, leave=False, dynamic_ncols=True, file=sys.stderr,
                position=position)


def overall(total: int, quiet: bool = False):
    """The overall line of a run of ``total`` studies (its description names the current
    one; its count the finished ones)."""
    disable = quiet or not sys.stderr.isatty()
    return tqdm(total=total, desc="gradnoise study", disable=disable, leave=False, dynamic_ncols=True,
                file=sys.stderr, position=0, unit="study", bar_format="{desc} [{elapsed}]")
