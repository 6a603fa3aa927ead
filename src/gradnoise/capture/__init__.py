"""Per-sample information from one backward pass: the capture context, the rule table
(one small file per layer family) and the torch.func fallback."""
import sys
import types

from .context import Capture, capture
from .forms import Dense, Factored, Lookup


class _CallableModule(types.ModuleType):
    """``gradnoise.capture`` is this subpackage *and* the function that opens a capture:
    ``gradnoise.capture(model)`` calls :func:`~gradnoise.capture.context.capture`, while
    ``gradnoise.capture.linear`` and ``import gradnoise.capture.linear`` reach the
    modules."""

    def __call__(self, *args, **kwargs) -> Capture:
        return capture(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["Capture", "capture", "Dense", "Factored", "Lookup"]
