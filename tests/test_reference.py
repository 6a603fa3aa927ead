"""Tests of the oracle itself (tests/reference.py) and of the problem table, so that
neither is trusted blindly: hand-computed cases, the sum of per-sample gradients
against autograd, sample independence of every model, and torch.func as a second,
independent per-sample method."""
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import reference as R
from problems import BY_NAME, PROBLEMS, REDUCTIONS, mse

pytestmark = [pytest.mark.filterwarnings("ignore:Using padding='same'"),
              pytest.mark.filterwarnings("ignore:There is a performance drop")]


# ------------------------------------------------------------------- hand-computed case
def _hand_model() -> nn.Linear:
    """Linear 2 -> 1 with W = [[1, 2]], b = [0.5]."""
    lin = nn.Linear(2, 1).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0]]))
        lin.bias.copy_(torch.tensor([0.5]))
    return lin


# x1 = [1, 0], y1 = 0: out 1.5, dl/dout = 2·1.5 = 3 -> g_W = [3, 0], g_b = 3
# x2 = [1, 1], y2 = 0: out 3.5, dl/dout = 2·3.5 = 7 -> g_W = [7, 7], g_b = 7
HAND_X = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
HAND_Y = torch.tensor([[0.0], [0.0]], dtype=torch.float64)


def test_hand_per_sample_grads_and_norms():
    grads = R.per_sample_grads(_hand_model(), mse("mean"), HAND_X, HAND_Y)
    assert set(grads) == {"weight", "bias"}
    torch.testing.assert_close(grads["weight"], torch.tensor([[[3.0, 0.0]], [[7.0, 7.0]]], dtype=torch.float64))
    torch.testing.assert_close(grads["bias"], torch.tensor([[3.0], [7.0]], dtype=torch.float64))
    norms = R.sq_norms(grads)
    torch.testing.assert_close(norms["weight"], torch.tensor([9.0, 98.0], dtype=torch.float64))
    torch.testing.assert_close(norms["bias"], torch.tensor([9.0, 49.0], dtype=torch.float64))
    mean = R.mean_grad(_hand_model(), mse("mean"), HAND_X, HAND_Y)
    torch.testing.assert_close(mean["weight"], torch.tensor([[5.0, 3.5]], dtype=torch.float64))
    torch.testing.assert_close(mean["bias"], torch.tensor([5.0], dtype=torch.float64))


def test_hand_noise_stats():
    # ḡ_W = [5, 3.5]: C_W = 37.25, tr_W = (9 + 98 − 2·37.25)/1 = 32.5, |G_W|² = 37.25 − 32.5/2 = 21
    # ḡ_b = 5:        C_b = 25,    tr_b = (9 + 49 − 2·25)/1 = 8,        |G_b|² = 25 − 8/2 = 21
    ref = R.noise_stats(R.per_sample_grads(_hand_model(), mse("mean"), HAND_X, HAND_Y))
    expect = {"weight": (32.5, 21.0, 37.25, 53.5), "bias": (8.0, 21.0, 25.0, 29.0)}
    for name, (tr, g2, C, A) in expect.items():
        s = ref.by_param[name]
        assert (s.batch_size, s.n_groups, s.flag) == (2, 2, None)
        assert s.trace_cov == pytest.approx(tr, rel=1e-12)
        assert s.grad_sq_norm == pytest.approx(g2, rel=1e-12)
        assert s.mean_sq_norm == pytest.approx(C, rel=1e-12)
        assert s.group_sq_norm == pytest.approx(A, rel=1e-12)
        assert s.b_simple == pytest.approx(tr / g2, rel=1e-12)
    t = ref.total
    assert t.trace_cov == pytest.approx(40.5, rel=1e-12)
    assert t.grad_sq_norm == pytest.approx(42.0, rel=1e-12)
    assert t.b_simple == pytest.approx(40.5 / 42.0, rel=1e-12)


def test_hand_group_stats():
    # Scalar per-sample gradients 1, 2, 4 in groups [1], [2, 4]: group means 1 and 3,
    # ḡ = 7/3, A = (1/3)·1 + (2/3)·9 = 19/3, C = 49/9, tr = 3(A − C)/(2 − 1) = 8/3,
    # |G|² = 49/9 − (8/3)/3 = 41/9.
    grads = {"w": torch.tensor([[1.0], [2.0], [4.0]], dtype=torch.float64)}
    s = R.group_noise_stats(grads, [1, 2]).total
    assert (s.batch_size, s.n_groups, s.flag) == (3, 2, None)
    assert s.group_sq_norm == pytest.approx(19 / 3, rel=1e-12)
    assert s.mean_sq_norm == pytest.approx(49 / 9, rel=1e-12)
    assert s.trace_cov == pytest.approx(8 / 3, rel=1e-12)
    assert s.grad_sq_norm == pytest.approx(41 / 9, rel=1e-12)
    # Per-sample: Σ(g_i − 7/3)² = (16 + 1 + 25)/9, tr = 42/9/2 = 7/3, |G|² = 49/9 − 7/9 = 14/3.
    p = R.noise_stats(grads).total
    assert p.n_groups == 3
    assert p.trace_cov == pytest.approx(7 / 3, rel=1e-12)
    assert p.grad_sq_norm == pytest.approx(14 / 3, rel=1e-12)


def test_flags():
    one = R.noise_stats({"w": torch.tensor([[2.0, 1.0]], dtype=torch.float64)}).total
    assert one.flag == R.FLAG_SINGLE_GROUP
    assert math.isnan(one.trace_cov) and math.isnan(one.b_simple)
    assert one.mean_sq_norm == pytest.approx(5.0)
    # Opposite gradients: ḡ = 0, so |G|² = −tr/B < 0.
    opposed = R.noise_stats({"w": torch.tensor([[1.0], [-1.0]], dtype=torch.float64)}).total
    assert opposed.flag == R.FLAG_NONPOSITIVE
    assert opposed.trace_cov == pytest.approx(2.0) and opposed.grad_sq_norm == pytest.approx(-1.0)
    assert math.isnan(opposed.b_simple)
    single = R.group_noise_stats({"w": torch.ones(4, 2, dtype=torch.float64)}, [4]).total
    assert single.flag == R.FLAG_SINGLE_GROUP


def test_population_stats_hand():
    # g = 0, 2, 4 (scalars): G = 2, tr = (4 + 0 + 4)/3 = 8/3.
    tr, g2 = R.population_stats({"w": torch.tensor([[0.0], [2.0], [4.0]], dtype=torch.float64)})
    assert tr == pytest.approx(8 / 3, rel=1e-12) and g2 == pytest.approx(4.0, rel=1e-12)


def test_groups_of_one_equal_per_sample_and_totals_add_up():
    torch.manual_seed(0)
    grads = {"a": torch.randn(6, 3, 2, dtype=torch.float64), "b": torch.randn(6, 4, dtype=torch.float64) + 1}
    per_sample, groups = R.noise_stats(grads), R.group_noise_stats(grads, [1] * 6)
    assert per_sample == groups
    uneven = R.group_noise_stats(grads, [1, 2, 3])
    for ref in (per_sample, uneven):
        for field in ("trace_cov", "grad_sq_norm", "mean_sq_norm", "group_sq_norm"):
            parts = sum(getattr(s, field) for s in ref.by_param.values())
            assert getattr(ref.total, field) == pytest.approx(parts, rel=1e-12)
    with pytest.raises(ValueError):
        R.group_noise_stats(grads, [2, 2])


# --------------------------------------------------------------- oracle on the table
@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.name)
def test_model_is_sample_independent(problem):
    """Each sample's output depends on that sample only (else per-sample losses are ill defined)."""
    model, x, _ = problem.build(4)
    full = R.call(model, x)
    parts = torch.cat([R.call(model, R.take(x, slice(i, i + 1))) for i in range(4)])
    torch.testing.assert_close(full, parts, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.name)
def test_losses_agree_on_per_sample_loss(problem):
    """``sum`` is ``B`` times ``mean`` on a batch, and both are ``l_i`` on a single sample."""
    model, x, y = problem.build(3)
    out = R.call(model, x)
    mean, total = problem.make_loss("mean")(out, y), problem.make_loss("sum")(out, y)
    torch.testing.assert_close(total, 3 * mean, rtol=1e-12, atol=0)
    singles = [problem.make_loss("mean")(out[i : i + 1], y[i : i + 1]) for i in range(3)]
    torch.testing.assert_close(total, sum(singles), rtol=1e-12, atol=0)
    for i in range(3):
        torch.testing.assert_close(problem.make_loss("sum")(out[i : i + 1], y[i : i + 1]), singles[i])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.name)
def test_per_sample_grads_sum_to_autograd(problem, reduction):
    """``Σ_i g_i`` (sum) or ``(1/B) Σ_i g_i`` (mean) is what autograd gives for the batch loss."""
    model, x, y = problem.build(5)
    grads = R.per_sample_grads(model, problem.make_loss("mean"), x, y)
    problem.make_loss(reduction)(R.call(model, x), y).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == {n for n, p in trainable.items() if p.grad is not None}
    for name, g in grads.items():
        assert g.dtype == torch.float64 and g.shape == (5, *trainable[name].shape)
        expect = g.sum(0) if reduction == "sum" else g.mean(0)
        torch.testing.assert_close(trainable[name].grad, expect, rtol=1e-9, atol=1e-12)


def test_oracle_leaves_model_alone_and_casts_only_floats():
    model, x, y = BY_NAME["tied_embedding"].build(3, torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = R.per_sample_grads(model, BY_NAME["tied_embedding"].make_loss("mean"), x, y)
    assert all(p.grad is None and p.dtype == torch.float32 for p in model.parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    assert x.dtype == torch.long
    assert set(grads) == {"emb.weight", "mid.weight", "mid.bias"}  # the tie appears once
    copy64 = R.to_float64(model)
    assert copy64.lm_head.weight is copy64.emb.weight


def test_frozen_and_unused_are_left_out():
    for name, expect in [("frozen", {"0.bias", "2.weight"}), ("unused_param", {"used.weight", "used.bias"})]:
        model, x, y = BY_NAME[name].build(2)
        assert set(R.per_sample_grads(model, BY_NAME[name].make_loss("mean"), x, y)) == expect


def test_tied_gradient_has_cross_terms():
    """The tied weight's per-sample gradient is the sum over its two uses, and its squared
    norm differs from the sum of the two uses' squared norms."""
    problem = BY_NAME["tied_embedding"]
    model, x, y = problem.build(3)
    tied = R.per_sample_sq_norms(model, problem.make_loss("mean"), x, y)["emb.weight"]
    untied = R.to_float64(model)
    untied.lm_head.weight = nn.Parameter(untied.emb.weight.detach().clone())
    parts = R.per_sample_grads(untied, problem.make_loss("mean"), x, y)
    both = parts["emb.weight"] + parts["lm_head.weight"]
    torch.testing.assert_close(tied, both.flatten(1).pow(2).sum(1), rtol=1e-9, atol=1e-12)
    separate = parts["emb.weight"].flatten(1).pow(2).sum(1) + parts["lm_head.weight"].flatten(1).pow(2).sum(1)
    assert not torch.allclose(tied, separate, rtol=1e-3)


# Problems where torch.func's vmap over samples works with stock modules.
FUNC_PROBLEMS = ["linear_mlp", "linear_seq", "conv2d_groups2", "conv2d_stride2_pad1", "conv_transpose2d",
                 "embedding_padding_idx", "layernorm", "groupnorm", "rmsnorm", "prelu", "bilinear",
                 "learned_position", "param_matmul", "tied_embedding", "linear_twice", "mha_self_batch_first"]


@pytest.mark.parametrize("name", FUNC_PROBLEMS)
def test_oracle_matches_torch_func(name):
    """A second, independent per-sample method: vmap over samples of the gradient."""
    problem = BY_NAME[name]
    model, x, y = problem.build(4)
    loss_fn = problem.make_loss("mean")
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    xs = R.as_tuple(x)

    def sample_loss(params, *args):
        *inp, target = (a.unsqueeze(0) for a in args)
        return loss_fn(functional_call(model, params, tuple(inp)), target)

    expect = vmap(grad(sample_loss), in_dims=(None,) + (0,) * (len(xs) + 1))(params, *xs, y)
    got = R.per_sample_grads(model, loss_fn, x, y)
    assert set(got) == set(expect)
    for n in got:
        torch.testing.assert_close(got[n], expect[n], rtol=1e-9, atol=1e-12)
