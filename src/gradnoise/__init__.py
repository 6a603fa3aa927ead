"""gradnoise: measure, explain and control the variance of mini-batch gradients.

``import gradnoise`` is light: the names that need torch (the capture engine, the
monitor, its sinks, the optimizers) are loaded on first use (a module ``__getattr__``,
PEP 562), so the report path (``gradnoise report run.jsonl``, ``import gradnoise.report``)
never imports torch. ``gradnoise.capture``, ``gradnoise.NoiseMonitor`` and the rest work
as if imported eagerly.
"""
from __future__ import annotations

import importlib
from typing import Any, Dict, Tuple

from .errors import (
    CaptureStateError,
    FallbackError,
    GradNoiseError,
    ReductionError,
    SampleMixingError,
    UnsupportedUseError,
)
from .formats import read_run

__version__ = "0.1.0"

# public name -> (module, attribute; None: the module itself), imported on first use
_LAZY: Dict[str, Tuple[str, Any]] = {
    "stats": (".stats", None),
    "capture": (".capture", None),
    "optim": (".optim", None),
    "Capture": (".capture", "Capture"),
    "NoiseMonitor": (".monitor", "NoiseMonitor"),
    "StepRecord": (".monitor", "StepRecord"),
    "WindowNoise": (".monitor", "WindowNoise"),
    "WindowStats": (".monitor", "WindowStats"),
    "CsvSink": (".monitor.sinks", "CsvSink"),
    "JsonlSink": (".monitor.sinks", "JsonlSink"),
    "MetricsLoggerSink": (".monitor.sinks", "MetricsLoggerSink"),
    "TensorBoardSink": (".monitor.sinks", "TensorBoardSink"),
    "NoiseStats": (".stats.noise", "NoiseStats"),
    "probe": (".control.probe", "probe"),
    "save_checkpoint": (".control.checkpoint", "save_checkpoint"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _LAZY[name]
    mod = importlib.import_module(module, __name__)
    value = mod if attr is None else getattr(mod, attr)
    if attr is not None:  # a subpackage is set on the package by the import itself
        globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Capture",
    "CsvSink",
    "JsonlSink",
    "MetricsLoggerSink",
    "NoiseMonitor",
    "StepRecord",
    "TensorBoardSink",
    "WindowNoise",
    "WindowStats",
    "probe",
    "read_run",
    "save_checkpoint",
    "CaptureStateError",
    "FallbackError",
    "GradNoiseError",
    "NoiseStats",
    "ReductionError",
    "SampleMixingError",
    "UnsupportedUseError",
    "capture",
    "optim",
    "stats",
]
