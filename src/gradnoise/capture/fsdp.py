"""FSDP2 (``torch.distributed.fsdp.fully_shard``) as the capture sees it: which
parameters it manages, this rank's shard of a DTensor gradient, and the norms of whole
gradients from the shards' (one all-reduce of squared norms over the mesh).

Only a 1-D mesh with ``Shard`` placements is followed; HSDP, tensor parallelism and
parameters on several meshes are refused with the reason. Nothing here imports the
distributed packages: when they are not loaded, no model can be sharded.
"""
from __future__ import annotations

import sys
from typing import Any, Dict, List

import torch
from torch import nn

from ..errors import UnsupportedUseError


def fsdp_params(model: nn.Module, named, modules=None) -> Dict[str, Any]:
    """``name -> FSDPParam`` of the ``(name, parameter)`` pairs ``named`` (sharded, or
    unsharded mid-forward) that FSDP2's ``fully_shard`` manages in ``model`` (whose
    ``named_modules()`` may be given). Refuses the DTensors it cannot follow: anything but
    ``Shard`` placements on one 1-D mesh."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: no FSDP2
    module_type = getattr(fsdp, "FSDPModule", None)     # absent before torch 2.6's public FSDP2
    owners, out = {}, {}
    walk = (m for _, m in modules) if modules is not None else model.modules()
    for m in walk if module_type is not None else ():
        state = m._get_fsdp_state() if isinstance(m, module_type) else None
        for group in (getattr(state, "_fsdp_param_groups", None) or [state._fsdp_param_group]) if state else ():
            for fp in group.fsdp_params if group is not None else ():
                owners[id(fp.sharded_param)] = owners[id(getattr(fp, "_unsharded_param", fp))] = fp
    for name, p in named:
        fp = owners.get(id(p))
        d = p if fp is None else fp.sharded_param
        if local_shard(d) is not d and (fp is None or d.device_mesh.ndim != 1 or not all(x.is_shard() for x in d.placements)):
            raise UnsupportedUseError(
                f"parameter '{name}' is a DTensor on a {d.device_mesh.ndim}-D mesh as {tuple(d.placements)}"
                f"{'' if fp else ', not from fully_shard'}: gradnoise follows FSDP2's fully_shard on a 1-D "
                "mesh only, not HSDP or tensor parallelism")
        if fp is not None:
            out[name] = fp
    if len({fp.sharded_param.device_mesh for fp in out.values()}) > 1:
        raise UnsupportedUseError("FSDP2 shards the parameters on several device meshes; gradnoise follows one")
    return out


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2), else ``t`` itself."""
    mod = sys.modules.get("torch.distributed.tensor")  # not imported: no DTensor exists
    return t.to_local() if mod is not None and isinstance(t, mod.DTensor) else t


def whole_norms(norms: torch.Tensor, names: List[str], fsdp: Dict[str, Any]) -> torch.Tensor:
    """``[P]`` norms of the whole reduced gradients: for the FSDP2 parameters among
    ``names``, ``sqrt(Σ_ranks ||shard||²)`` (all-reduced over their mesh); the others'
    ``norms`` as they are."""
    mask = torch.tensor([k in fsdp for k in names], device=norms.device)
    sq = torch.where(mask, norms.double().square(), 0.0)
    torch.distributed.all_reduce(sq, group=next(iter(fsdp.values())).sharded_param.device_mesh.get_group())
    return torch.where(mask, sq.sqrt().to(norms.dtype), norms)


__all__ = ["fsdp_params", "local_shard", "whole_norms"]
