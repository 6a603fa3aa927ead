"""The Lightning callback: one record per optimizer step, equal (float64, rtol 1e-6) to
the oracle of tests/reference.py on the weights and batches the LightningModule saw;
metrics reach Lightning's loggers; checkpoints carry the monitor's counter and EMAs;
gradient accumulation, loss scaling, bf16 autocast and DDP are handled."""
import contextlib
import csv
import json
import math
import os
import subprocess
import sys
import types

import pytest

pl = pytest.importorskip("lightning.pytorch")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402

import reference as ref  # noqa: E402
from gradnoise import GradNoiseError  # noqa: E402
from gradnoise.integrations import lightning as gl  # noqa: E402
from gradnoise.integrations.lightning import NoiseMonitorCallback  # noqa: E402
from gradnoise.monitor.smoother import NoiseSmoother  # noqa: E402

RTOL = 1e-6
BATCH = 8


def mse(out, y):
    """Mean over the batch of each sample's mean squared error: ``reduction="mean"``."""
    return F.mse_loss(out, y)


class Tiny(pl.LightningModule):
    """A small MLP; ``seen`` keeps the weights and batch of every training step."""

    def __init__(self, dtype=torch.float64, via_child=False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)
        self.via_child = via_child
        self.seen = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        weights = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        self.seen.append((weights, x.detach().clone(), y.detach().clone()))
        out = self.net(x) if self.via_child else self(x)
        return mse(out, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class ListSink:
    """Keeps every record the monitor writes."""

    def __init__(self):
        self.records = []

    def open(self, header):
        self.header = header

    def write(self, record):
        self.records.append(record)

    def close(self):
        pass


def data(n=32, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ds = TensorDataset(torch.randn(n, 5, generator=g, dtype=dtype), torch.randn(n, 3, generator=g, dtype=dtype))
    return DataLoader(ds, batch_size=BATCH, shuffle=False)


def trainer(tmp_path=None, callbacks=(), max_steps=4, logger=False, **kw):
    return pl.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=logger, callbacks=list(callbacks),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=1, default_root_dir=tmp_path, **kw,
    )


def model(seed=0, **kw):
    torch.manual_seed(seed)
    return Tiny(**kw)


def oracle(module, seen, group_sizes=None):
    """Oracle statistics of one optimizer step made of the micro-batches ``seen``."""
    net = module.net
    net.load_state_dict(seen[0][0])  # the weights of the step (its micro-batches share them)
    x = torch.cat([s[1] for s in seen]).double()
    y = torch.cat([s[2] for s in seen]).double()
    grads = ref.per_sample_grads(net, mse, x, y)
    return ref.group_noise_stats(grads, group_sizes or [1] * x.shape[0])


def assert_matches(rec_stats, want, rtol=RTOL):
    assert rec_stats.trace_cov == pytest.approx(want.trace_cov, rel=rtol)
    assert rec_stats.grad_sq_norm == pytest.approx(want.grad_sq_norm, rel=rtol)


# ---------------------------------------------------------------------------- sources
def test_per_sample_matches_oracle_each_step_and_logs(tmp_path):
    sink = ListSink()
    cb = NoiseMonitorCallback(source="per_sample", sinks=[sink, str(tmp_path / "run.jsonl")])
    m = model()
    tr = trainer(tmp_path, [cb], logger=CSVLogger(tmp_path, name="csv"))
    tr.fit(m, data())

    assert [r.step for r in sink.records] == [0, 1, 2, 3]
    assert cb.last is sink.records[-1] and cb.monitor.step_index == 4
    final = {k: v.clone() for k, v in m.net.state_dict().items()}
    for rec, seen in zip(sink.records, m.seen):
        assert rec.raw.batch_size == BATCH and rec.raw.n_groups == BATCH
        want = oracle(m, [seen])
        assert_matches(rec.raw, want.total)
        for name, s in want.by_param.items():
            assert_matches(rec.raw.by_param[f"net.{name}"], s)
    m.net.load_state_dict(final)

    # the run file, and the logger through log_dict
    lines = (tmp_path / "run.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["type"] == "header" and len(lines) == 5
    with open(os.path.join(tr.logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("noise/trace_cov")]
    assert [int(r["step"]) for r in logged] == [0, 1, 2, 3]
    wanted = {"noise/b_simple", "noise/grad_sq_norm", "noise/batch_size", "noise/trace_cov/net.0.weight"}
    assert wanted <= set(rows[0])
    assert float(logged[-1]["noise/trace_cov"]) == pytest.approx(cb.last.smoothed.trace_cov, rel=1e-6)
    assert "noise/trace_cov" in tr.callback_metrics


def test_microbatch_with_accumulation_matches_two_group_oracle():
    sink = ListSink()
    cb = NoiseMonitorCallback(source="microbatch", sinks=[sink], per_param=False)
    m = model()
    trainer(callbacks=[cb], max_steps=3, accumulate_grad_batches=2).fit(m, data())

    assert [r.step for r in sink.records] == [0, 1, 2]
    assert sink.header["optimizer"]["class"] == "SGD" and sink.header["optimizer"]["lr"] == 0.1
    for step, rec in enumerate(sink.records):
        assert rec.raw.n_groups == 2 and rec.raw.batch_size == 2 * BATCH and rec.passes == 2
        # the step's loss: the mean of its micro-batch losses, read from on_before_backward
        losses = []
        for weights, x, y in m.seen[2 * step : 2 * step + 2]:
            m.net.load_state_dict(weights)
            losses.append(float(mse(m.net(x), y)))
        assert rec.loss == pytest.approx(sum(losses) / 2, rel=1e-6) and rec.lr == 0.1
        want = oracle(m, m.seen[2 * step : 2 * step + 2], [BATCH, BATCH])
        assert_matches(rec.raw, want.total)
        for name, s in want.by_param.items():
            assert_matches(rec.raw.by_param[f"net.{name}"], s)


def test_per_sample_with_accumulation_sees_every_micro_batch():
    sink = ListSink()
    m = model()
    trainer(callbacks=[NoiseMonitorCallback(sinks=[sink], log=False)], max_steps=2,
            accumulate_grad_batches=2).fit(m, data())
    for step, rec in enumerate(sink.records):
        assert rec.raw.n_groups == rec.raw.batch_size == 2 * BATCH
        assert_matches(rec.raw, oracle(m, m.seen[2 * step : 2 * step + 2]).total)


@pytest.mark.parametrize("how", ["fit(torch.compile(module))", "compiled child"])
def test_compiled_module_is_measured_exactly(how):
    """Measured steps run the compiled code eagerly, the others compiled."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    sink, m = ListSink(), model()
    if how == "compiled child":
        m.net = torch.compile(m.net)
    trainer(callbacks=[NoiseMonitorCallback(every=2, sinks=[sink])], max_steps=3).fit(
        torch.compile(m) if how.startswith("fit") else m, data())
    assert [r.step for r in sink.records] == [0, 2]
    assert counters["stats"]["unique_graphs"] >= 1  # step 1 ran compiled
    for rec in sink.records:
        assert_matches(rec.raw, oracle(m, [m.seen[rec.step]]).total)
    torch._dynamo.reset()


def test_every_measures_only_some_steps():
    sink = ListSink()
    cb = NoiseMonitorCallback(every=2, sinks=[sink])
    trainer(callbacks=[cb], max_steps=5).fit(model(), data())
    assert [r.step for r in sink.records] == [0, 2, 4]
    assert cb.monitor.step_index == 5


def test_child_module_when_training_step_skips_forward():
    m = model(via_child=True)
    with pytest.raises(GradNoiseError, match="module="):
        trainer(callbacks=[NoiseMonitorCallback()], max_steps=1).fit(m, data())

    sink = ListSink()
    m = model(via_child=True)
    trainer(callbacks=[NoiseMonitorCallback(module="net", sinks=[sink])], max_steps=2).fit(m, data())
    assert len(sink.records) == 2
    assert set(sink.records[0].raw.by_param) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert_matches(sink.records[1].raw, oracle(m, [m.seen[1]]).total)


def test_ddp_source_needs_a_ddp_strategy():
    with pytest.raises(GradNoiseError, match="DDP strategy"):
        trainer(callbacks=[NoiseMonitorCallback(source="ddp")], max_steps=1).fit(model(), data())


def test_bad_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="source"):
        NoiseMonitorCallback(source="rank")
    with pytest.raises(ValueError, match="reduction"):
        NoiseMonitorCallback(reduction="median")


# ---------------------------------------------------------------------------- checkpoints
def test_checkpoint_resume_continues_the_monitor(tmp_path):
    first_sink = ListSink()
    first = NoiseMonitorCallback(sinks=[first_sink])
    tr = trainer(callbacks=[first], max_steps=4)
    tr.fit(model(), data())
    path = str(tmp_path / "four.ckpt")
    tr.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["callbacks"][first.state_key]["monitor"]
    assert saved == first.monitor.state_dict() and saved["step"] == 4

    resumed = ListSink()
    cb = NoiseMonitorCallback(sinks=[resumed])
    trainer(callbacks=[cb], max_steps=6).fit(model(seed=1), data(), ckpt_path=path)
    assert [r.step for r in resumed.records] == [4, 5]
    assert cb.monitor.step_index == 6
    # the EMAs go on from the checkpoint: the same as one smoother fed all six steps
    smoother = NoiseSmoother(0.95)
    for rec in first_sink.records + resumed.records:
        smoother.update(rec.raw)
        smoothed, interval = smoother.smoothed(rec.raw.batch_size, rec.raw.n_groups)
        assert rec.smoothed.trace_cov == pytest.approx(smoothed.trace_cov, rel=1e-12)
        assert rec.smoothed.grad_sq_norm == pytest.approx(smoothed.grad_sq_norm, rel=1e-12)
        assert rec.b_simple_interval == pytest.approx(interval, rel=1e-12, nan_ok=True)


def test_state_loaded_before_fit_is_kept_until_the_monitor_exists():
    cb = NoiseMonitorCallback()
    assert cb.state_dict() == {}
    donor = NoiseMonitorCallback()
    trainer(callbacks=[donor], max_steps=3).fit(model(), data())
    cb.load_state_dict(donor.state_dict())
    assert cb.state_dict() == donor.state_dict()
    sink = ListSink()
    cb.sinks = [sink]
    trainer(callbacks=[cb], max_steps=1).fit(model(), data())
    assert sink.records[0].step == 3


# ---------------------------------------------------------------------------- precision
class ScaleOnly(MixedPrecision):
    """Lightning's GradScaler path of ``precision="16-mixed"`` without autocast, so the
    float64 numbers stay exact: the loss is scaled and the gradients are unscaled before
    ``on_before_optimizer_step``."""

    def __init__(self, scale):
        super().__init__("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=scale))

    @contextlib.contextmanager
    def forward_context(self):
        yield


class GradProbe(pl.Callback):
    """Copies the gradients in ``on_before_optimizer_step``."""

    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append([p.grad.clone() for p in pl_module.parameters()])


@pytest.mark.parametrize("source,scale", [("per_sample", 2.0**7), ("microbatch", 96.0)])
def test_grad_scaler_scale_is_removed_and_gradients_untouched(source, scale):
    sink = ListSink()
    before, after = GradProbe(), GradProbe()
    m = model()
    trainer(callbacks=[before, NoiseMonitorCallback(source=source, sinks=[sink]), after],
            max_steps=2, accumulate_grad_batches=2, plugins=[ScaleOnly(scale)]).fit(m, data())
    assert len(sink.records) == 2
    for step, rec in enumerate(sink.records):
        assert rec.loss_scale == scale and not rec.skipped
        groups = [BATCH, BATCH] if source == "microbatch" else None
        assert_matches(rec.raw, oracle(m, m.seen[2 * step : 2 * step + 2], groups).total)
    for b, a in zip(before.grads, after.grads):
        for gb, ga in zip(b, a):
            assert torch.equal(gb, ga)


def test_bf16_mixed_gives_finite_records_near_the_oracle():
    sink = ListSink()
    m = model(dtype=torch.float32)
    trainer(callbacks=[NoiseMonitorCallback(sinks=[sink])], max_steps=2, precision="bf16-mixed").fit(
        m, data(dtype=torch.float32)
    )
    assert len(sink.records) == 2
    for rec, seen in zip(sink.records, m.seen):
        assert math.isfinite(rec.raw.trace_cov) and not rec.skipped
        assert rec.raw.trace_cov == pytest.approx(oracle(m, [seen]).total.trace_cov, rel=0.1)


# ---------------------------------------------------------------------------- DDP
class Dumped(Tiny):
    """Writes what each rank saw to ``<dump>_<rank>.pt`` when training ends."""

    def __init__(self, dump):
        super().__init__()
        self.dump = dump

    def on_train_end(self):
        torch.save(self.seen, f"{self.dump}_{self.global_rank}.pt")


@pytest.mark.skipif(
    sys.platform != "linux" or not torch.distributed.is_available(), reason="needs torch.distributed"
)
def test_ddp_sources_match_oracle(tmp_path):
    """Two CPU processes (gloo, spawned: after a torch.compile in this process a forked child
    cannot run autograd); both monitors at once on the DistributedDataParallel model."""
    torch.manual_seed(0)
    m = Dumped(str(tmp_path / "seen"))
    runs = {s: str(tmp_path / f"{s}.jsonl") for s in ("ddp", "per_sample")}
    callbacks = [NoiseMonitorCallback(source=s, sinks=[p], log=False) for s, p in runs.items()]
    tr = pl.Trainer(
        max_steps=1, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
        callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    tr.fit(m, data())

    seen = [torch.load(f"{m.dump}_{rank}.pt", weights_only=False)[0] for rank in (0, 1)]
    m.net.load_state_dict(seen[0][0])
    grads = ref.per_sample_grads(m.net, mse, torch.cat([s[1] for s in seen]), torch.cat([s[2] for s in seen]))
    for source, groups in (("ddp", [BATCH, BATCH]), ("per_sample", [1] * 2 * BATCH)):
        lines = [json.loads(s) for s in open(runs[source])]
        assert lines[0]["type"] == "header" and len(lines) == 2  # rank 0 only writes
        step = lines[1]
        assert step["n_groups"] == len(groups) and step["batch_size"] == 2 * BATCH
        want = ref.group_noise_stats(grads, groups)
        assert step["raw"]["trace_cov"] == pytest.approx(want.total.trace_cov, rel=RTOL)
        assert step["raw"]["grad_sq_norm"] == pytest.approx(want.total.grad_sq_norm, rel=RTOL)
        name = next(n for n in step["by_param"] if n.endswith("net.0.weight"))
        got = step["by_param"][name]["raw"]["trace_cov"]
        assert got == pytest.approx(want.by_param["0.weight"].trace_cov, rel=RTOL)


# ---------------------------------------------------------------------------- packaging
def test_lightning_is_imported_only_on_use():
    code = (
        "import sys, gradnoise, gradnoise.integrations, gradnoise.integrations.lightning\n"
        "assert not any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_lightning_names_the_extra(monkeypatch):
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install gradnoise\[lightning\]"):
        gl.load_lightning()


def test_pytorch_lightning_is_the_fallback(monkeypatch):
    fake = types.ModuleType("pytorch_lightning")
    for name in ("lightning", "lightning.pytorch"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "pytorch_lightning", fake)
    assert gl.load_lightning() is fake


def test_callback_is_a_lightning_callback_and_pickles():
    import pickle

    cb = NoiseMonitorCallback(source="microbatch", every=3)
    assert isinstance(cb, pl.Callback)
    back = pickle.loads(pickle.dumps(cb))
    assert type(back) is NoiseMonitorCallback and back.every == 3 and back.state_key == cb.state_key
