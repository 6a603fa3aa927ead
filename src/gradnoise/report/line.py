"""One sentence of the verdict, in pieces that may link to the part of the page their
number comes from, and the anchors of those parts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from .fmt import slug

Piece = Tuple[str, Optional[str]]     # (text, anchor or None)


@dataclass
class Line:
    """One sentence of the verdict: text pieces, some linked to a part of the page."""

    pieces: List[Piece] = field(default_factory=list)

    def add(self, text: str, anchor: Optional[str] = None) -> "Line":
        self.pieces.append((text, anchor))
        return self

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.pieces)


def anchor(study: str, task: str) -> str:
    """The id of a task's part of a study section (``critical-batch-digits-mlp``)."""
    return f"{study}-{slug(task)}"


__all__ = ["Line", "Piece", "anchor"]
