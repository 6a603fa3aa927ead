"""Fixtures of the report tests; the file builders live in ``report_synth`` (made
importable here, whatever pytest's import mode)."""
import json
import os
import sys

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture
def lines_file(tmp_path):
    """``make(name, lines, end="\\n")``: write ``lines`` (dicts as JSON, strings as they
    are) one per line to ``tmp_path/name``, ending with ``end``; returns the path."""
    def make(name, lines, end="\n"):
        path = tmp_path / name
        text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines)
        path.write_text(text + end if lines else "", encoding="utf-8")
        return path
    return make
