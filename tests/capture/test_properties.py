"""Properties ``gradnoise.capture`` must have whatever the layer (DESIGN.md §1, §4):
permuting the batch permutes the per-sample norms, scaling the loss by ``c`` scales the
variances by ``c²``, per-parameter statistics add up to the totals, ``.grad`` is what
plain autograd gives (also when gradients accumulate), and the capture leaves no hook
and no changed module behind, even when the step raises."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import gradnoise
import reference as R
from problems import BY_NAME, PROBLEMS, REDUCTIONS

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")

B = 5
# Problems whose sample dimension is easy to get wrong (batch on dim 1 inside the model,
# masks, shared weights, recurrent state) plus one plain case per layer family.
PERMUTATION_PROBLEMS = ["linear_mlp", "linear_seq", "conv2d_groups2", "embedding_padding_idx", "layernorm",
                        "mha_self_seq_first", "mha_key_padding_mask", "mha_cross_kdim_vdim",
                        "transformer_encoder_layer", "gru_2layer_h_n", "lstm", "bilinear", "learned_position",
                        "tied_embedding", "linear_twice", "frozen"]
problem_names = pytest.mark.parametrize("name", [p.name for p in PROBLEMS])


def captured(model, inputs, targets, loss_fn, reduction="mean", scale=1.0):
    """One captured step; returns the capture (the block is closed)."""
    with gradnoise.capture(model, reduction=reduction) as cap:
        loss = scale * loss_fn(R.call(model, inputs), targets)
        loss.backward()
    return cap


def norms_of(cap):
    return {n: v.detach().double().clone() for n, v in cap.per_sample_sq_norms.items()}


def close(a: float, b: float, scale: float, rel: float = 1e-9) -> bool:
    return abs(a - b) <= rel * (abs(b) + scale)


# ------------------------------------------------------------------------ permutation
@pytest.mark.parametrize("name", PERMUTATION_PROBLEMS)
def test_permuting_the_batch_permutes_the_norms(name):
    problem = BY_NAME[name]
    model, x, y = problem.build(B)
    perm = torch.tensor([3, 0, 4, 1, 2])
    loss_fn = problem.make_loss("mean")
    cap = captured(copy.deepcopy(model), x, y, loss_fn)
    cap_p = captured(copy.deepcopy(model), R.take(x, perm), y[perm], loss_fn)
    norms, norms_p = norms_of(cap), norms_of(cap_p)
    assert set(norms) == set(norms_p)
    for n in norms:
        assert not torch.allclose(norms[n], norms[n][perm]) or torch.allclose(norms[n], norms[n][0]), \
            f"{n}: the batch's norms are too alike for the test to see a permutation"
        torch.testing.assert_close(norms_p[n], norms[n][perm], rtol=1e-9, atol=1e-12 * float(norms[n].max()),
                                   msg=lambda m: f"{n}: {m}")
    s, s_p = cap.stats(), cap_p.stats()
    for field in ("trace_cov", "grad_sq_norm", "mean_sq_norm", "group_sq_norm"):
        assert close(getattr(s_p, field), getattr(s, field), s.group_sq_norm), field


# ------------------------------------------------------------------------ loss scaling
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", ["linear_mlp", "conv2d_stride2_pad1", "embedding_head", "groupnorm",
                                  "mha_self_batch_first", "gru", "tied_embedding", "prelu"])
def test_scaling_the_loss_scales_the_variances(name, reduction):
    """``c·l_i`` has per-sample gradients ``c·g_i``: norms, ``tr(Σ)`` and ``|G|²`` scale by
    ``c²`` and ``b_simple`` does not change."""
    c = 3.0
    problem = BY_NAME[name]
    model, x, y = problem.build(B)
    loss_fn = problem.make_loss(reduction)
    cap1 = captured(copy.deepcopy(model), x, y, loss_fn, reduction)
    cap3 = captured(copy.deepcopy(model), x, y, loss_fn, reduction, scale=c)
    n1, n3 = norms_of(cap1), norms_of(cap3)
    assert set(n1) == set(n3)
    for n in n1:
        torch.testing.assert_close(n3[n], c**2 * n1[n], rtol=1e-9, atol=1e-12 * float(n3[n].max()))
    pairs = [(cap1.stats(), cap3.stats(), "total")]
    by1, by3 = cap1.stats().by_param, cap3.stats().by_param
    pairs += [(by1[n], by3[n], n) for n in by1]
    for s1, s3, what in pairs:
        scale = s3.group_sq_norm
        assert close(s3.trace_cov, c**2 * s1.trace_cov, scale), f"{what} trace_cov"
        assert close(s3.grad_sq_norm, c**2 * s1.grad_sq_norm, scale), f"{what} grad_sq_norm"
        assert s3.flag == s1.flag, what
        if s1.flag is None:
            assert s3.b_simple == pytest.approx(s1.b_simple, rel=1e-6), f"{what} b_simple"


# -------------------------------------------------------------------------- additivity
@pytest.mark.parametrize("reduction", REDUCTIONS)
@problem_names
def test_per_param_stats_add_up_to_the_total(name, reduction):
    """``A`` and ``C`` add over parameter blocks, so every statistic does; and the totals
    are the capture's own per-sample norms and ``.grad`` put together."""
    problem = BY_NAME[name]
    model, x, y = problem.build(B)
    cap = captured(model, x, y, problem.make_loss(reduction), reduction)
    total, parts, norms = cap.stats(), cap.stats().by_param, norms_of(cap)
    assert set(parts) == set(norms) and parts, "stats().by_param and per_sample_sq_norms disagree"
    scale = total.group_sq_norm
    for field in ("trace_cov", "grad_sq_norm", "mean_sq_norm", "group_sq_norm"):
        summed = math.fsum(getattr(s, field) for s in parts.values())
        assert close(getattr(total, field), summed, scale), f"{field}: total {getattr(total, field)}, sum {summed}"
    # A = (1/B) Σ_i Σ_p ||g_i^p||², and C = Σ_p ||ḡ^p||² with ḡ = .grad (mean) or .grad/B (sum).
    assert close(total.group_sq_norm, float(sum(v.sum() for v in norms.values())) / B, scale)
    params = dict(model.named_parameters())
    per_grad = 1.0 if reduction == "mean" else 1.0 / B
    C = math.fsum(float((per_grad * params[n].grad).pow(2).sum()) for n in parts)
    assert close(total.mean_sq_norm, C, scale)


# ------------------------------------------------------------------------ .grad intact
@problem_names
def test_grads_accumulate_like_plain_autograd(name):
    """With ``.grad`` already holding a previous step, capture adds to it exactly as plain
    autograd does, and its statistics are those of its own step only."""
    problem = BY_NAME[name]
    model, x, y = problem.build(B)
    _, x0, y0 = problem.build(3, seed=1)  # an earlier micro-batch
    loss_fn = problem.make_loss("mean")
    plain, accum, fresh = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    for m in (plain, accum):
        loss_fn(R.call(m, x0), y0).backward()
    loss_fn(R.call(plain, x), y).backward()
    cap_accum = captured(accum, x, y, loss_fn)
    cap_fresh = captured(fresh, x, y, loss_fn)
    expect = dict(plain.named_parameters())
    for n, p in accum.named_parameters():
        if expect[n].grad is None:
            assert p.grad is None, n
        else:
            torch.testing.assert_close(p.grad, expect[n].grad, rtol=1e-9, atol=1e-12, msg=lambda m: f"{n}: {m}")
    a, f = cap_accum.stats(), cap_fresh.stats()
    for field in ("trace_cov", "grad_sq_norm", "mean_sq_norm", "group_sq_norm"):
        assert close(getattr(a, field), getattr(f, field), f.group_sq_norm), \
            f"{field} depends on gradients accumulated before the capture"


# --------------------------------------------------------------------- nothing left over
def _hook_state(model):
    """Every hook a capture could leave behind: module hooks, global module hooks, tensor
    hooks on the parameters, and torch-function or dispatch modes."""
    from torch.nn.modules import module as M

    modules = {
        name: tuple(len(getattr(m, attr, None) or {}) for attr in (
            "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
            "_state_dict_hooks", "_load_state_dict_pre_hooks"))
        for name, m in model.named_modules()
    }
    glob = tuple(len(getattr(M, attr, None) or {}) for attr in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks"))
    tensors = {n: (len(p._backward_hooks or {}), len(getattr(p, "_post_accumulate_grad_hooks", None) or {}))
               for n, p in model.named_parameters()}
    return modules, glob, tensors, _active_modes()


def _active_modes():
    """Torch-function and dispatch modes in force (a capture may route calls through one)."""
    from torch.overrides import _get_current_function_mode_stack
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return (tuple(type(m).__name__ for m in _get_current_function_mode_stack()),
            tuple(type(m).__name__ for m in _get_current_dispatch_mode_stack()))


def _structure(model):
    """Which module objects and parameter objects the model holds, under which names."""
    return ({n: (type(m), id(m)) for n, m in model.named_modules()},
            {n: (id(p), p.dtype, p.requires_grad) for n, p in model.named_parameters(remove_duplicate=False)})


@pytest.mark.parametrize("name", ["linear_mlp", "conv2d_same", "embedding_padding_idx", "rmsnorm",
                                  "mha_self_seq_first", "transformer_encoder_layer", "lstm", "param_matmul",
                                  "tied_embedding", "frozen", "unused_param"])
def test_capture_leaves_no_trace(name):
    problem = BY_NAME[name]
    model, x, y = problem.build(B)
    loss_fn = problem.make_loss("mean")
    hooks, structure = _hook_state(model), _structure(model)
    first = norms_of(captured(model, x, y, loss_fn))
    assert _hook_state(model) == hooks and _structure(model) == structure
    # A plain step after the capture is unaffected.
    model.zero_grad(set_to_none=True)
    twin = copy.deepcopy(model)
    loss_fn(R.call(model, x), y).backward()
    loss_fn(R.call(twin, x), y).backward()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), n
    # A second capture of the same model gives the same norms (no stale state).
    model.zero_grad(set_to_none=True)
    second = norms_of(captured(model, x, y, loss_fn))
    assert set(second) == set(first)
    for n in first:
        torch.testing.assert_close(second[n], first[n], rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["linear_mlp", "mha_key_padding_mask", "gru"])
def test_hooks_are_removed_when_the_step_raises(name):
    problem = BY_NAME[name]
    model, x, y = problem.build(B)
    hooks, structure = _hook_state(model), _structure(model)

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with gradnoise.capture(model, reduction="mean"):
            problem.make_loss("mean")(R.call(model, x), y).backward()
            raise Boom
    assert _hook_state(model) == hooks and _structure(model) == structure
    with pytest.raises(Boom):
        with gradnoise.capture(model, reduction="mean"):
            R.call(model, x)
            raise Boom  # before any backward
    assert _hook_state(model) == hooks and _structure(model) == structure
