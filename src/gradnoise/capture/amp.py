"""Autocast support for rules: cast like autocast would, then run the rule without it.

Under ``torch.autocast`` a rule's inputs are cast to the autocast dtype *outside* its
``autograd.Function`` (so the cast's backward returns the parameter's gradient in its
own dtype) and the Function runs with autocast off, computing the per-sample norms in
float32.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype active for ``device_type``, or None when autocast is off."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
        return torch.get_autocast_dtype(device_type) if enabled else None
    except (TypeError, AttributeError):  # torch < 2.4
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


_NO_CONTEXT = contextlib.nullcontext()


def cast(device_type: str, tensors: Sequence[Optional[torch.Tensor]]):
    """Cast floating tensors to the autocast dtype; returns ``(tensors, context)`` where
    the context turns autocast off for the rule's own computation."""
    dtype = autocast_dtype(device_type)
    if dtype is None:
        return tensors, _NO_CONTEXT
    out = [t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors]
    return out, torch.autocast(device_type, enabled=False)
