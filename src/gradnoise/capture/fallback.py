"""The torch.func fallback: per-sample gradients of any module that owns parameters.

For a module ``m`` with own parameters ``θ`` called as ``y = m(x)`` on a batch, and the
output gradient ``δ = ∂L/∂y``, the per-sample gradient of sample ``n`` is the
vector–Jacobian product of the module applied to that sample alone::

    g_n = (∂ m(x_n; θ) / ∂θ)ᵀ δ_n

computed with ``vmap`` over samples of ``vjp`` of ``functional_call`` (one batched
recomputation of the module). When vmap cannot run the module (some in-place or
RNN kernels have no batching rule), a loop over samples does the same, exactly, at the
cost of ``N`` small calls. Either way the recomputed outputs are compared with the real
ones: a mismatch means the module mixes samples or draws random numbers (dropout), and
raises instead of returning a wrong gradient.

Sample dimensions: dim 0 for every tensor argument and output whose size there is the
batch size ``N``, except recurrent layers (``nn.RNN``/``GRU``/``LSTM``), whose hidden
states carry the batch on dim 1 (and the sequence too unless ``batch_first``).
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import MICROBATCH_RECIPE, FallbackError, SampleMixingError


def per_sample_grads(module: nn.Module, args: tuple, kwargs: dict, output: Any, grad_output: Any) -> Dict[str, torch.Tensor]:
    """Per-sample gradients ``{name: [N, *shape]}`` of ``module``'s own parameters."""
    own = {k: p for k, p in module.named_parameters(recurse=False) if p.requires_grad}
    fixed = {k: v.detach() for k, v in _params_and_buffers(module) if k not in own}
    flat_args, args_spec = tree_flatten((args, kwargs))
    flat_out, _ = tree_flatten(output)
    flat_grad = [g if g is not None else (torch.zeros_like(o) if isinstance(o, torch.Tensor) else None)
                 for g, o in zip(tree_flatten(grad_output, is_leaf=lambda x: x is None)[0], flat_out)]
    n, in_dims, out_dims = _sample_dims(module, flat_args, flat_out)
    out_pos = [i for i, o in enumerate(flat_out) if isinstance(o, torch.Tensor) and o.is_floating_point()]
    tensor_pos = [i for i, d in enumerate(in_dims) if d is not None]

    def call(params, xs: List[torch.Tensor]):
        vals = list(flat_args)
        for i, x in zip(tensor_pos, xs):
            vals[i] = x.unsqueeze(in_dims[i])
        a, kw = tree_unflatten(vals, args_spec)
        out, _ = tree_flatten(functional_call(module, {**fixed, **params}, tuple(a), kw))
        return tuple(out[i].squeeze(out_dims[i]) for i in out_pos)

    primals = {k: p.detach() for k, p in own.items()}
    xs = [flat_args[i] for i in tensor_pos]
    ds = [flat_grad[i] for i in out_pos]
    try:
        grads, outs = _vmapped(call, primals, xs, ds, [in_dims[i] for i in tensor_pos], [out_dims[i] for i in out_pos])
    except (SampleMixingError, FallbackError):
        raise
    except Exception as vmap_error:  # no batching rule: loop over samples instead
        try:
            grads, outs = _looped(call, primals, xs, ds, [in_dims[i] for i in tensor_pos], [out_dims[i] for i in out_pos], n)
        except Exception as loop_error:
            raise FallbackError(
                f"the torch.func fallback could not compute per-sample gradients of "
                f"{type(module).__name__}: vmap failed ({vmap_error}); a per-sample loop "
                f"failed too ({loop_error}). Register a rule for it: "
                "gradnoise.capture(model, rules={%s: rule})" % type(module).__name__
            ) from loop_error
    _check_reproduced(module, [flat_out[i] for i in out_pos], outs, [out_dims[i] for i in out_pos])
    return grads


def _vmapped(call, primals, xs, ds, in_dims, out_dims) -> Tuple[Dict[str, torch.Tensor], List[torch.Tensor]]:
    def one(xs_n, ds_n):
        outs, pull = vjp(lambda p: call(p, xs_n), primals)
        return pull(tuple(ds_n))[0], outs

    with warnings.catch_warnings():  # vmap's "no batching rule, performance drop" notes
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        grads, outs = vmap(one, in_dims=(in_dims, out_dims), out_dims=(0, 0), randomness="error")(xs, ds)
    return grads, list(outs)


def _looped(call, primals, xs, ds, in_dims, out_dims, n) -> Tuple[Dict[str, torch.Tensor], List[torch.Tensor]]:
    per: Dict[str, List[torch.Tensor]] = {k: [] for k in primals}
    outs: List[List[torch.Tensor]] = [[] for _ in ds]
    params = {k: v.clone().requires_grad_(True) for k, v in primals.items()}
    for i in range(n):
        o = call(params, [x.select(d, i) for x, d in zip(xs, in_dims)])
        g = torch.autograd.grad(o, list(params.values()), [d.select(od, i) for d, od in zip(ds, out_dims)], allow_unused=True)
        for (k, p), gk in zip(params.items(), g):
            per[k].append(torch.zeros_like(p) if gk is None else gk)
        for j, oj in enumerate(o):
            outs[j].append(oj.detach())
    return {k: torch.stack(v) for k, v in per.items()}, [torch.stack(o) for o in outs]


def _check_reproduced(module, real: List[torch.Tensor], redone: List[torch.Tensor], out_dims) -> None:
    for r, o, d in zip(real, redone, out_dims):
        r = r.detach().movedim(d, 0)
        o = o.detach().to(r.dtype)
        tol = 1e-3 if r.dtype in (torch.float16, torch.bfloat16) else 1e-4
        scale = float(r.abs().max()) if r.numel() else 0.0
        if r.shape != o.shape or not torch.allclose(o, r, rtol=tol, atol=tol * scale + 1e-6):
            raise SampleMixingError(
                f"{type(module).__name__} gives a different output for a sample alone than "
                "inside the batch: it mixes samples or draws random numbers (dropout in "
                "training mode), so its per-sample gradients cannot be computed. Use it "
                f"in eval mode, or {MICROBATCH_RECIPE}."
            )


def _params_and_buffers(module: nn.Module):
    yield from module.named_parameters()
    yield from module.named_buffers()


def _sample_dims(module, flat_args, flat_out) -> Tuple[int, List[Optional[int]], List[Optional[int]]]:
    """Batch size and the sample dimension of every flattened input and output."""
    if isinstance(module, nn.RNNBase):
        return _rnn_dims(module, flat_args, flat_out)
    tensors = [a for a in flat_args if isinstance(a, torch.Tensor) and a.dim() > 0]
    if not tensors:
        raise FallbackError(f"{type(module).__name__} was called without a batched tensor input")
    n = tensors[0].shape[0]
    in_dims = [0 if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == n else None for a in flat_args]
    out_dims = []
    for o in flat_out:
        if isinstance(o, torch.Tensor) and o.is_floating_point():
            if o.dim() == 0 or o.shape[0] != n:
                raise FallbackError(
                    f"{type(module).__name__} returned an output of shape {tuple(o.shape)} "
                    f"whose first dimension is not the batch size {n}; register a rule for it"
                )
            out_dims.append(0)
        else:
            out_dims.append(None)
    return n, in_dims, out_dims


def _rnn_dims(module: nn.RNNBase, flat_args, flat_out):
    x = flat_args[0]
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise FallbackError(
            f"{type(module).__name__}: per-sample gradients need a batched 3-D input "
            "(packed sequences are not supported)"
        )
    seq_dim = 0 if module.batch_first else 1
    n = x.shape[seq_dim]
    in_dims = [seq_dim] + [1 if isinstance(a, torch.Tensor) else None for a in flat_args[1:]]
    out_dims = [seq_dim] + [1 if isinstance(o, torch.Tensor) else None for o in flat_out[1:]]
    return n, in_dims, out_dims
