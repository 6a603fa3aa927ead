"""gradnoise: measure, explain and control the variance of mini-batch gradients."""
from . import stats
from . import capture
from . import optim
from .capture import Capture
from .errors import (
    CaptureStateError,
    FallbackError,
    GradNoiseError,
    ReductionError,
    SampleMixingError,
    UnsupportedUseError,
)
from .monitor import NoiseMonitor, StepRecord, WindowNoise, WindowStats
from .monitor.sinks import CsvSink, JsonlSink, MetricsLoggerSink, TensorBoardSink, read_run
from .stats import NoiseStats

__version__ = "0.1.0"

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
    "read_run",
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
