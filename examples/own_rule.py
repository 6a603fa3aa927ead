"""A rule for a layer gradnoise cannot see into: a fused Linear + GELU written as a custom
``torch.autograd.Function`` (as fused kernels are). gradnoise follows calls of torch
functions; inside ``FusedLinearGelu.apply`` there are none to follow, so the layer needs a
rule: one kernel, one entry in ``rules=``.

    python examples/own_rule.py

The rule receives the layer's inputs (samples on dim 0) and the gradient of its output,
and returns each parameter's per-sample gradients — here in factored form: the weight's
gradient of sample ``n`` is ``Σ_t δ_nt x_ntᵀ`` with ``δ`` the gradient at the GELU's input,
so gradnoise takes its norm by the cheaper route and never builds ``[N, d_out, d_in]``.
"""
import torch
import torch.nn.functional as F
from torch import nn

import gradnoise
from gradnoise.capture import Dense, Factored


class FusedLinearGelu(torch.autograd.Function):
    """``gelu(x Wᵀ + b)`` with a hand-written backward (a stand-in for a fused kernel)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        z = F.linear(x, weight, bias)
        ctx.save_for_backward(x, weight, z)
        return F.gelu(z)

    @staticmethod
    def backward(ctx, gy):
        x, weight, z = ctx.saved_tensors
        dz = gy * gelu_grad(z)
        flat_x, flat_dz = x.reshape(-1, x.shape[-1]), dz.reshape(-1, dz.shape[-1])
        return dz @ weight, flat_dz.t() @ flat_x, flat_dz.sum(0)


def gelu_grad(z: torch.Tensor) -> torch.Tensor:
    """d gelu(z) / dz for the exact (erf) GELU."""
    cdf = 0.5 * (1 + torch.erf(z / 2**0.5))
    return cdf + z * torch.exp(-0.5 * z * z) / (2 * torch.pi) ** 0.5


class LinearGelu(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x):
        return FusedLinearGelu.apply(x, self.weight, self.bias)


# ---- the rule ---------------------------------------------------------------------------
def linear_gelu_rule(module, args, kwargs, output, grad_output):
    """Per-sample gradients of ``LinearGelu``: ``x`` ``[N, *T, d_in]``, ``grad_output``
    ``[N, *T, d_out]`` (positions flattened to ``T``)."""
    (x,) = args
    n = x.shape[0]
    z = F.linear(x, module.weight, module.bias)
    d = (grad_output * gelu_grad(z)).reshape(n, -1, z.shape[-1])   # δ at the GELU's input
    a = x.reshape(n, -1, x.shape[-1])
    return {"weight": Factored(rows=d, cols=a), "bias": Dense(d.sum(1))}


if __name__ == "__main__":
    torch.manual_seed(0)
    model = nn.Sequential(LinearGelu(8, 16), nn.Linear(16, 3))
    x, y = torch.randn(32, 5, 8), torch.randint(0, 3, (32, 5))
    with gradnoise.capture(model, rules={LinearGelu: linear_gelu_rule}) as cap:
        F.cross_entropy(model(x).reshape(-1, 3), y.reshape(-1)).backward()
    print({k: f"{float(v.mean()):.4g}" for k, v in cap.per_sample_sq_norms.items()})
    print("B_simple:", cap.stats().b_simple)
