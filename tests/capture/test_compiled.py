"""``torch.compile``d models (CPU inductor): a measured pass runs the compiled code eagerly.

Per-sample norms equal the float64 oracle's, ``p.grad`` equals the compiled plain step's,
nothing is recompiled and no graph break is added by the capture; the monitor's
unmeasured steps run compiled.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradnoise
import reference as ref
import zoo_models
from gradnoise.errors import GradNoiseError

counters = pytest.importorskip("torch._dynamo.utils").counters

B = 4


class PatchViT(nn.Module):
    """Patches → Linear, a learned position parameter added directly, pre-norm MLP block."""

    def __init__(self, d=8, patches=4, patch_dim=12, classes=3):
        super().__init__()
        self.embed = nn.Linear(patch_dim, d)
        self.pos = nn.Parameter(0.1 * torch.randn(1, patches, d))
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, classes)

    def forward(self, x):  # [B, patches, patch_dim]
        h = self.embed(x) + self.pos
        h = h + self.mlp(self.norm(h))
        return self.head(h.mean(1))


def mlp():
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)), torch.randn(B, 6), torch.randint(0, 3, (B,))


def vit():
    return PatchViT(), torch.randn(B, 4, 12), torch.randint(0, 3, (B,))


def cnn():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    return model, torch.randn(B, 2, 6, 6), torch.randint(0, 3, (B,))


def gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ids = torch.randint(0, 40, (B, 8))
    return zoo_models.Logits(transformers.GPT2LMHeadModel(cfg)), ids, ids


def loss_fn(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


MODELS = {"mlp": mlp, "gpt2-tied": gpt2, "vit-position": vit, "cnn-groupnorm": cnn}


def build(name):
    torch.manual_seed(0)
    model, x, y = MODELS[name]()
    return model.double(), x.double() if x.is_floating_point() else x, y


def graphs():
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_model_is_measured_exactly(name):
    model, x, y = build(name)
    compiled = torch.compile(model)
    loss_fn(compiled(x), y).backward()  # compiles
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    before = graphs()
    assert before[0] >= 1
    model.zero_grad()
    with gradnoise.capture(compiled) as cap:
        loss_fn(compiled(x), y).backward()
    assert graphs() == before  # nothing recompiled, no graph break added
    want = ref.per_sample_sq_norms(model, loss_fn, x, y)
    got = cap.per_sample_sq_norms
    assert set(got) == set(want)  # the model's own names, no "_orig_mod."
    for n in want:
        torch.testing.assert_close(got[n], want[n] * 1.0, rtol=1e-9, atol=1e-12, msg=n)
    for n, p in model.named_parameters():  # the compiled step's p.grad, up to its fusions
        torch.testing.assert_close(p.grad, plain[n], rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("name", ["mlp", "gpt2-tied"])
@pytest.mark.parametrize("source", ["per_sample", "microbatch"])
def test_monitor_on_a_compiled_model(name, source):
    """Measured steps (every 2nd) run eagerly, the others compiled; no recompilation after
    the first compiled step; the records match the oracle."""
    model, x, y = build(name)
    compiled = torch.compile(model)
    monitor = gradnoise.NoiseMonitor(compiled, source=source, every=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    records = []
    for step in range(4):
        opt.zero_grad()
        if source == "microbatch":
            for xs, ys in zip(x.split(B // 2), y.split(B // 2)):
                (loss_fn(compiled(xs), ys) / 2).backward()
        else:
            loss_fn(compiled(x), y).backward()
        if step == 1:
            after_first = graphs()
        records.append(monitor.step())
        opt.step()
    monitor.close()
    assert graphs()[0] >= 1 and graphs() == after_first
    assert [r is not None for r in records] == [True, False, True, False]
    grads = ref.per_sample_grads(model, loss_fn, x, y)
    want = ref.group_noise_stats(grads, [B // 2] * 2 if source == "microbatch" else [1] * B)
    for r in records[::2]:
        assert r.raw.trace_cov == pytest.approx(want.total.trace_cov, rel=1e-9)
        assert set(r.raw.by_param) == set(dict(model.named_parameters()))


def test_in_place_compile_and_a_capture_inside_a_compiled_function_is_refused():
    model, x, y = build("mlp")
    want = ref.per_sample_sq_norms(model, loss_fn, x, y)
    model.compile()
    loss_fn(model(x), y).backward()
    model.zero_grad()
    with gradnoise.capture(model) as cap:
        loss_fn(model(x), y).backward()
    for n in want:
        torch.testing.assert_close(cap.per_sample_sq_norms[n], want[n], rtol=1e-9, atol=1e-12)

    @torch.compile
    def step(x, y):  # a capture cannot watch the graph it is part of: a clear error
        model.zero_grad()
        with gradnoise.capture(model) as inner:
            loss_fn(model(x), y).backward()
        return inner

    with pytest.raises(GradNoiseError, match="inside a torch.compile'd function"):
        step(x, y)

    monitor = gradnoise.NoiseMonitor(model, every=1)  # waiting: compiled code runs eagerly

    @torch.compile
    def train(x, y):  # so a whole compiled training step still works, eagerly
        model.zero_grad()
        loss_fn(model(x), y).backward()
        return monitor.step()

    try:
        rec = train(x, y)
    finally:
        monitor.close()
    grads = ref.per_sample_grads(model, loss_fn, x, y)
    assert rec.raw.trace_cov == pytest.approx(ref.noise_stats(grads).total.trace_cov, rel=1e-9)

    monitor = gradnoise.NoiseMonitor(model, every=2)
    try:
        train(x, y)  # step 0, measured: eagerly
        with pytest.raises(GradNoiseError, match="monitor stepped inside a torch.compile'd function"):
            train(x, y)  # step 1 runs compiled, and its step() would start waiting for step 2 inside the graph
    finally:
        monitor.close()
    assert _stance() == "default"


def test_without_compile_stances_a_compiled_model_is_refused(monkeypatch):
    model, x, y = build("mlp")
    compiled = torch.compile(model)
    monkeypatch.delattr(torch.compiler, "set_stance")
    with pytest.raises(GradNoiseError, match=r"torch >= 2\.6"):
        with gradnoise.capture(compiled):
            pass
    with gradnoise.capture(model) as cap:  # an uncompiled model needs no stance
        loss_fn(model(x), y).backward()
    assert set(cap.per_sample_sq_norms) == {n for n, _ in model.named_parameters()}


def _stance():
    from torch._dynamo.eval_frame import _stance as current
    return current.stance


def test_a_waiting_monitor_runs_compiled_code_eagerly_until_closed_or_collected():
    """From the ``monitor.step()`` before a measured step until that step's, compiled code
    runs eagerly; two monitors release in any order; a monitor never closed releases when
    it is garbage collected."""
    import copy
    import gc
    model, x, y = build("mlp")
    assert _stance() == "default"
    a = gradnoise.NoiseMonitor(model, every=2)  # step 0 is measured: waiting from here
    b = gradnoise.NoiseMonitor(copy.deepcopy(model), every=1)
    assert _stance() == "force_eager"
    loss_fn(model(x), y).backward()
    assert a.step() is not None and _stance() == "force_eager"  # b still waits
    a.close()
    del b
    gc.collect()
    assert _stance() == "default"
