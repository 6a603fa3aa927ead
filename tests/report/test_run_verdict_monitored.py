"""The verdict on runs measured by the monitor itself (issue 19): a small AdamW
transformer and an SGD CNN, trained for a few dozen steps, checked by their decision
objects — the Adam run by its update direction's noise and the square-root rule, the SGD
run by AdaScale's gain, each from the run's own learning rate."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradnoise
from gradnoise.report.files import load
from gradnoise.report.verdict import verdicts
from gradnoise.stats import rules


def _train(model, opt, batches, path, loss_fn):
    monitor = gradnoise.NoiseMonitor(model, optimizer=opt, sinks=[str(path)], beta=0.8)
    for x, y in batches:
        loss = loss_fn(model(x), y)
        loss.backward()
        monitor.step(loss=loss)
        opt.step()
        opt.zero_grad()
    monitor.close()
    (v,) = verdicts([load(path)], [path.stem])
    return v


class TinyLM(nn.Module):
    def __init__(self, vocab=12, d=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.block = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        return self.head(self.block(self.emb(ids)))


def test_an_adamw_transformer_run(tmp_path):
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(40):
        ids = torch.randint(0, 12, (16, 8), generator=gen)
        batches.append((ids, (ids + 1) % 12))

    def ce(out, y):
        return nn.functional.cross_entropy(out.reshape(-1, 12), y.reshape(-1))
    v = _train(model, opt, batches, tmp_path / "adam.jsonl", ce)
    assert v.optimizer == "AdamW" and v.answered
    assert v.basis == "preconditioned B_simple" and v.lr_rule == "adam-sqrt"
    header, steps = gradnoise.read_run(tmp_path / "adam.jsonl")
    last = steps[-1]
    b = last["preconditioned"]["smoothed"]["b_simple"]
    lo, hi = (float(x) for x in last["preconditioned"]["b_simple_interval"])
    want = b if math.isfinite(hi) else lo
    assert v.batch == max(1, int(float(f"{want:.2g}")))
    assert v.lr == pytest.approx(3e-3 * rules.adam_sqrt(16, v.batch, b if math.isfinite(hi) else lo))
    assert all(s["loss"] is not None and s["tokens_per_sample"] == 8 for s in steps)


def test_an_sgd_cnn_run(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(64, 3, generator=gen)
    batches = []
    for _ in range(40):
        x = torch.randn(8, 1, 8, 8, generator=gen)
        batches.append((x, (x.flatten(1) @ teacher).argmax(1)))
    v = _train(model, opt, batches, tmp_path / "sgd.jsonl", nn.functional.cross_entropy)
    assert v.optimizer == "SGD" and v.basis == "B_simple"
    if v.answered:  # the decision rests on the raw noise scale and AdaScale's gain
        assert v.lr_rule == "adascale"
        assert v.lr == pytest.approx(0.05 * v.lr_factor)
    else:
        assert "not determined" in v.why_not
