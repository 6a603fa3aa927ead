"""Parameters used several times: cross terms from the factors, never ``[B, numel]``.

Every model here is checked against the float64 oracle while the store's dense path for a
factored use (``as_matrix`` of a Linear weight's or a table's per-sample gradients: the
running sum ``[B, numel]``) and the materialisation of lookups are made to fail, so those
numbers come from the factored cross terms alone (biases, with no factored form, stay
dense: ``[B, d]``)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradnoise
import reference as R
from checks import check_capture
from gradnoise.capture import forms, store


@pytest.fixture
def factored_only(monkeypatch):
    real = store.as_matrix

    def as_matrix(form, rows, cols):
        if not isinstance(form, forms.Dense):
            raise AssertionError(f"a dense [B, {rows}·{cols}] per-sample gradient was built")
        return real(form, rows, cols)

    def refuse(*a, **k):
        raise AssertionError("a lookup's [B, V, d] per-sample gradient was built")
    monkeypatch.setattr(store, "as_matrix", as_matrix)
    monkeypatch.setattr(forms.Lookup, "materialise", refuse)


def _check(model, x, y, loss_fn, rtol=1e-7):
    return check_capture(model, x, y, loss_fn, rtol)


def _ce(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


class LinearTwice(nn.Module):
    def __init__(self, seq: bool):
        super().__init__()
        self.lin, self.seq = nn.Linear(4, 4), seq

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


@pytest.mark.parametrize("seq", [False, True], ids=["2d", "sequence"])
def test_linear_applied_twice(seq, factored_only):
    torch.manual_seed(0)
    x = torch.randn(5, 3, 4, dtype=torch.float64) if seq else torch.randn(5, 4, dtype=torch.float64)
    y = torch.randint(0, 4, x.shape[:-1])
    _check(LinearTwice(seq).double(), x, y, _ce)


class TableTiedToLinear(nn.Module):
    """A table looked up with ids ``[B]`` (2-D data) whose transpose-free twin is the
    output layer: ``lm_head.weight is emb.weight``; also with ``padding_idx``."""

    def __init__(self, v=7, d=3, padding_idx=None):
        super().__init__()
        self.emb = nn.Embedding(v, d, padding_idx=padding_idx)
        self.head = nn.Linear(d, v, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


@pytest.mark.parametrize("shape", [(6,), (6, 5)], ids=["ids [B]", "ids [B, T]"])
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_table_tied_to_a_linear(shape, padding_idx, factored_only):
    torch.manual_seed(1)
    ids = torch.randint(0, 7, shape)
    ids.view(-1)[0] = 2
    _check(TableTiedToLinear(padding_idx=padding_idx).double(), ids, torch.randint(0, 7, shape), _ce)


class TwoPositions(nn.Module):
    """One table used for two id tensors (a pair of fields, an encoder and a decoder)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(6, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids[:, :4]) * self.emb(ids[:, 4:]) + self.emb(ids[:, :4])))


def test_embedding_used_at_two_positions(factored_only):
    torch.manual_seed(2)
    ids = torch.randint(0, 6, (5, 8))
    _check(TwoPositions().double(), ids, torch.randint(0, 2, (5, 4)), _ce)


def test_tied_gpt2_at_the_real_vocabulary_and_width(factored_only):
    """HF GPT-2 with its real 50257 × 768 tied table (one block, 8 tokens): the table's
    per-sample norms come from the factors, and a per-parameter norm of 38.6M entries
    stays exact in float32 (within 1e-5 of the float64 oracle)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    cfg = transformers.GPT2Config(n_layer=1, n_positions=16, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    model = transformers.GPT2LMHeadModel(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(0, cfg.vocab_size, (3, 8))

    class Logits(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, i):
            return self.m(input_ids=i).logits

    wrapped = Logits(model)
    with gradnoise.capture(wrapped) as cap:
        _ce(wrapped(ids), ids).backward()
    want = R.per_sample_sq_norms(wrapped, _ce, ids, ids)  # float64 copy inside
    for k, w in want.items():
        got = cap.per_sample_sq_norms[k].double()
        assert float(((got - w).abs() / w.max()).max()) < 1e-5, k


class HeadBeforeTable(nn.Module):
    """The tied output layer runs before the table: in the backward pass the lookup
    arrives first and is kept (its factors are smaller than its projection on the head's
    input would be) until the head's gradient comes."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 3)
        self.head = nn.Linear(3, 9, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x, ids):
        logits = self.head(x)                                 # [B, 5, 9]
        return logits + self.emb(ids).sum((1, 2))[:, None, None]


def test_table_after_its_tied_head_keeps_the_lookup(factored_only, monkeypatch):
    seen = []
    real = store.inner
    monkeypatch.setattr(store, "project", lambda *a: seen.append("project"))
    monkeypatch.setattr(store, "inner", lambda form, *a: seen.append(type(form).__name__) or real(form, *a))
    torch.manual_seed(4)
    x, ids = torch.randn(5, 5, 3, dtype=torch.float64), torch.randint(0, 9, (5, 4))
    _check(HeadBeforeTable().double(), (x, ids), torch.randint(0, 9, (5, 5)), _ce)
    assert seen == ["Lookup"]  # kept, met once the head arrived, never projected to [B, T, V]
