"""The HTML report: plots and tables built from study and run files only.

``build_report(files, out_dir)`` reads ``gradnoise-study`` files (written by the studies)
and ``gradnoise-run`` files (written by the monitor) and writes one self-contained page,
``out_dir/index.html``; ``read_study(path)`` reads and validates one study file.
"""
from .build import build_report
from .files import read_study

__all__ = ["build_report", "read_study"]
