"""``torch.compile``: a measured pass runs the model's compiled code eagerly.

The per-sample rules see every torch call of a pass (a torch-function mode and tensor
hooks), which a compiled graph does not make. So while a capture is open, compiled
functions and modules run as their eager Python (``torch.compiler.set_stance(
"force_eager")``, torch ≥ 2.6): the numbers are exactly those of the eager model, nothing
is recompiled, no graph break is added, and every pass outside a capture (the monitor's
unmeasured steps) runs the compiled graphs. A model compiled in place (``model.compile()``)
or wrapped (``torch.compile(model)``) is measured under its own parameter names.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, ContextManager

import torch
from torch import nn

from ..errors import GradNoiseError


def unwrap(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile(model)`` wrapper holds (``model`` itself otherwise), so
    parameters keep the names of the user's model (no ``_orig_mod.`` prefix)."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) and _is_wrapper(model) else model


def _is_wrapper(model: nn.Module) -> bool:
    return type(model).__name__ == "OptimizedModule" and type(model).__module__.startswith("torch._dynamo")


def _set_stance():
    return getattr(getattr(torch, "compiler", None), "set_stance", None)


def require_stances(model: nn.Module) -> None:
    """Refuse a compiled ``model`` where torch has no compiler stances (torch < 2.6)."""
    if _set_stance() is None and (_is_wrapper(model) or getattr(model, "_compiled_call_impl", None) is not None):
        raise GradNoiseError(
            f"measuring a torch.compile'd model needs torch >= 2.6 (this is {torch.__version__}): "
            "capture the uncompiled model, or use NoiseMonitor(model, source='microbatch')"
        )


def eager() -> ContextManager:
    """Compiled code runs eagerly from this call until the returned context's ``__exit__``
    (which restores the stance before it). Nothing where Dynamo was never imported (no
    compiled code can exist, and importing it costs a second) or torch has no stances."""
    set_stance = _set_stance() if "torch._dynamo" in sys.modules else None
    return contextlib.nullcontext() if set_stance is None else set_stance("force_eager")


_holders = 0
_held = None


def hold_eager() -> Callable[[], None]:
    """Compiled code runs eagerly from now until the returned ``release()`` is called (a
    second call does nothing). Holds of several owners nest in any order: the stance
    returns to what it was before the first when the last is released."""
    global _holders, _held
    if _holders == 0:
        _held = eager()
    _holders += 1
    done = []

    def release() -> None:
        global _holders, _held
        if done:
            return
        done.append(True)
        _holders -= 1
        if _holders == 0 and _held is not None:
            _held.__exit__(None, None, None)
            _held = None
    return release


def refuse_compiled_region(what: str) -> None:
    """Raise where Dynamo is tracing gradnoise's own code (a capture opened, or a monitor
    stepped, inside a function given to ``torch.compile``): it cannot watch the graph it
    is part of."""
    if _in_compiled_region():
        raise GradNoiseError(
            f"{what} inside a torch.compile'd function: open the capture (or call monitor.step()) "
            "outside it and compile the model or its forward instead; measured passes then run "
            "eagerly, the others compiled"
        )


def _in_compiled_region() -> bool:
    """True while Dynamo traces, or runs the eager parts of, a compiled function."""
    if "torch._dynamo" not in sys.modules:
        return False
    compiling = getattr(torch.compiler, "is_compiling", None)
    if compiling is not None and compiling():
        return True
    try:
        from torch._C._dynamo.eval_frame import get_eval_frame_callback
    except ImportError:  # pragma: no cover - a torch without it
        return False
    callback = get_eval_frame_callback()
    return callback is not None and callback is not False
