"""Names of parameters and layers as the user's model has them.

A ``DistributedDataParallel`` wrapper puts ``module.`` in front of every parameter name,
Lightning's (Fabric's) module wrapper ``_forward_module.`` and ``torch.compile`` ``_orig_mod.``; the monitor reports the names of
the model inside them, so a run file reads the same with and without the wrappers. A
*layer* is the module that owns parameters directly: its path (``blocks.0.attn``) and
class name (``MultiheadAttention``); parameters of the root module are layers of their
own, named like the parameter.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

from torch import nn

from ..capture.compiled import unwrap as unwrap_compiled

def unwrap(model: nn.Module) -> Tuple[nn.Module, str]:
    """``(inner, prefix)``: the model inside DDP / Lightning / ``torch.compile`` wrappers and
    the prefix (``"module._forward_module."``) its parameter names get from them (``""`` when
    none)."""
    prefix = ""
    while True:
        if unwrap_compiled(model) is not model:
            model, prefix = unwrap_compiled(model), prefix + "_orig_mod."
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model, prefix = model.module, prefix + "module."
        elif isinstance(getattr(model, "_forward_module", None), nn.Module):  # Lightning / Fabric
            model, prefix = model._forward_module, prefix + "_forward_module."
        else:
            return model, prefix


def strip(name: str, prefix: str) -> str:
    """A wrapped parameter name without the wrappers' ``prefix``."""
    return name[len(prefix):] if prefix and name.startswith(prefix) else name


def layer_of(param: str) -> str:
    """``"blocks.0.attn.in_proj_weight"`` -> ``"blocks.0.attn"``; a parameter of the root
    module (no dot) is its own layer."""
    return param.rsplit(".", 1)[0] if "." in param else param


def layers(model: nn.Module) -> Dict[str, Dict[str, Any]]:
    """Layer path -> ``{"type": class name, "params": [parameter names]}`` of the
    trainable parameters of ``model`` (already unwrapped), in the model's order."""
    out: Dict[str, Dict[str, Any]] = {}
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            entry = out.setdefault(layer_of(full), {"type": type(module).__name__, "params": []})
            entry["params"].append(full)
    return out
