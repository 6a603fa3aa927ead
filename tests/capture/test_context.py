"""Capture mechanics: grads untouched, frozen/unused parameters, user rules, autocast."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradnoise
from reference import per_sample_sq_norms


def test_existing_grads_are_accumulated_and_the_batch_gradient_is_isolated():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(6, 4).double(), torch.randint(0, 3, (6,))
    F.cross_entropy(model(x[:3]), y[:3]).backward()  # an earlier accumulation
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    with gradnoise.capture(model) as cap:
        F.cross_entropy(model(x), y).backward()
    fresh = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    fresh.load_state_dict(model.state_dict())
    F.cross_entropy(fresh(x), y).backward()
    for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
        torch.testing.assert_close(p.grad, before[n] + q.grad)
    # |ḡ|² uses this batch only
    expected = sum(float(q.grad.square().sum()) for q in fresh.parameters())
    assert cap.stats().mean_sq_norm == pytest.approx(expected, rel=1e-10)


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.tensor([1.5, -0.5, 2.0]))

    def forward(self, x):
        return x * self.s


def scale_rule(module, args, kwargs, output, grad_output):
    (x,) = args
    return {"s": x * grad_output}


def test_user_rule_is_used_and_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), Scale()).double()
    x, y = torch.randn(5, 4).double(), torch.randint(0, 3, (5,))
    calls = []

    def rule(*a):
        calls.append(1)
        return scale_rule(*a)

    with gradnoise.capture(model, rules={Scale: rule}) as cap:
        F.cross_entropy(model(x), y).backward()
    assert calls == [1]
    ref = per_sample_sq_norms(model, F.cross_entropy, x, y)
    torch.testing.assert_close(cap.per_sample_sq_norms["1.s"], ref["1.s"], rtol=1e-6, atol=1e-12)


def test_user_rule_with_wrong_shape_is_refused():
    model = nn.Sequential(nn.Linear(4, 3), Scale())
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    bad = lambda *a: {"s": torch.zeros(5, 2)}
    with pytest.raises(gradnoise.FallbackError, match=r"expected \[5, 3\]"):
        with gradnoise.capture(model, rules={Scale: bad}):
            F.cross_entropy(model(x), y).backward()


def test_autocast_bfloat16_norms_close_to_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    with gradnoise.capture(model) as ref:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad()
    with gradnoise.capture(model) as cap:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
    for name, v in ref.per_sample_sq_norms.items():
        got = cap.per_sample_sq_norms[name]
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, v, rtol=0.05, atol=1e-4)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


def test_no_grad_forward_inside_capture_is_ignored():
    model = nn.Linear(4, 3)
    x = torch.randn(5, 4)
    with gradnoise.capture(model) as cap:
        with torch.no_grad():
            model(x)
        model(x).pow(2).mean().backward()
    assert cap.stats().batch_size == 5


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradient_accumulation_over_unequal_micro_batches(reduction):
    """Passes of 3 and 5 samples, each mean loss scaled by its share: the capture's
    per-sample norms and statistics are those of the whole batch of 8."""
    from reference import noise_stats, per_sample_grads

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(8, 4).double(), torch.randint(0, 3, (8,))
    model.zero_grad()
    with gradnoise.capture(model, reduction=reduction) as cap:
        for lo, hi in ((0, 3), (3, 8)):
            if reduction == "mean":
                loss = F.cross_entropy(model(x[lo:hi]), y[lo:hi]) * (hi - lo) / 8
            else:
                loss = F.cross_entropy(model(x[lo:hi]), y[lo:hi], reduction="sum")
            loss.backward()
    ref = per_sample_grads(model, F.cross_entropy, x, y)
    for name, g in ref.items():
        torch.testing.assert_close(cap.per_sample_sq_norms[name], g.flatten(1).square().sum(1), rtol=1e-6, atol=1e-12)
    want = noise_stats(ref)
    s = cap.stats()
    assert s.batch_size == 8 and s.n_groups == 8
    assert s.trace_cov == pytest.approx(want.total.trace_cov, rel=1e-6)
    assert s.grad_sq_norm == pytest.approx(want.total.grad_sq_norm, rel=1e-6)
