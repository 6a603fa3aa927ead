"""The report's table of sections: a study file's ``study`` header field -> the function
that turns that study's files into its section of the page, in the page's order.

The report owns this table (DESIGN.md §3): it reads files, not objects, so it needs the
name a study writes in its files, never the study's code; :mod:`gradnoise.studies` does not
import the report and the report does not import the studies. A test checks that every
study of :data:`gradnoise.studies.registry.NAMES` has a section here.

:data:`FORMAT_SECTIONS` does the same for files that are not study files, keyed by their
``format``: every probe file given joins the one probe section (after the studies'). Run
files get a section each, built by :func:`gradnoise.report.noise_sections.run_section`.
"""
from __future__ import annotations

from typing import Callable, Dict

from ..formats import PROBE_FORMAT
from .adaptive_section import adaptive_section
from .escape_section import escape_section
from .federated_section import federated_section
from .lm_section import lm_section
from .noise_sections import trajectory_section
from .online_section import online_section
from .optimizers_section import optimizers_section
from .probe_section import probe_section
from .sections import critical_section, law_section, lr_batch_section, recommend_section

SECTIONS: Dict[str, Callable] = {
    "law": law_section,
    "trajectory": trajectory_section,
    "critical-batch": critical_section,
    "lr-batch": lr_batch_section,
    "optimizers": optimizers_section,
    "adaptive": adaptive_section,
    "escape": escape_section,
    "lm": lm_section,
    "federated": federated_section,
    "online": online_section,
    "recommend": recommend_section,
}

FORMAT_SECTIONS: Dict[str, Callable] = {
    PROBE_FORMAT: probe_section,
}

__all__ = ["FORMAT_SECTIONS", "SECTIONS"]
