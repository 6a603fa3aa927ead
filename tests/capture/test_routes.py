"""Every route and chunking branch, forced, against the float64 oracle: the factored
forms' Gram and materialised routes (Linear, convolutions), chunks of one and two
samples, folded rows, the grouped-convolution way of materialising, and the automatic
route choice itself."""
from collections import Counter

import pytest
import torch

import gradnoise
import reference as R
from checks import assert_norms_match
from gradnoise.capture import conv
from gradnoise.capture.conv import ConvForm
from gradnoise.capture.forms import Factored
from gradnoise.capture.site import Policy
from gradnoise.capture.store import route
from problems import BY_NAME

SEQUENCE = ["linear_seq", "linear_seq2d", "mha_self_batch_first", "mha_cross_kdim_vdim",
            "transformer_encoder_layer", "param_matmul", "linear_twice"]
CONV = ["conv1d", "conv1d_stride_pad", "conv2d_groups2", "conv2d_same", "conv2d_dilation2", "conv2d_nobias",
        "conv3d", "conv_transpose2d"]
B = 5


def _count(monkeypatch, seen: Counter, cls, *methods):
    for meth in methods:
        real = getattr(cls, meth)

        def wrapped(self, *a, _real=real, _key=f"{cls.__name__}.{meth}"):
            seen[_key] += 1
            return _real(self, *a)
        monkeypatch.setattr(cls, meth, wrapped)


def _run(name, policy, monkeypatch):
    """Norms of problem ``name`` under ``policy``, the oracle's, and which form methods ran."""
    seen = Counter()
    _count(monkeypatch, seen, Factored, "materialise", "gram_sq_norms", "slice")
    _count(monkeypatch, seen, ConvForm, "materialise", "gram_sq_norms", "slice")
    problem = BY_NAME[name]
    model, x, y = problem.build(B, torch.float64)
    loss_fn = problem.make_loss("mean")
    with gradnoise.capture.Capture(model, policy=policy) as cap:
        loss_fn(R.call(model, x), y).backward()
    monkeypatch.undo()
    return cap.per_sample_sq_norms, R.per_sample_sq_norms(model, loss_fn, x, y), seen


def _assert_match(got, want):
    assert_norms_match(got, want, rtol=1e-6)


@pytest.mark.parametrize("name", SEQUENCE)
@pytest.mark.parametrize("route_", ["gram", "materialise"])
@pytest.mark.parametrize("chunk", [None, 1, 2])
def test_linear_routes_and_chunks(name, route_, chunk, monkeypatch):
    got, want, seen = _run(name, Policy(route_, chunk), monkeypatch)
    _assert_match(got, want)
    other = "gram_sq_norms" if route_ == "materialise" else "materialise"
    assert seen["Factored." + ("materialise" if route_ == "materialise" else "gram_sq_norms")] > 0
    if name in ("linear_seq", "linear_seq2d"):
        assert seen["Factored." + other] == 0
    assert (seen["Factored.slice"] > 0) == (chunk is not None)


@pytest.mark.parametrize("name", CONV)
@pytest.mark.parametrize("route_", ["gram", "materialise"])
@pytest.mark.parametrize("chunk", [None, 1, 2])
def test_conv_routes_and_chunks(name, route_, chunk, monkeypatch):
    got, want, seen = _run(name, Policy(route_, chunk), monkeypatch)
    _assert_match(got, want)
    taken = "materialise" if route_ == "materialise" or name == "conv3d" else "gram_sq_norms"
    assert seen["ConvForm." + taken] > 0 and seen["ConvForm." + ("gram_sq_norms" if taken == "materialise" else "materialise")] == 0
    assert (seen["ConvForm.slice"] > 0) == (chunk is not None)


@pytest.mark.parametrize("chunk", [None, 2])
def test_depthwise_conv_materialises_by_the_grouped_convolution(chunk, monkeypatch):
    calls = []
    real = conv._grouped_weight_grads
    monkeypatch.setattr(conv, "_grouped_weight_grads", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, groups=3), torch.nn.Flatten(), torch.nn.Linear(3 * 16, 2)).double()
    x, y = torch.randn(B, 3, 6, 6, dtype=torch.float64), torch.randint(0, 2, (B,))
    with gradnoise.capture.Capture(model, policy=Policy(None, chunk)) as cap:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    monkeypatch.undo()
    assert calls
    _assert_match(cap.per_sample_sq_norms, R.per_sample_sq_norms(model, torch.nn.functional.cross_entropy, x, y))


def _factored(n, t, d_in, d_out):
    return Factored(torch.zeros(n, t, d_out), torch.zeros(n, t, d_in), d_out)


def test_automatic_route_choice():
    """Small layers materialise when the weight gradient is wanted (it comes from the
    per-sample ones); a wide layer whose chunks would hold one sample, or any layer whose
    gradient autograd computes anyway, takes the Gram route; a long sequence through a
    narrow layer materialises."""
    assert route(_factored(8, 4, 16, 16), True, 0, None, None)[0] == "materialise"
    assert route(_factored(8, 4, 16, 16), False, 0, None, None)[0] == "gram"
    assert route(_factored(64, 4, 512, 512), True, 0, None, None)[0] == "gram"
    assert route(_factored(4, 64, 4, 4), False, 0, None, None)[0] == "materialise"
    assert route(_factored(8, 10, 16, 16), True, 0, "gram", 3) == ("gram", 3)


def _conv(n, c_in, c_out, k, size):
    x = torch.zeros(n, c_in, size, size)
    return ConvForm(x, torch.zeros(n, c_out, size, size), (c_out, c_in, k, k), ([1, 1], [k // 2] * 2, [1, 1], 1))


def test_automatic_route_choice_for_convolutions():
    """ResNet-50's stages (measured, 1 thread): at 56×56 and 14×14 positions the grouped
    convolution costs about the weight gradient; at 7×7, and at 8×8 (ResNet-18 at 64²), the
    Gram route is cheapest."""
    assert route(_conv(8, 64, 64, 3, 56), True, 8 * 64 * 56 * 56 * 9, None, None)[0] == "materialise"
    assert route(_conv(8, 256, 256, 3, 14), True, 8 * 256 * 196 * 9, None, None)[0] == "materialise"
    assert route(_conv(8, 512, 512, 3, 7), True, 8 * 512 * 49 * 9, None, None)[0] == "gram"
    assert route(_conv(16, 128, 128, 3, 8), True, 16 * 128 * 64 * 2, None, None)[0] == "gram"
    assert route(_conv(8, 512, 512, 3, 7), True, 0, "materialise", None)[0] == "materialise"
    stem = _conv(8, 3, 64, 7, 56)  # 3136 positions per sample: one sample per call
    assert route(stem, True, 10**9, None, None) == ("materialise", 1)
    conv3d = ConvForm(torch.zeros(2, 4, 3, 3, 3), torch.zeros(2, 4, 3, 3, 3), (4, 4, 1, 1, 1), ([1] * 3, [0] * 3, [1] * 3, 1))
    assert route(conv3d, True, 0, "gram", None)[0] == "materialise"  # no Gram route in 3-D


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
    real = direct.Lookup
    monkeypatch.setattr(direct, "Lookup", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    model = TokenTypes().double()
    x, y = torch.randn(B, 5, 4, dtype=torch.float64), torch.randint(0, 2, (B,))
    loss_fn = torch.nn.functional.cross_entropy
    with gradnoise.capture(model) as cap:
        loss_fn(model(x), y).backward()
    monkeypatch.undo()
    assert calls == [1]
    _assert_match(cap.per_sample_sq_norms, R.per_sample_sq_norms(model, loss_fn, x, y))


@pytest.mark.parametrize("limit", [None, 1, 400])
def test_held_norms_are_batched_per_shape_and_flushed_within_the_limit(limit, monkeypatch):
    """Single-use parameters' whole per-sample gradients (biases, norms, materialised
    weights) wait for one stacked norm per shape at the end of the pass; over
    ``DEFER_ELEMENTS`` they are normed early. Same numbers either way."""
    from gradnoise.capture import forms, store
    if limit is not None:
        monkeypatch.setattr(store, "DEFER_ELEMENTS", limit)
    calls = Counter()
    real = forms.sq_norms

    def counted(t):
        calls[tuple(t.shape)] += 1
        return real(t)
    monkeypatch.setattr(store, "sq_norms", counted)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 6), torch.nn.LayerNorm(6)).double()
    x, y = torch.randn(B, 3, 6, dtype=torch.float64), torch.randn(B, 3, 6, dtype=torch.float64)

    def loss_fn(out, t):
        return (out - t).pow(2).sum((1, 2)).mean()
    with gradnoise.capture.Capture(model, policy=Policy("materialise")) as cap:
        loss_fn(model(x), y).backward()
    _assert_match(cap.per_sample_sq_norms, R.per_sample_sq_norms(model, loss_fn, x, y))
    if limit is None:  # three weights [B, 36] and five vectors [B, 6] (biases, the norm's weight): two norms
        assert calls == Counter({(3 * B, 36): 1, (5 * B, 6): 1})
    elif limit == 1:  # each held alone: one norm per parameter
        assert sum(calls.values()) == 8
    else:
        assert 2 < sum(calls.values()) < 8
