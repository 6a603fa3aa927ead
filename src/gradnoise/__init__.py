"""gradnoise: measure, explain and control the variance of mini-batch gradients."""
from . import stats
from .capture import Capture, capture
from .errors import (
    CaptureStateError,
    FallbackError,
    GradNoiseError,
    ReductionError,
    SampleMixingError,
    UnsupportedUseError,
)
from .stats import NoiseStats

__version__ = "0.1.0"

__all__ = [
    "Capture",
    "CaptureStateError",
    "FallbackError",
    "GradNoiseError",
    "NoiseStats",
    "ReductionError",
    "SampleMixingError",
    "UnsupportedUseError",
    "capture",
    "stats",
]
