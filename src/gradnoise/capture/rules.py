"""The explicit rule table: which torch functions and module types gradnoise measures
with a functional rule. Everything else that owns parameters goes to a module rule
(a user's, or the torch.func fallback)."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .attention import handle_mha
from .conv import handle_conv
from .embedding import handle_embedding
from .linear import handle_linear
from .loss import handle_backward
from .norm import (
    handle_batch_norm,
    handle_group_norm,
    handle_instance_norm,
    handle_layer_norm,
    handle_rms_norm,
)

FUNCTION_RULES = {
    F.linear: handle_linear,
    torch._C._nn.linear: handle_linear,
    torch.conv1d: handle_conv,
    torch.conv2d: handle_conv,
    torch.conv3d: handle_conv,
    F.embedding: handle_embedding,
    F.layer_norm: handle_layer_norm,
    F.group_norm: handle_group_norm,
    F.instance_norm: handle_instance_norm,
    F.batch_norm: handle_batch_norm,
    F.multi_head_attention_forward: handle_mha,
    torch.Tensor.backward: handle_backward,
}
if hasattr(F, "rms_norm"):  # torch >= 2.4
    FUNCTION_RULES[F.rms_norm] = handle_rms_norm

# Module types whose forward uses their parameters only through the functions above.
FUNCTIONAL_MODULES = tuple(
    m for m in (
        nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.LayerNorm,
        nn.GroupNorm, getattr(nn, "RMSNorm", None), nn.InstanceNorm1d, nn.InstanceNorm2d,
        nn.InstanceNorm3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
        nn.MultiheadAttention,
    ) if m is not None
)


def is_functional(module: nn.Module) -> bool:
    """True when ``module`` is a known layer type whose ``forward`` is not overridden."""
    return _is_functional_type(type(module))


@functools.lru_cache(maxsize=None)
def _is_functional_type(cls: type) -> bool:
    return any(issubclass(cls, base) and cls.forward is base.forward for base in FUNCTIONAL_MODULES)
