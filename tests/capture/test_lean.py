"""Small ``nn.Linear`` layers measured by module hooks (``capture/lean.py``), and the
factored forms of single-use weights normed together at the end of the pass: exact against
the float64 oracle, and every case the lean path leaves to the router still exact."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

import gradnoise
import reference as R
from checks import check_capture
from gradnoise.capture import lean, store
from gradnoise.capture.forms import Factored

B = 4


def loss_fn(out, y):
    return (out - y).pow(2).flatten(1).sum(1).mean()


def _check(model, x, y, **kw):
    check_capture(model, x, y, loss_fn, rtol=1e-9, **kw)


@pytest.fixture
def lean_calls(monkeypatch):
    """How many layer calls took the lean path."""
    seen = Counter()
    real = lean.LeanLinear._register

    def counted(self, args, y):
        seen["lean"] += 1
        return real(self, args, y)
    monkeypatch.setattr(lean.LeanLinear, "_register", counted)
    return seen


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 7, bias=False), nn.Tanh(), nn.Linear(7, 3)).double()


@pytest.mark.parametrize("shape", [(B, 5), (B, 3, 5), (B * 3, 5)])
def test_lean_layers_are_exact(shape, lean_calls):
    model = mlp()
    x = torch.randn(*shape, dtype=torch.float64)
    _check(model, x, torch.randn(*shape[:-1], 3, dtype=torch.float64))
    assert lean_calls["lean"] == 3


def test_what_the_lean_path_leaves_to_the_router_is_exact(lean_calls, monkeypatch):
    model = mlp()
    x, y = torch.randn(B, 3, 5, dtype=torch.float64), torch.randn(B, 3, 3, dtype=torch.float64)
    with monkeypatch.context() as m:
        m.setattr(lean, "LEAN_MACS", 10)  # every layer too large
        _check(model, x, y)
    assert lean_calls["lean"] == 0

    seq_first = nn.Sequential(nn.Linear(5, 3)).double()  # samples on dim 1: [T, B, d]

    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = seq_first

        def forward(self, x):
            return self.inner(x.transpose(0, 1)).transpose(0, 1)
    lean_calls.clear()
    _check(SeqFirst(), x, y)
    assert lean_calls["lean"] == 0

    model = mlp()  # a pre-hook added after ours may change the input: the router measures
    x, y = torch.randn(B, 5, dtype=torch.float64), torch.randn(B, 3, dtype=torch.float64)
    lean_calls.clear()
    with gradnoise.capture(model) as cap:
        handle = model[0].register_forward_pre_hook(lambda m, a: (a[0] * 2,))
        loss_fn(model(x), y).backward()
    assert lean_calls["lean"] == 2
    want = R.per_sample_sq_norms(model, loss_fn, x, y)  # the hook is still on: the oracle sees it too
    handle.remove()
    for k, w in want.items():
        torch.testing.assert_close(cap.per_sample_sq_norms[k].double(), w, rtol=1e-9, atol=0, msg=k)


def test_a_lean_weight_used_again_elsewhere_gets_its_cross_terms(lean_calls):
    """A lean layer's weight also used directly (``x @ W.t()``) and a layer called twice:
    the uses meet in the store with exact cross terms."""
    torch.manual_seed(0)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            h = torch.tanh(self.a(h))  # the same layer twice
            return self.b(h) + h @ self.b.weight.t()  # and its weight directly
    model = Tied().double()
    x = torch.randn(B, 3, 4, dtype=torch.float64)
    _check(model, x, torch.randn(B, 3, 4, dtype=torch.float64))
    assert lean_calls["lean"] == 3


def test_under_autocast_the_router_measures(lean_calls):
    model = mlp().float()
    x = torch.randn(B, 5)
    with gradnoise.capture(model) as cap, torch.autocast("cpu", torch.bfloat16):
        loss_fn(model(x).float(), torch.randn(B, 3)).backward()
    assert lean_calls["lean"] == 0 and len(cap.per_sample_sq_norms) == 5


@pytest.mark.parametrize("limit", [None, 1])
def test_factored_forms_are_normed_per_shape_by_the_cheaper_route(limit, monkeypatch):
    """Three same-shape layers: one stacked computation at the end of the pass, by the
    Gram route where it is cheaper and by materialising otherwise; flushed early over the
    limit, with the same numbers."""
    if limit is not None:
        monkeypatch.setattr(store, "DEFER_ELEMENTS", limit)
    seen = Counter()
    for meth in ("gram_sq_norms", "materialise"):
        real = getattr(Factored, meth)
        monkeypatch.setattr(Factored, meth, lambda self, _r=real, _m=meth: (seen.update([(_m, self.n)]), _r(self))[1])
    torch.manual_seed(0)
    for T, width in ((2, 6), (12, 3)):  # T(R + C) < RC: Gram; else materialise
        seen.clear()
        model = nn.Sequential(*[nn.Linear(width, width) for _ in range(3)]).double()
        x = torch.randn(B, T, width, dtype=torch.float64)
        _check(model, x, torch.randn(B, T, width, dtype=torch.float64))
        route = "gram_sq_norms" if T * 2 * width < width * width else "materialise"
        assert seen == (Counter({(route, 3 * B): 1}) if limit is None else Counter({(route, B): 3}))


def test_hugging_face_conv1d_and_a_tied_head_are_lean_and_exact(lean_calls):
    """GPT-2's ``Conv1D`` layers (weights ``[d_in, d_out]``) and its ``lm_head`` tied to the
    token table: lean hooks, the tie's cross terms from the store."""
    transformers = pytest.importorskip("transformers")
    import zoo_models
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=30, n_positions=6, n_embd=8, n_layer=1, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = zoo_models.Logits(transformers.GPT2LMHeadModel(cfg)).double()
    ids = torch.randint(0, 30, (B, 6))

    def ce(out, y):
        return torch.nn.functional.cross_entropy(out.reshape(-1, 30), y.reshape(-1))
    with gradnoise.capture(model) as cap:
        ce(model(ids), ids).backward()
    assert lean_calls["lean"] == 5  # c_attn, attn c_proj, c_fc, mlp c_proj, lm_head
    want = R.per_sample_sq_norms(model, ce, ids, ids)
    for k, w in want.items():
        torch.testing.assert_close(cap.per_sample_sq_norms[k].double(), w, rtol=1e-9, atol=1e-12 * float(w.max()), msg=k)


def test_layer_and_group_norms_are_lean_and_exact(monkeypatch):
    seen = Counter()
    real = lean.LeanNorm._register
    monkeypatch.setattr(lean.LeanNorm, "_register",
                        lambda self, x, y: (seen.update([type(self.module).__name__]), real(self, x, y))[1])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Flatten(2), nn.LayerNorm(9),
                          nn.Tanh(), nn.LayerNorm(9, bias=False)).double()
    model[3].weight.requires_grad_(False)  # a norm with its bias measured only
    x = torch.randn(B, 2, 3, 3, dtype=torch.float64)
    _check(model, x, torch.randn(B, 4, 9, dtype=torch.float64))
    assert seen == Counter({"GroupNorm": 1, "LayerNorm": 2})
    seen.clear()
    whole = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm((B, 3))).double()  # normalises across the samples
    with pytest.raises(gradnoise.errors.SampleMixingError):
        with gradnoise.capture(whole):
            whole(torch.randn(B, 3, dtype=torch.float64)).sum().backward()
    assert not seen


def test_steps_whose_uses_change_are_each_exact(lean_calls):
    """The lean path decides per call, not from a plan made at the first step: a later step
    that takes another branch, changes shape, switches train/eval or uses a weight in a new
    place is measured exactly, each by whichever path fits it."""
    torch.manual_seed(0)

    class Changing(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
            self.reuse = False

        def forward(self, x):
            h = torch.tanh(self.a(x))
            if float(x.sum()) > 0:  # a data-dependent branch
                h = torch.tanh(self.b(h))
            if not self.training:  # train/eval switch
                h = h * 2
            if self.reuse:  # a weight used in a new place, directly
                h = h + torch.tanh(h @ self.a.weight.t())
            return self.c(h)

    model = Changing().double()

    def step(x, lean):
        y = torch.randn(*x.shape[:-1], 2, dtype=torch.float64)
        lean_calls.clear()
        _check(model, x, y)
        assert lean_calls["lean"] == lean

    x = torch.randn(B, 4, dtype=torch.float64)
    step(x.abs(), 3)                                       # the first step: a, b, c
    step(-x.abs(), 2)                                      # the other branch: b unused
    step(torch.randn(B + 3, 5, 4, dtype=torch.float64).abs(), 3)  # new batch and sequence shape
    model.eval()
    step(x.abs(), 3)
    model.train()
    model.reuse = True
    step(x.abs(), 3)                                       # a's weight also used directly
    model.reuse = False
    seq_first = x.abs().unsqueeze(0).expand(3, B, 4).contiguous()  # samples moved to dim 1

    class Moved(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x.transpose(0, 1)).transpose(0, 1)
    wrapped = Moved(model)
    lean_calls.clear()
    _check(wrapped, seq_first.transpose(0, 1).contiguous(), torch.randn(B, 3, 2, dtype=torch.float64))
    assert lean_calls["lean"] == 0  # the same layers, their samples on dim 1: the router measures
