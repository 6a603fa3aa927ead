"""The brute-force float64 oracle every estimator is checked against (DESIGN.md §1).

Nothing here imports ``gradnoise``: the per-sample gradients come from one autograd
call per sample on a float64 copy of the model, and the noise statistics are written
out from the formulas of DESIGN.md §1, so the oracle is independent of the engine.

Conventions:
    * A *batch* is ``inputs`` (a tensor, or a tuple of tensors, all with the samples on
      dim 0) and ``targets`` (a tensor with the samples on dim 0).
    * ``loss_fn(model(*inputs), targets)`` on a batch of one sample is that sample's loss
      ``l_i`` (for a sequence model whose loss is a mean over tokens, the sequence's mean).
    * Per-sample gradients ``g_i = ∇ l_i`` are never scaled by ``1/B``.
    * Parameter names are those ``model.named_parameters()`` yields (a tied parameter
      appears once, under its first name). Frozen parameters (``requires_grad=False``)
      and parameters no sample's loss depends on are left out.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

Inputs = Union[Tensor, Tuple[Tensor, ...]]
LossFn = Callable[[Tensor, Tensor], Tensor]

FLAG_SINGLE_GROUP = "single_group"
FLAG_NONPOSITIVE = "grad_sq_norm_nonpositive"


# ----------------------------------------------------------------------------- batches
def as_tuple(inputs: Inputs) -> Tuple[Tensor, ...]:
    """``inputs`` as a tuple of tensors."""
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def batch_size(inputs: Inputs) -> int:
    """``B``: the common size of dim 0 of every input tensor."""
    sizes = {t.shape[0] for t in as_tuple(inputs)}
    if len(sizes) != 1:
        raise ValueError(f"inputs disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()


def cast_floating(x: Inputs, dtype: torch.dtype) -> Inputs:
    """Casts the floating tensors of ``x`` to ``dtype``; integer and bool tensors are kept."""

    def cast(t: Tensor) -> Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    if isinstance(x, (tuple, list)):
        return tuple(cast(t) for t in x)
    return cast(x)


def take(x: Inputs, index: Union[slice, Tensor]) -> Inputs:
    """Selects samples (dim 0) of every tensor of ``x``."""
    if isinstance(x, (tuple, list)):
        return tuple(t[index] for t in x)
    return x[index]


def call(model: nn.Module, inputs: Inputs) -> Tensor:
    """``model(*inputs)`` for a tuple, ``model(inputs)`` for a tensor."""
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def to_float64(model: nn.Module) -> nn.Module:
    """A float64 deep copy of ``model`` (ties and ``requires_grad`` flags are kept)."""
    return copy.deepcopy(model).double()


# ---------------------------------------------------------------- per-sample gradients
def per_sample_grads(
    model: nn.Module, loss_fn: LossFn, inputs: Inputs, targets: Tensor
) -> Dict[str, Tensor]:
    """Per-sample gradients by one autograd call per sample, in float64.

    Args:
        model: any module; it is deep-copied and cast to float64, never modified.
        loss_fn: ``loss_fn(output, targets)``; on a batch of one it must be ``l_i``.
        inputs: a tensor or a tuple of tensors, samples on dim 0.
        targets: samples on dim 0.

    Returns:
        ``{name: Tensor[B, *param.shape]}`` (float64) with ``g_i = ∇ l_i``, for every
        trainable parameter that at least one sample's loss depends on. A sample whose
        loss does not reach a parameter contributes zeros.
    """
    model64 = to_float64(model)
    inputs64 = cast_floating(inputs, torch.float64)
    targets64 = cast_floating(targets, torch.float64)
    named = [(n, p) for n, p in model64.named_parameters() if p.requires_grad]
    B = batch_size(inputs64)
    rows: Dict[str, list] = {n: [None] * B for n, _ in named}
    for i in range(B):
        loss = loss_fn(call(model64, take(inputs64, slice(i, i + 1))), targets64[i : i + 1])
        if loss.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        for (n, _), g in zip(named, grads):
            rows[n][i] = g
    out: Dict[str, Tensor] = {}
    for n, p in named:
        if all(g is None for g in rows[n]):
            continue
        out[n] = torch.stack([torch.zeros_like(p) if g is None else g for g in rows[n]])
    return out


def sq_norms(grads: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """``{name: Tensor[B]}`` with ``||g_i||²`` restricted to each parameter."""
    return {n: g.flatten(1).pow(2).sum(1) for n, g in grads.items()}


def per_sample_sq_norms(
    model: nn.Module, loss_fn: LossFn, inputs: Inputs, targets: Tensor
) -> Dict[str, Tensor]:
    """``{name: Tensor[B]}`` (float64): per-sample squared gradient norms, not scaled by 1/B."""
    return sq_norms(per_sample_grads(model, loss_fn, inputs, targets))


def mean_grad(
    model: nn.Module, loss_fn: LossFn, inputs: Inputs, targets: Tensor
) -> Dict[str, Tensor]:
    """``{name: ḡ}`` with ``ḡ = (1/B) Σ_i g_i`` (float64): the gradient of the mean loss."""
    return {n: g.mean(0) for n, g in per_sample_grads(model, loss_fn, inputs, targets).items()}


# -------------------------------------------------------------------- noise statistics
@dataclass(frozen=True)
class RefStats:
    """The oracle's statistics of one parameter block (or the whole model).

    Same meaning as DESIGN.md §1: ``trace_cov`` unbiased ``tr(Σ)``, ``grad_sq_norm``
    unbiased ``|G|²``, ``b_simple = trace_cov / grad_sq_norm``,
    ``mean_sq_norm = C = ||ḡ||²``, ``group_sq_norm = A = Σ_j (b_j/B)||g⁽ʲ⁾||²``.
    Undefined values are NaN and ``flag`` says why.
    """

    batch_size: int
    n_groups: int
    trace_cov: float
    grad_sq_norm: float
    b_simple: float
    mean_sq_norm: float
    group_sq_norm: float
    flag: Optional[str]


@dataclass(frozen=True)
class RefNoise:
    """Statistics of the whole model (``total``) and of each parameter (``by_param``)."""

    total: RefStats
    by_param: Dict[str, RefStats]


def _flat(grads: Mapping[str, Tensor]) -> Tensor:
    """``[B, D]``: every parameter's per-sample gradient flattened and concatenated."""
    return torch.cat([g.flatten(1).double() for g in grads.values()], dim=1)


def _group_stats(flat: Tensor, group_sizes: Sequence[int]) -> RefStats:
    """Statistics of ``flat`` (``[B, D]`` per-sample gradients) split into consecutive groups.

    Written as a weighted spread of the group means around the batch mean::

        trace_cov    = Σ_j b_j ||g⁽ʲ⁾ − ḡ||² / (k − 1)
        grad_sq_norm = ||ḡ||² − trace_cov / B

    which equals DESIGN.md's ``B (A − C)/(k − 1)`` because ``Σ_j (b_j/B) g⁽ʲ⁾ = ḡ``.
    """
    sizes = [int(b) for b in group_sizes]
    B, k = flat.shape[0], len(sizes)
    if sum(sizes) != B or any(b <= 0 for b in sizes):
        raise ValueError(f"group sizes {sizes} do not split a batch of {B}")
    groups = torch.split(flat, sizes, dim=0)
    means = torch.stack([g.mean(0) for g in groups])  # [k, D]
    weights = torch.tensor(sizes, dtype=flat.dtype)
    gbar = flat.mean(0)
    C = float(gbar.pow(2).sum())
    A = float((weights * means.pow(2).sum(1)).sum() / B)
    nan = math.nan
    if k < 2:
        return RefStats(B, k, nan, nan, nan, C, A, FLAG_SINGLE_GROUP)
    trace_cov = float((weights * (means - gbar).pow(2).sum(1)).sum() / (k - 1))
    grad_sq_norm = C - trace_cov / B
    if grad_sq_norm <= 0:
        return RefStats(B, k, trace_cov, grad_sq_norm, nan, C, A, FLAG_NONPOSITIVE)
    return RefStats(B, k, trace_cov, grad_sq_norm, trace_cov / grad_sq_norm, C, A, None)


def group_noise_stats(grads: Mapping[str, Tensor], group_sizes: Sequence[int]) -> RefNoise:
    """Oracle statistics when the batch is split into consecutive groups of ``group_sizes``.

    Args:
        grads: ``{name: Tensor[B, *shape]}`` per-sample gradients (from
            :func:`per_sample_grads`).
        group_sizes: ``b_j`` with ``Σ_j b_j = B``, the groups taken in batch order.
    """
    if not grads:
        raise ValueError("no parameter has a gradient")
    by_param = {n: _group_stats(g.flatten(1).double(), group_sizes) for n, g in grads.items()}
    return RefNoise(_group_stats(_flat(grads), group_sizes), by_param)


def noise_stats(grads: Mapping[str, Tensor]) -> RefNoise:
    """Oracle per-sample statistics (``k = B``, ``b_j = 1``)::

        trace_cov = Σ_i ||g_i − ḡ||² / (B − 1),   grad_sq_norm = ||ḡ||² − trace_cov / B

    Args:
        grads: ``{name: Tensor[B, *shape]}`` per-sample gradients.
    """
    B = next(iter(grads.values())).shape[0] if grads else 0
    return group_noise_stats(grads, [1] * B)


def population_stats(grads: Mapping[str, Tensor]) -> Tuple[float, float]:
    """Exact ``(tr(Σ), |G|²)`` of a finite data set whose per-sample gradients are ``grads``.

    ``G = (1/N) Σ_i g_i`` and ``tr(Σ) = (1/N) Σ_i ||g_i − G||²`` (divisor ``N``: the
    covariance of one draw, with replacement, from the ``N`` samples).
    """
    flat = _flat(grads)
    G = flat.mean(0)
    return float((flat - G).pow(2).sum(1).mean()), float(G.pow(2).sum())


def _weighted_group_stats(flat: Tensor, group_sizes: Sequence[int], weights: Sequence[float]) -> RefStats:
    """Statistics of ``flat`` (``[B, D]``) split into consecutive groups whose means are
    combined with the weights ``w_j`` (``Σ w_j = 1``) instead of ``b_j/B``.

    From the definitions, for i.i.d. samples with mean ``G`` and covariance ``Σ``::

        E||g⁽ʲ⁾||² = |G|² + tr(Σ)/b_j
        A = Σ_j (b_j/B)||g⁽ʲ⁾||²      E[A] = |G|² + tr(Σ)·k/B
        U = ||Σ_j w_j g⁽ʲ⁾||²         E[U] = |G|² + tr(Σ)·f,   f = Σ_j w_j²/b_j

    and the two linear equations are solved for ``(|G|², tr(Σ))`` by Cramer's rule.
    ``mean_sq_norm`` holds ``U``.
    """
    sizes = [int(b) for b in group_sizes]
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    B, k = flat.shape[0], len(sizes)
    if sum(sizes) != B or any(b <= 0 for b in sizes):
        raise ValueError(f"group sizes {sizes} do not split a batch of {B}")
    if w.numel() != k:
        raise ValueError(f"{w.numel()} weights for {k} groups")
    if abs(float(w.sum()) - 1.0) > 1e-12:
        raise ValueError(f"weights must sum to 1, got {float(w.sum())}")
    b = torch.tensor(sizes, dtype=torch.float64)
    means = torch.stack([g.mean(0) for g in torch.split(flat.double(), sizes, dim=0)])  # [k, D]
    A = float((b / B * means.pow(2).sum(1)).sum())
    U = float((w[:, None] * means).sum(0).pow(2).sum())
    nan = math.nan
    if k < 2:
        return RefStats(B, k, nan, nan, nan, U, A, FLAG_SINGLE_GROUP)
    # [[1, k/B], [1, f]] @ [|G|², tr] = [A, U]
    f = float((w.pow(2) / b).sum())
    det = f - k / B
    if det == 0:
        raise ValueError("these weights make |G|² and tr(Σ) unidentifiable (Σ w_j²/b_j = k/B)")
    trace_cov = (U - A) / det
    grad_sq_norm = (A * f - U * k / B) / det
    if grad_sq_norm <= 0:
        return RefStats(B, k, trace_cov, grad_sq_norm, nan, U, A, FLAG_NONPOSITIVE)
    return RefStats(B, k, trace_cov, grad_sq_norm, trace_cov / grad_sq_norm, U, A, None)


def weighted_group_noise_stats(
    grads: Mapping[str, Tensor], group_sizes: Sequence[int], weights: Sequence[float]
) -> RefNoise:
    """Oracle statistics of consecutive groups whose means are combined with ``weights``.

    The case of DistributedDataParallel, which averages its ranks' gradients with equal
    weights ``w_j = 1/R`` whatever their sample counts. With ``w_j = b_j/B`` it equals
    :func:`group_noise_stats`.

    Args:
        grads: ``{name: Tensor[B, *shape]}`` per-sample gradients.
        group_sizes: ``b_j`` with ``Σ_j b_j = B``, the groups taken in batch order.
        weights: ``w_j``, one per group, ``Σ_j w_j = 1``.
    """
    if not grads:
        raise ValueError("no parameter has a gradient")
    by_param = {
        n: _weighted_group_stats(g.flatten(1).double(), group_sizes, weights) for n, g in grads.items()
    }
    return RefNoise(_weighted_group_stats(_flat(grads), group_sizes, weights), by_param)


def client_population_stats(
    client_grads: Sequence[Tensor], weights: Optional[Sequence[float]] = None
) -> Dict[str, float]:
    """Exact within/between split of finite clients' per-sample gradients (DESIGN.md §1).

    Client ``k`` holds the rows of ``client_grads[k]`` (``[N_k, D]``); the pooled data is
    the mixture that picks client ``k`` with probability ``w_k`` (default ``N_k/ΣN``) and
    then one of its rows uniformly. Every term is written from its definition, with
    population covariances (divisor ``N_k``)::

        ∇F_k = mean of client k's rows,   ∇f = Σ_k w_k ∇F_k
        within  = Σ_k w_k (1/N_k) Σ_i ||g_ki − ∇F_k||²
        between = Σ_k w_k ||∇F_k − ∇f||²
        total   = Σ_k w_k (1/N_k) Σ_i ||g_ki − ∇f||²        (no law of total variance used)
        B²      = Σ_k w_k ||∇F_k||² / ||∇f||²

    Returns ``{"within", "between", "total", "grad_sq_norm", "dissimilarity_sq"}``.
    """
    gs = [g.double().flatten(1) for g in client_grads]
    sizes = [g.shape[0] for g in gs]
    w = [s / sum(sizes) for s in sizes] if weights is None else [float(x) for x in weights]
    means = [g.mean(0) for g in gs]
    F = sum(wk * m for wk, m in zip(w, means))
    within = math.fsum(wk * float((g - m).pow(2).sum(1).mean()) for wk, g, m in zip(w, gs, means))
    between = math.fsum(wk * float((m - F).pow(2).sum()) for wk, m in zip(w, means))
    total = math.fsum(wk * float((g - F).pow(2).sum(1).mean()) for wk, g in zip(w, gs))
    g2 = float(F.pow(2).sum())
    B2 = math.fsum(wk * float(m.pow(2).sum()) for wk, m in zip(w, means)) / g2
    return {"within": within, "between": between, "total": total, "grad_sq_norm": g2, "dissimilarity_sq": B2}


def preconditioned_stats(grads: Mapping[str, Tensor], weights: Mapping[str, float]) -> RefNoise:
    """Oracle statistics of the per-sample gradients scaled tensor by tensor by ``√w_p``
    (Adam's preconditioner with one weight ``w_p = mean P²`` per tensor): ``trace_cov =
    Σ_p w_p tr Σ_p``, ``grad_sq_norm = Σ_p w_p |G_p|²``; tensors without a weight left out."""
    return noise_stats({n: g.double() * math.sqrt(weights[n]) for n, g in grads.items() if n in weights})


def adam_weights(optimizer: "torch.optim.Optimizer", names: Mapping[Tensor, str]) -> Dict[str, float]:
    """``w_p = mean_j 1/(√(v_j/(1 − β₂^t)) + ε)²`` of every tensor with Adam state, element by
    element in float64 (the whole tensor, no subset)."""
    out = {}
    for group in optimizer.param_groups:
        beta2, eps = group["betas"][1], group["eps"]
        for p in group["params"]:
            st = optimizer.state.get(p)
            if st and "exp_avg_sq" in st:
                v = st["exp_avg_sq"].double() / (1 - beta2 ** float(st["step"]))
                out[names[p]] = float((1 / (v.sqrt() + eps)).pow(2).mean())
    return out
