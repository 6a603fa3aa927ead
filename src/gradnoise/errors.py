"""Errors gradnoise raises. Every message names the module or parameter at fault and
says what to do instead."""


class GradNoiseError(RuntimeError):
    """Base class of gradnoise's errors."""


class SampleMixingError(GradNoiseError):
    """A layer makes one sample's output depend on other samples (BatchNorm in training
    mode, say), so per-sample gradients do not exist."""


class UnsupportedUseError(GradNoiseError):
    """A parameter was used in a way no rule covers, so its per-sample gradient would be
    wrong."""


class FallbackError(GradNoiseError):
    """The torch.func fallback could not compute a module's per-sample gradients."""


class ReductionError(GradNoiseError):
    """The loss's reduction disagrees with the ``reduction`` given to capture."""


class CaptureStateError(GradNoiseError):
    """The capture was used out of order (nested capture, results read too early, ...)."""
