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


class Overall:
    """The overall line of a run of ``total`` studies: ``study k/total: <what>``, drawn
    once per study when it starts (:meth:`start`). The line shows only that text and the
    time: advancing a tqdm count after a study would redraw the finished study's text
    (``study 13/14`` twice), so the count lives here."""

    def __init__(self, total: int, quiet: bool = False):
        self.total = total
        self.started = 0
        self._line = tqdm(total=total, desc="gradnoise study", disable=quiet or not sys.stderr.isatty(),
                          leave=False, dynamic_ncols=True, file=sys.stderr, position=0, unit="study",
                          bar_format="{desc} [{elapsed}]")

    def start(self, what: str) -> None:
        """Show that study ``started + 1`` of ``total`` (``what``) is running."""
        self.started += 1
        self._line.set_description_str(f"study {self.started}/{self.total}: {what}")

    def close(self) -> None:
        self._line.close()

    def __enter__(self) -> "Overall":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def overall(total: int, quiet: bool = False) -> Overall:
    """The overall line of a run of ``total`` studies (:class:`Overall`)."""
    return Overall(total, quiet)
