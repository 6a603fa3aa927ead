"""The transformers callback under the real ``transformers.Trainer`` on CPU (tiny GPT-2,
random init, float64): every record equals the oracle of tests/reference.py (rtol 1e-6;
transformers computes the causal-LM loss in float32, so agreement is ~1e-7) on the
weights and micro-batches the model saw, with gradient clipping and gradient
accumulation; metrics reach ``state.log_history`` and the other callbacks; checkpoints
carry the monitor's counter and averages; unsupported setups are refused.

CI installs transformers and accelerate and sets GRADNOISE_ZOO_REQUIRED=1, so there a
missing library fails instead of skipping."""
import gc
import importlib
import json
import os
import subprocess
import sys
import types
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import reference as ref
from gradnoise import GradNoiseError
from gradnoise.integrations import transformers as gt

RTOL = 1e-6
VOCAB, T, BATCH = 50, 8, 4


def _need(*libraries):
    for library in libraries:
        try:
            importlib.import_module(library)
        except ImportError:
            if os.environ.get("GRADNOISE_ZOO_REQUIRED"):
                raise
            pytest.skip(f"{library} is not installed")
    return importlib.import_module(libraries[0])


@pytest.fixture
def hf():
    return _need("transformers", "accelerate")


@pytest.fixture(scope="module", autouse=True)
def _quick_gc():
    """accelerate calls gc.collect() a few times per train(); with torch and transformers
    loaded each pass walks ~10⁶ objects (~0.4 s). The objects of the imported modules
    are left out of it."""
    try:
        from transformers import GPT2LMHeadModel, Trainer  # noqa: F401
    except ImportError:
        pass
    gc.freeze()
    yield
    gc.unfreeze()


# ---------------------------------------------------------------------------- helpers
class Tokens(torch.utils.data.Dataset):
    """``n`` random sequences of ``T`` tokens; the labels are the inputs (causal LM)."""

    def __init__(self, n=16, seed=0):
        self.ids = torch.randint(0, VOCAB, (n, T), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Seen:
    """Forward pre-hook of the test: the weights and inputs of every training call."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        if torch.is_grad_enabled():
            weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
            n = kwargs.get("num_items_in_batch")
            self.calls.append((weights, kwargs["input_ids"].clone(), None if n is None else float(n)))

    def steps(self, k):
        """The calls, ``k`` per optimizer step; the hook is removed (the oracle copies the model)."""
        self.handle.remove()
        return [self.calls[i : i + k] for i in range(0, len(self.calls), k)]


class ListSink:
    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(record)


def gpt2(hf, seed=0):
    torch.manual_seed(seed)
    cfg = hf.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=16,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return hf.GPT2LMHeadModel(cfg).double()


def trainer(hf, tmp_path, model, callbacks=(), data=None, **kw):
    opts = dict(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=BATCH,
                learning_rate=0.1, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                disable_tqdm=True, seed=0)
    opts.update(kw)
    return hf.Trainer(model=model, args=hf.TrainingArguments(**opts), train_dataset=data or Tokens(),
                      callbacks=list(callbacks))


def oracle(model, step, group_sizes=None):
    """Oracle statistics of one optimizer step, from its calls ``(weights, ids, N)``.

    Sample i's loss is ``l_i = B·w_i·ℓ̄_i`` (module docstring of the callback): with
    ``num_items_in_batch = N`` its summed token loss times ``B/N``; without it (the Trainer
    divides each micro-batch's mean loss by the step's ``k`` micro-batches) its summed
    token loss times ``B/(k·b_j·(T − 1))``.
    """
    model.load_state_dict(step[0][0])  # the micro-batches of a step share the weights
    B, k = sum(c[1].shape[0] for c in step), len(step)
    parts = []
    for _, ids, n in step:
        scale = B / n if n else B / (k * ids.shape[0] * (T - 1))

        def loss_fn(out, y, scale=scale):
            logits = out.logits[:, :-1].reshape(-1, VOCAB)
            return F.cross_entropy(logits, y[:, 1:].reshape(-1), reduction="sum") * scale

        parts.append(ref.per_sample_grads(model, loss_fn, ids, ids))
    grads = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    return ref.group_noise_stats(grads, group_sizes or [1] * B)


def assert_closed(model):
    """Nothing of gradnoise is left on the model: module and parameter hooks."""
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not any(p._backward_hooks or p._post_accumulate_grad_hooks for p in model.parameters())


def assert_matches(got, want, rtol=RTOL):
    assert got.trace_cov == pytest.approx(want.trace_cov, rel=rtol)
    assert got.grad_sq_norm == pytest.approx(want.grad_sq_norm, rel=rtol)


# ---------------------------------------------------------------------------- exactness
def test_per_sample_matches_oracle_through_clipping_and_reaches_the_logs(hf, tmp_path):
    model = gpt2(hf)
    seen, sink = Seen(model), ListSink()
    noise = gt.NoiseMonitorCallback(sinks=[sink], per_param=True)

    class Reporter(hf.TrainerCallback):  # stands for a report_to integration
        logs = []

        def on_log(self, args, state, control, logs=None, **kw):
            self.logs.append(dict(logs))

    tr = trainer(hf, tmp_path, model, [Reporter()], max_grad_norm=0.05)
    noise.attach(tr)
    tr.train()

    assert [r.step for r in sink.records] == [0, 1, 2] and noise.last is sink.records[-1]
    trained = {k: v.detach().clone() for k, v in model.named_parameters()}
    history = [e for e in tr.state.log_history if "loss" in e]
    assert all(e["grad_norm"] > 0.05 for e in history)  # clipping changed every gradient
    for rec, step in zip(sink.records, seen.steps(1)):
        want = oracle(model, step)
        assert rec.raw.batch_size == BATCH == rec.raw.n_groups
        assert_matches(rec.raw, want.total)
        for name in ("transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.ln_f.bias"):
            assert_matches(rec.raw.by_param[name], want.by_param[name])

    # each training log carries its step's metrics: log_history, and the callbacks after it
    for entry, reported, rec in zip(history, Reporter.logs, sink.records):
        assert entry["step"] == rec.step + 1
        assert entry["gradnoise/raw/trace_cov"] == pytest.approx(rec.raw.trace_cov, rel=1e-12)
        assert entry["gradnoise/b_simple"] == pytest.approx(rec.smoothed.b_simple, rel=1e-12)
        assert "gradnoise/trace_cov/transformer.wte.weight" in entry
        assert reported["gradnoise/grad_sq_norm"] == entry["gradnoise/grad_sq_norm"]
    summary = tr.state.log_history[-1]
    assert "train_runtime" in summary and not any(k.startswith("gradnoise/") for k in summary)
    assert_closed(model)
    # the optimizer got the clipped gradients: the weights are a plain run's (up to the
    # rounding of the capture engine's own gradients; unclipped ones would be ~20× off)
    plain = gpt2(hf)
    trainer(hf, tmp_path, plain, max_grad_norm=0.05).train()
    for name, q in plain.named_parameters():
        torch.testing.assert_close(trained[name], q, rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("source", ["per_sample", "microbatch"])
def test_torch_compile_is_measured_exactly(hf, tmp_path, source):
    """``torch_compile=True``: measured steps of the per-sample source run the compiled model
    eagerly, the others compiled; the micro-batch source measures compiled steps. Exact
    against the oracle."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    model = gpt2(hf)
    seen, sink = Seen(model), ListSink()
    k = 2 if source == "microbatch" else 1
    every = 1 if source == "microbatch" else 2
    tr = trainer(hf, tmp_path, model, [gt.NoiseMonitorCallback(source=source, every=every, sinks=[sink])],
                 torch_compile=True, gradient_accumulation_steps=k)
    tr.train()
    assert [r.step for r in sink.records] == list(range(0, 3, every))
    assert counters["stats"]["unique_graphs"] >= 1  # the unmeasured steps ran compiled
    steps = seen.steps(k)
    for rec in sink.records:
        want = oracle(model, steps[rec.step], [BATCH] * k if k > 1 else None)
        assert_matches(rec.raw, want.total)
    assert_closed(model)


@pytest.mark.parametrize("source, every", [("per_sample", 2), ("microbatch", 1)])
def test_gradient_accumulation_is_exact(hf, tmp_path, source, every):
    model = gpt2(hf)
    seen, sink = Seen(model), ListSink()
    noise = gt.NoiseMonitorCallback(source=source, every=every, sinks=[sink])
    tr = trainer(hf, tmp_path, model, [noise], max_steps=3, per_device_train_batch_size=2,
                 gradient_accumulation_steps=2, max_grad_norm=0.05)
    tr.train()

    assert [r.step for r in sink.records] == list(range(0, 3, every))
    # callbacks=[noise] (no attach): the history still gets each measured step's values, once
    logged = [e["step"] for e in tr.state.log_history if "gradnoise/raw/trace_cov" in e]
    assert logged == [r.step + 1 for r in sink.records]
    steps = seen.steps(2)
    for rec in sink.records:
        groups = [2, 2] if source == "microbatch" else None
        assert rec.raw.batch_size == 4 and rec.raw.n_groups == (2 if groups else 4)
        assert rec.passes == 2 and rec.tokens_per_sample == T and rec.lr is not None
        logged_loss = next(e["loss"] for e in tr.state.log_history if e.get("step") == rec.step + 1 and "loss" in e)
        assert rec.loss == pytest.approx(logged_loss, rel=1e-3)  # the Trainer's own (rounded in its log)
        assert_matches(rec.raw, oracle(model, steps[rec.step], groups).total)


def test_unequal_micro_batches_without_token_counts_warn_and_stay_exact(hf, tmp_path):
    model = gpt2(hf)
    model.accepts_loss_kwargs = False  # the Trainer then divides each micro-batch's mean loss by k
    seen, sink = Seen(model), ListSink()
    noise = gt.NoiseMonitorCallback(sinks=[sink])
    tr = trainer(hf, tmp_path, model, [noise], data=Tokens(6), max_steps=1, gradient_accumulation_steps=2)
    with pytest.warns(RuntimeWarning, match=r"sizes \[4, 2\]"):
        tr.train()
    (step,) = seen.steps(2)
    assert [c[1].shape[0] for c in step] == [4, 2] and step[0][2] is None
    assert_matches(sink.records[0].raw, oracle(model, step).total)


def test_bf16_autocast_needs_nothing(hf, tmp_path):
    model = gpt2(hf).float()
    seen, sink = Seen(model), ListSink()
    trainer(hf, tmp_path, model, [gt.NoiseMonitorCallback(sinks=[sink])], max_steps=1, bf16=True).train()
    # the oracle runs in float64 without autocast: agreement to bf16's precision
    assert_matches(sink.records[0].raw, oracle(model, seen.steps(1)[0]).total, rtol=2e-2)


# ---------------------------------------------------------------------------- checkpoints
def test_resume_restores_the_monitor_counter_and_averages(hf, tmp_path):
    opts = dict(max_steps=4, save_strategy="steps", save_steps=2)
    first = gt.NoiseMonitorCallback()
    trainer(hf, tmp_path, gpt2(hf), [first], **opts).train()
    whole = first.monitor.state_dict()
    assert whole["step"] == 4

    saved = json.loads((tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["gradnoise"]["step"] == 2

    sink = ListSink()
    again = gt.NoiseMonitorCallback(sinks=[sink])
    trainer(hf, tmp_path, gpt2(hf, seed=1), [again], **opts).train(
        resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert [r.step for r in sink.records] == [2, 3] and again.monitor.step_index == 4
    # the EMAs continued from the checkpoint: the same as the uninterrupted run's
    assert again.last.smoothed.trace_cov == pytest.approx(first.last.smoothed.trace_cov, rel=1e-9)
    assert again.last.smoothed.grad_sq_norm == pytest.approx(first.last.smoothed.grad_sq_norm, rel=1e-9)
    assert again.monitor.state_dict()["smoother"]["total"][0] == whole["smoother"]["total"][0] == 4


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("kw, source, match", [
    (dict(fp16=True), "per_sample", "fp16"),
    (dict(checkpointing=True), "per_sample", "gradient checkpointing"),
    ({}, "microbatch", "gradient_accumulation_steps ≥ 2"),
    ({}, "ddp", "source='ddp'"),
])
def test_unsupported_trainer_setups_are_refused(hf, tmp_path, kw, source, match):
    if "checkpointing" in kw:  # transformers 5 renamed the argument (the old name warns)
        fields = hf.TrainingArguments.__dataclass_fields__
        kw = {"activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing": True}
    model = gpt2(hf)
    tr = trainer(hf, tmp_path, model, [gt.NoiseMonitorCallback(source=source)], max_steps=1, **kw)
    with pytest.raises(GradNoiseError, match=match):
        tr.train()
    assert_closed(model)


@pytest.mark.parametrize("args, match", [
    (dict(deepspeed="ds.json"), "DeepSpeed"),
    (dict(fsdp=["full_shard"]), "FSDP"),
    (dict(parallelism_config=object()), "parallelism"),
    (dict(world_size=2), "2 processes"),
    (dict(n_gpu=2), "DataParallel"),
])
def test_sharded_and_multi_process_setups_are_refused(args, match):
    base = dict(world_size=1, n_gpu=1, gradient_accumulation_steps=1, max_grad_norm=1.0)
    with pytest.raises(GradNoiseError, match=match) as info:
        gt.check_setup(SimpleNamespace(**{**base, **args}), torch.nn.Linear(2, 2), "per_sample")
    assert "\n" not in str(info.value)


class IgnoresTokenCount(torch.nn.Module):
    """Takes ``**kwargs`` (so the Trainer passes ``num_items_in_batch`` and does not divide
    by the accumulation steps) but returns the plain mean loss of its micro-batch, as
    many classification heads do."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = torch.nn.Embedding(VOCAB, 8), torch.nn.Linear(8, VOCAB)

    def forward(self, input_ids, labels=None, **kwargs):
        logits = self.head(self.emb(input_ids).mean(1))
        return {"loss": F.cross_entropy(logits, labels[:, 0]), "logits": logits}


def test_a_model_ignoring_num_items_in_batch_is_refused_under_accumulation(hf, tmp_path):
    model = IgnoresTokenCount()
    tr = trainer(hf, tmp_path, model, [gt.NoiseMonitorCallback()], max_steps=1, gradient_accumulation_steps=2)
    with pytest.raises(GradNoiseError, match=r"by \[1\.0, 1\.0\], so its gradient is 2×"):
        tr.train()
    assert_closed(model)  # on the way out


# ---------------------------------------------------------------------------- packaging
def test_transformers_is_imported_only_on_use():
    code = (
        "import sys, gradnoise, gradnoise.integrations, gradnoise.integrations.transformers\n"
        "assert 'transformers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setattr(gt.CALLBACK, "built", None)
    with pytest.raises(ImportError, match=r"pip install gradnoise\[transformers\]"):
        gt.NoiseMonitorCallback


def test_old_transformers_is_refused(monkeypatch):
    old = types.ModuleType("transformers")
    old.__version__ = "4.44.0"
    old.TrainerCallback = type("TrainerCallback", (), {"on_optimizer_step": lambda self, *a, **k: None})
    monkeypatch.setitem(sys.modules, "transformers", old)
    with pytest.raises(ImportError, match=r"≥ 4\.45.*4\.44\.0"):
        gt.load_transformers()


def test_callback_is_a_trainer_callback_and_pickles(hf):
    import pickle

    cb = gt.NoiseMonitorCallback(source="microbatch", every=3)
    assert isinstance(cb, hf.TrainerCallback)
    back = pickle.loads(pickle.dumps(cb))
    assert type(back) is gt.NoiseMonitorCallback and back.every == 3 and back.source == "microbatch"
