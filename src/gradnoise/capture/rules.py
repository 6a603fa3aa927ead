"""The explicit rule table: the torch functions gradnoise measures with a rule of their
own when a measured parameter meets per-sample data there. Any other call where that
happens goes to the direct-use rule (:mod:`gradnoise.capture.direct`); modules are
recognised by the calls they make, not by their class. Module rules remain for a
user's own rules and for recurrent layers (the torch.func fallback)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import handle_mha
from .conv import handle_conv
from .embedding import handle_embedding
from .linear import handle_addmm, handle_linear, handle_matmul
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
    torch.addmm: handle_addmm,
    torch.matmul: handle_matmul,
    torch.Tensor.matmul: handle_matmul,
    torch.Tensor.__matmul__: handle_matmul,
    torch.mm: handle_matmul,
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

# Calls handled whatever their arguments: the loss's reduction check, and batch
# statistics (which mix samples) refused.
ALWAYS = frozenset({torch.Tensor.backward, F.batch_norm})


def needs_module_rule(module: nn.Module) -> bool:
    """Recurrent layers call fused kernels on their flat weights with the batch on dim 1
    (unless ``batch_first``): the torch.func fallback handles them as a whole."""
    return isinstance(module, nn.RNNBase)
