"""Rules of one's own (``capture(model, rules={Layer: rule})``): the worked example of
examples/own_rule.py against the float64 oracle, as factored and as dense gradients, on
folded rows and with the weight also used elsewhere; and a capture whose results could
not be completed stays failed instead of reporting nothing."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradnoise
import reference as R
from gradnoise.capture import Dense
from gradnoise.errors import CaptureStateError, UnsupportedUseError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import own_rule  # noqa: E402


def _ce(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _dense_rule(module, args, kwargs, output, grad_output):
    forms = own_rule.linear_gelu_rule(module, args, kwargs, output, grad_output)
    return {"weight": forms["weight"].materialise(), "bias": forms["bias"].grads}


class Shared(nn.Module):
    """The fused layer's weight also used by a plain Linear: cross terms between a
    user rule's factors and a built-in rule's."""

    def __init__(self):
        super().__init__()
        self.fused = own_rule.LinearGelu(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = self.fused(x)
        return self.out(F.linear(h, self.fused.weight))


class Folded(nn.Module):
    """The layer sees ``[B·T, d]``: k rows per sample that gradnoise sums per sample."""

    def __init__(self):
        super().__init__()
        self.fused = own_rule.LinearGelu(6, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.fused(x.reshape(-1, x.shape[-1])).view(x.shape[0], x.shape[1], -1))


@pytest.mark.parametrize("make", [lambda: nn.Sequential(own_rule.LinearGelu(6, 5), nn.Linear(5, 3)), Shared, Folded],
                         ids=["sequence", "weight also used elsewhere", "folded rows"])
@pytest.mark.parametrize("rule", [own_rule.linear_gelu_rule, _dense_rule], ids=["factored", "dense"])
def test_a_users_rule_is_exact(make, rule):
    torch.manual_seed(0)
    model = make().double()
    x, y = torch.randn(5, 4, 6, dtype=torch.float64), torch.randint(0, 3, (5, 4))
    with gradnoise.capture(model, rules={own_rule.LinearGelu: rule}) as cap:
        _ce(model(x), y).backward()
    want = R.per_sample_sq_norms(model, _ce, x, y)
    assert set(cap.per_sample_sq_norms) == set(want)
    for k, w in want.items():
        torch.testing.assert_close(cap.per_sample_sq_norms[k].double(), w, rtol=1e-7, atol=1e-12 * float(w.max()), msg=k)


def test_without_a_rule_the_error_points_to_one():
    model = nn.Sequential(own_rule.LinearGelu(6, 5), nn.Linear(5, 3))
    with pytest.raises(UnsupportedUseError, match=r"'0.weight'.*custom autograd.Function.*rules="):
        with gradnoise.capture(model):
            _ce(model(torch.randn(3, 6)), torch.randint(0, 3, (3,))).backward()


def test_a_rule_returning_the_wrong_rows_is_refused():
    model = nn.Sequential(own_rule.LinearGelu(6, 5), nn.Linear(5, 3))
    bad = lambda *a: {"weight": Dense(torch.zeros(2, 5, 6))}  # noqa: E731
    with pytest.raises(gradnoise.FallbackError, match=r"expected \[3, 5, 6\]"):
        with gradnoise.capture(model, rules={own_rule.LinearGelu: bad}):
            _ce(model(torch.randn(3, 6)), torch.randint(0, 3, (3,))).backward()


def test_a_capture_whose_results_failed_stays_failed():
    """Results are read only once complete: a failure while they are put together leaves
    the capture "failed", so reading them raises instead of returning nothing."""
    model = nn.Sequential(own_rule.LinearGelu(6, 5), nn.Linear(5, 3))
    cap = gradnoise.capture(model)
    with pytest.raises(UnsupportedUseError):
        with cap:
            _ce(model(torch.randn(3, 6)), torch.randint(0, 3, (3,))).backward()
    with pytest.raises(CaptureStateError, match="failed"):
        cap.per_sample_sq_norms
