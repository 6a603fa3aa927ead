"""The built-in rule table (read-only): the torch functions gradnoise measures with a rule
of their own when a measured parameter meets per-sample data there. Any other call where
that happens goes to the direct-use rule (:mod:`gradnoise.capture.direct`); layers are
recognised by the calls they make, not by their class. Module rules — a user's own, given
per capture, and the torch.func fallback for recurrent layers — are in
:mod:`gradnoise.capture.modules`.

Each entry is a *front end*: it binds the call's arguments, resolves the measured ones,
and runs the layer through the adapter (:class:`~gradnoise.capture.site.Site`) with the
rule's pure kernel (``linear_forms``, ``lookup_form``, ``ConvForm``, ``affine_forms``).
"""
from __future__ import annotations

from types import MappingProxyType

import torch
import torch.nn.functional as F

from .attention import handle_mha
from .conv import handle_conv, handle_conv_transpose
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

_TABLE = {
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
    torch.conv_transpose1d: handle_conv_transpose,
    torch.conv_transpose2d: handle_conv_transpose,
    torch.conv_transpose3d: handle_conv_transpose,
    F.embedding: handle_embedding,
    F.layer_norm: handle_layer_norm,
    F.group_norm: handle_group_norm,
    F.instance_norm: handle_instance_norm,
    F.batch_norm: handle_batch_norm,
    F.multi_head_attention_forward: handle_mha,
    torch.Tensor.backward: handle_backward,
}
if hasattr(F, "rms_norm"):  # torch >= 2.4
    _TABLE[F.rms_norm] = handle_rms_norm

FUNCTION_RULES = MappingProxyType(_TABLE)

# Calls handled whatever their arguments: the loss's reduction check, and batch
# statistics (which mix samples) refused.
ALWAYS = frozenset({torch.Tensor.backward, F.batch_norm})
