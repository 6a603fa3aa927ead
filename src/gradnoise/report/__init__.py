"""The HTML report: plots and tables built from study and run files only.

``build_report(files, out_dir)`` reads ``gradnoise-study`` files (written by the studies)
and ``gradnoise-run`` files (written by the monitor) and writes one self-contained page,
``out_dir/index.html``, whose top is the verdict (``verdict_lines`` gives it as text);
``read_study(path)`` reads and validates one study file.
"""
from .build import build_report, verdict_lines
from .files import read_study

__all__ = ["build_report", "read_study", "verdict_lines"]
