"""Errors gradnoise raises. Every message names the module or parameter at fault and
says what to do instead."""


# What to do about a layer that mixes samples (BatchNorm in training mode, …): a recipe
# that works, quoted by every such error.
MICROBATCH_RECIPE = (
    "measure with the micro-batch source instead: gradnoise.NoiseMonitor(model, source='microbatch') "
    "with each optimizer step split into k ≥ 2 micro-batches (gradient accumulation: one forward and "
    "backward() per micro-batch, each mean loss times b_j/B), or source='ddp' across ranks. BatchNorm "
    "then normalises each micro-batch with its own b_j samples' statistics, as any accumulation does"
)


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
