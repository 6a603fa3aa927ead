"""Training-loop use: per-sample, micro-batch and data-parallel sources, smoothing over
steps, sinks (JSONL, CSV, TensorBoard, any ``log_metrics`` logger), and a sliding-window
meter for online loops."""
from .monitor import NoiseMonitor
from .record import StepRecord
from .window import WindowNoise, WindowStats

__all__ = ["NoiseMonitor", "StepRecord", "WindowNoise", "WindowStats"]
