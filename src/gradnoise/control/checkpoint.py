"""The checkpoint ``gradnoise probe --checkpoint`` reads: a :func:`torch.save` of a dict,
read back with ``weights_only=True``::

    {"model": model.state_dict(),
     "optimizer": optimizer.state_dict(),  # an optimizer over model.parameters(), in that order
     "step": int}                          # the loop's step count (optional; recorded)

:func:`save_checkpoint` writes one from a training loop; :func:`read_checkpoint` reads one
and checks its three entries for type (the command then checks them against its model and
optimizer, naming the first key that does not match).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping

import torch
from torch import nn


def save_checkpoint(path: "os.PathLike[str] | str", model: nn.Module, optimizer: torch.optim.Optimizer,
                    step: int) -> str:
    """Write the checkpoint ``gradnoise probe --checkpoint`` reads (format above);
    returns ``path`` as a string."""
    if not (isinstance(step, int) and step >= 0):
        raise ValueError(f"step must be a whole number ≥ 0, got {step!r}")
    path = os.fspath(path)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, path)
    return path


def read_checkpoint(path: str) -> Dict[str, Any]:
    """The checkpoint at ``path``, its three entries checked for type (not yet against a
    model)."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file: one line
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"checkpoint {path}: cannot be read by torch.load(weights_only=True) "
                         f"({type(e).__name__}: {first})") from None
    if not (isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping)
            and isinstance(obj.get("optimizer"), Mapping)):
        raise ValueError(f"checkpoint {path}: not a dict with 'model' and 'optimizer' state dicts "
                         "(write it with gradnoise.save_checkpoint)")
    step = obj.get("step")
    if step is not None and not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
        raise ValueError(f"checkpoint {path}: 'step' must be a whole number ≥ 0, got {step!r}")
    return dict(obj)


__all__ = ["read_checkpoint", "save_checkpoint"]
