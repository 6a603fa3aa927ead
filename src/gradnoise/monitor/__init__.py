"""Training-loop use: per-sample, micro-batch and data-parallel sources, smoothing over
steps, and sinks (JSONL, CSV, TensorBoard, any ``log_metrics`` logger)."""
from .monitor import NoiseMonitor
from .record import StepRecord

__all__ = ["NoiseMonitor", "StepRecord"]
