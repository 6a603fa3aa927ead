"""Every route and chunking branch, forced, against the float64 oracle: the Linear
sequence rule's Gram and materialised routes, conv and Linear chunks of one and two
samples, folded rows, and the automatic route choice itself."""
import pytest
import torch

import gradnoise
import reference as R
from gradnoise.capture import linear
from gradnoise.capture.site import Policy
from gradnoise.capture.store import SampleStore
from problems import BY_NAME

SEQUENCE = ["linear_seq", "linear_seq2d", "mha_self_batch_first", "mha_cross_kdim_vdim",
            "transformer_encoder_layer", "param_matmul", "linear_twice"]
CONV = ["conv1d", "conv1d_stride_pad", "conv2d_groups2", "conv2d_same", "conv2d_dilation2", "conv2d_nobias", "conv3d"]
B = 5


def _run(name, policy, monkeypatch):
    """Norms of problem ``name`` under ``policy``, the oracle's, and what ran: the
    routes taken and the chunk starts handed to the store."""
    seen = {"materialise": 0, "gram": 0, "starts": set()}
    real_mat, real_add, real_grads = linear._materialised, SampleStore.add_sq_norms, SampleStore.add_grads

    def materialised(site, a, d):
        seen["materialise"] += 1
        return real_mat(site, a, d)

    def add_sq_norms(self, param, sq, n, start=0):
        seen["starts"].add(start)
        return real_add(self, param, sq, n, start)

    def add_grads(self, param, grads, view, n, start=0):
        seen["starts"].add(start)
        return real_grads(self, param, grads, view, n, start)

    monkeypatch.setattr(linear, "_materialised", materialised)
    monkeypatch.setattr(SampleStore, "add_sq_norms", add_sq_norms)
    monkeypatch.setattr(SampleStore, "add_grads", add_grads)
    problem = BY_NAME[name]
    model, x, y = problem.build(B, torch.float64)
    loss_fn = problem.make_loss("mean")
    real_bmm = torch.bmm
    calls = []
    monkeypatch.setattr(torch, "bmm", lambda *a: calls.append(1) or real_bmm(*a))
    with gradnoise.capture.Capture(model, policy=policy) as cap:
        loss_fn(R.call(model, x), y).backward()
    monkeypatch.undo()
    seen["gram"] = len(calls) > 0 and seen["materialise"] == 0
    return cap.per_sample_sq_norms, R.per_sample_sq_norms(model, loss_fn, x, y), seen


def _assert_match(got, want):
    assert set(got) == set(want)
    for k, w in want.items():
        torch.testing.assert_close(got[k].double(), w, rtol=1e-6, atol=1e-12 * float(w.max()), msg=k)


@pytest.mark.parametrize("name", SEQUENCE)
@pytest.mark.parametrize("route", ["gram", "materialise"])
@pytest.mark.parametrize("chunk", [None, 1, 2])
def test_linear_routes_and_chunks(name, route, chunk, monkeypatch):
    got, want, seen = _run(name, Policy(route, chunk), monkeypatch)
    _assert_match(got, want)
    if name in ("linear_seq", "linear_seq2d", "transformer_encoder_layer") and route == "materialise":
        assert seen["materialise"] > 0
        assert (max(seen["starts"]) > 0) == (chunk is not None)
    if name in ("linear_seq", "linear_seq2d") and route == "gram":
        assert seen["materialise"] == 0 and seen["gram"]


@pytest.mark.parametrize("name", CONV)
@pytest.mark.parametrize("route", ["gram", "materialise"])
@pytest.mark.parametrize("chunk", [None, 1, 2])
def test_conv_routes_and_chunks(name, route, chunk, monkeypatch):
    got, want, seen = _run(name, Policy(route, chunk), monkeypatch)
    _assert_match(got, want)
    assert (max(seen["starts"]) > 0) == (chunk is not None)


@pytest.mark.parametrize("chunk", [None, 2])
def test_depthwise_conv_takes_the_grouped_route(chunk, monkeypatch):
    from gradnoise.capture import conv

    calls = []
    real = conv._weight_grad_grouped
    monkeypatch.setattr(conv, "_weight_grad_grouped", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, groups=3), torch.nn.Flatten(), torch.nn.Linear(3 * 16, 2)).double()
    x, y = torch.randn(B, 3, 6, 6, dtype=torch.float64), torch.randint(0, 2, (B,))
    with gradnoise.capture.Capture(model, policy=Policy(None, chunk)) as cap:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    monkeypatch.undo()
    assert calls
    _assert_match(cap.per_sample_sq_norms, R.per_sample_sq_norms(model, torch.nn.functional.cross_entropy, x, y))


def test_automatic_route_choice():
    """Small layers materialise (the weight gradient comes from the per-sample ones);
    a wide layer whose chunks would hold one sample takes the Gram route."""
    assert linear._materialise_cheaper(n=8, t=10, d_in=16, d_out=16)
    assert not linear._materialise_cheaper(n=64, t=4, d_in=512, d_out=512)


def test_bad_route_is_refused():
    with pytest.raises(ValueError, match="route"):
        gradnoise.capture.Capture(torch.nn.Linear(2, 2), policy=Policy("fast"))


class Folded(torch.nn.Module):
    """Frames folded into the batch, sample-major (``[B, k, C, L] -> [B·k, C, L]``), as
    video and windowed models do: conv, GroupNorm, an embedding and a parameter added
    on folded rows; then unfolded for the head."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(2, 4, 3, padding=1)
        self.norm = torch.nn.GroupNorm(2, 4)
        self.frame = torch.nn.Parameter(torch.randn(1, 4, 1))
        self.head = torch.nn.Linear(3 * 4 * 6, 2)

    def forward(self, x):
        b, k = x.shape[:2]
        h = self.norm(self.conv(x.reshape(b * k, *x.shape[2:]))) + self.frame
        return self.head(torch.tanh(h).reshape(b, -1))


@pytest.mark.parametrize("chunk", [None, 1, 2])
def test_folded_rows(chunk):
    torch.manual_seed(0)
    model = Folded().double()
    x, y = torch.randn(B, 3, 2, 6, dtype=torch.float64), torch.randint(0, 2, (B,))
    loss_fn = torch.nn.functional.cross_entropy
    with gradnoise.capture.Capture(model, policy=Policy(None, chunk)) as cap:
        loss_fn(model(x), y).backward()
    _assert_match(cap.per_sample_sq_norms, R.per_sample_sq_norms(model, loss_fn, x, y))


class TokenTypes(torch.nn.Module):
    """BERT's pattern: a table looked up with constant ids expanded to ``[B, T]``."""

    def __init__(self):
        super().__init__()
        self.types = torch.nn.Embedding(3, 4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        ids = torch.tensor([0, 1, 1, 2, 0])[: x.shape[1]].expand(x.shape[0], -1)
        return self.head(torch.tanh(x + self.types(ids))).mean(1)


def test_table_of_constant_ids_aligned_with_the_batch(monkeypatch):
    from gradnoise.capture import direct

    calls = []
    real = direct.give_table
    monkeypatch.setattr(direct, "give_table", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    model = TokenTypes().double()
    x, y = torch.randn(B, 5, 4, dtype=torch.float64), torch.randint(0, 2, (B,))
    loss_fn = torch.nn.functional.cross_entropy
    with gradnoise.capture(model) as cap:
        loss_fn(model(x), y).backward()
    monkeypatch.undo()
    assert calls == [1]
    _assert_match(cap.per_sample_sq_norms, R.per_sample_sq_norms(model, loss_fn, x, y))
