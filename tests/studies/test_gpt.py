"""The byte-level corpus and the tiny GPT the language-model study builds on: no
download, equal-length windows, and per-sample norms that equal the float64 oracle."""
import pytest
import torch

import gradnoise
import reference as R
from gradnoise.studies.gpt import TinyGPT, corpus_bytes, token_loss, windows
from gradnoise.studies.task import check_reduction


def test_the_corpus_is_real_english_from_the_standard_library():
    data = corpus_bytes()
    assert data.dtype == torch.uint8 and len(data) > 400_000
    text = bytes(data[:20000].tolist()).decode("utf-8", errors="replace")
    assert " the " in text and "Python" in text
    assert torch.equal(corpus_bytes()[:1000], data[:1000])  # the same bytes every time


def test_windows_are_next_byte_pairs():
    data = corpus_bytes()
    x, y = windows(data, 16, limit=50)
    assert x.shape == y.shape == (50, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x[1, 0], data[17].long())
    with pytest.raises(ValueError, match="at least 1"):
        windows(data, 0)
    with pytest.raises(ValueError, match="fewer than 2 windows"):
        windows(data[:10], 8)


def test_per_sample_norms_of_the_tiny_gpt_equal_the_oracle():
    torch.manual_seed(0)
    length = 12
    model = TinyGPT(length, dim=16, heads=2, layers=1).double()
    x, y = windows(corpus_bytes(), length, limit=6)
    with gradnoise.capture(model, reduction="mean") as cap:
        token_loss(model(x), y).backward()
    ref = R.per_sample_sq_norms(model, token_loss, x, y)
    assert set(ref) == set(cap.per_sample_sq_norms)
    for name, want in ref.items():
        torch.testing.assert_close(cap.per_sample_sq_norms[name].double(), want, rtol=1e-6, atol=1e-12, msg=name)
    assert model.wte.weight.grad is not None  # the tied weight: embedding and output layer


def test_the_token_mean_is_a_mean_over_sequences():
    torch.manual_seed(0)
    model = TinyGPT(8, dim=16, heads=2, layers=1)
    x, y = windows(corpus_bytes(), 8, limit=8)
    check_reduction("lm", model, x, y, token_loss, "mean")  # raises if it were a sum
