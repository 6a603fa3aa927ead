"""Bad input gets a clear error or a flagged result, never a silent wrong number."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradnoise
from gradnoise.errors import (
    CaptureStateError,
    ReductionError,
    SampleMixingError,
    UnsupportedUseError,
)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def _batch(n=5):
    return torch.randn(n, 4), torch.randint(0, 3, (n,))


def test_batchnorm_in_training_mode_names_the_module():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    x, y = _batch()
    with pytest.raises(SampleMixingError, match=r"module '1' \(BatchNorm1d\).*microbatch"):
        with gradnoise.capture(model) as cap:
            F.cross_entropy(model(x), y).backward()
    assert cap._hooks == []  # removed although the block raised


def test_batchnorm_in_eval_mode_is_measured_exactly():
    from reference import per_sample_sq_norms

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        model[1].weight.uniform_(0.5, 2)
    model.eval()
    x, y = _batch()
    x = x.double()
    loss_fn = lambda out, t: F.cross_entropy(out, t)
    with gradnoise.capture(model) as cap:
        loss_fn(model(x), y).backward()
    ref = per_sample_sq_norms(model, loss_fn, x, y)
    for name, v in ref.items():
        torch.testing.assert_close(cap.per_sample_sq_norms[name], v, rtol=1e-6, atol=1e-12)


def test_functional_batch_norm_in_training_mode_is_refused():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(F.batch_norm(x, None, None, training=True))

    x, y = _batch()
    model = M()
    with pytest.raises(SampleMixingError, match="batch_norm in training mode"):
        with gradnoise.capture(model):
            F.cross_entropy(model(x), y).backward()


def test_batch_size_one_is_flagged_not_a_number():
    model = _mlp()
    x, y = _batch(1)
    with gradnoise.capture(model) as cap:
        F.cross_entropy(model(x), y).backward()
    s = cap.stats()
    assert s.flag == "single_group" and not s.ok
    assert "at least two" in s.reason
    assert math.isnan(s.trace_cov) and math.isnan(s.b_simple)
    assert all(v.shape == (1,) and torch.isfinite(v).all() for v in cap.per_sample_sq_norms.values())


def test_nan_in_the_loss_is_flagged_with_a_warning():
    model = _mlp()
    x, y = _batch()
    with pytest.warns(RuntimeWarning, match="NaN or inf"):
        with gradnoise.capture(model) as cap:
            (F.cross_entropy(model(x), y) * float("nan")).backward()
    s = cap.stats()
    assert s.flag == "non_finite" and "NaN" in s.reason
    assert math.isnan(s.b_simple)
    assert all(p.flag == "non_finite" for p in s.by_param.values())


def test_wrong_reduction_is_refused():
    model = _mlp()
    x, y = _batch()
    with pytest.raises(ReductionError, match="reduction='sum'"):
        with gradnoise.capture(model, reduction="mean"):
            F.cross_entropy(model(x), y, reduction="sum").backward()
    with pytest.raises(ReductionError, match="reduction='mean'"):
        with gradnoise.capture(model, reduction="sum"):
            F.cross_entropy(model(x), y).backward()
    with pytest.raises(ReductionError):
        with gradnoise.capture(model, reduction="sum"):
            F.cross_entropy(model(x), y, reduction="none").mean().backward()
    with pytest.raises(ValueError, match="'mean' or 'sum'"):
        gradnoise.capture(model, reduction="none")


class Centre(nn.Module):
    """Mixes samples: subtracts the batch mean."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return (x - x.mean(0)) * self.scale


class Total(nn.Module):
    """Returns something without a sample dimension."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return (x * self.w).sum(0)


class Noisy(nn.Module):
    """Draws random numbers in training mode."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return F.dropout(x * self.w, 0.5, training=True)


@pytest.mark.parametrize("layer, text", [
    (Centre, "Tensor.sub uses a value summed over the batch dimension"),
    (Total, "Tensor.pow uses a value summed over the batch dimension"),
])
def test_sample_mixing_after_a_parameter_is_refused(layer, text):
    """A reduction over the batch that meets per-sample data again (or goes through a
    non-linear map) makes each sample's loss depend on the others."""
    model = nn.Sequential(nn.Linear(4, 4), layer())
    x, _ = _batch()
    with pytest.raises(SampleMixingError, match=text):
        with gradnoise.capture(model, reduction="sum"):
            model(x).pow(2).sum().backward()


def test_dropout_in_training_mode_is_measured_with_its_mask():
    """Rules act on the real forward pass, so a random mask is part of each sample's
    computation: the per-sample norms equal those of the masked input without dropout."""
    torch.manual_seed(0)
    scale = Noisy()
    scale.w.data.normal_()
    x, _ = _batch()
    with gradnoise.capture(scale, reduction="sum") as cap:
        out = scale(x)
        out.pow(2).sum().backward()
    mask = (out.detach() != 0).float() * 2.0  # the realised mask, 1/(1 − p) = 2
    expected = ((2 * out.detach()) * x * mask).pow(2).sum(1)
    torch.testing.assert_close(cap.per_sample_sq_norms["w"], expected, rtol=1e-5, atol=1e-8)


def test_parameter_meeting_data_whose_samples_were_lost_names_it():
    """Data re-read by a reshape that splits each sample across rows meets a parameter:
    which sample uses which row cannot be told, and the error names the parameter, the op
    and the call that lost the samples. (Seq-first data reached by a transpose is exact:
    tests/capture/test_samples.py.)"""
    class Lost(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.pos = nn.Parameter(torch.zeros(3, 1, 4))

        def forward(self, x):  # x [B, T, d] read as [T, B, d] without a transpose
            return self.fc(x).reshape(x.shape[1], x.shape[0], -1) + self.pos

    model = Lost()
    x = torch.randn(5, 3, 4)
    with pytest.raises(UnsupportedUseError, match=r"'pos'.*cannot locate.*reshape"):
        with gradnoise.capture(model):
            model(x).pow(2).mean().backward()


def test_penalty_on_parameters_in_the_loss_is_refused():
    model = _mlp()
    x, y = _batch()
    with pytest.raises(UnsupportedUseError, match="'0.weight'.*summed over the batch|'0.weight'.*no tensor with a sample"):
        with gradnoise.capture(model):
            (F.cross_entropy(model(x), y) + 0.1 * model[0].weight.pow(2).sum()).backward()


def test_nested_capture_of_the_same_model_raises_and_cleans_up():
    model = _mlp()
    x, y = _batch()
    with gradnoise.capture(model) as outer:
        with pytest.raises(CaptureStateError, match="already open"):
            with gradnoise.capture(model):
                pass
        F.cross_entropy(model(x), y).backward()
    assert set(outer.per_sample_sq_norms) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    # afterwards a new capture works and plain autograd runs with no router left behind
    with gradnoise.capture(model) as again:
        F.cross_entropy(model(x), y).backward()
    assert again.stats().batch_size == 5


def test_results_before_exit_and_reentry_are_refused():
    model = _mlp()
    x, y = _batch()
    cap = gradnoise.capture(model)
    with cap:
        F.cross_entropy(model(x), y).backward()
        with pytest.raises(CaptureStateError, match="finished"):
            cap.per_sample_sq_norms
    with pytest.raises(CaptureStateError, match="only once"):
        with cap:
            pass


def test_no_backward_inside_the_block():
    model = _mlp()
    with gradnoise.capture(model) as cap:
        model(torch.randn(3, 4))
    assert cap.per_sample_sq_norms == {}
    with pytest.raises(CaptureStateError, match="backward"):
        cap.stats()


def test_hooks_and_router_removed_when_the_block_raises():
    model = nn.Sequential(nn.Linear(4, 4), nn.PReLU(), nn.Linear(4, 3))
    x, y = _batch()
    with pytest.raises(KeyError):
        with gradnoise.capture(model):
            model(x)
            raise KeyError("user error")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    from torch.overrides import _get_current_function_mode_stack

    assert not _get_current_function_mode_stack()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()  # plain autograd still works


def test_unbatched_input_is_refused():
    model = nn.Linear(4, 3)
    with pytest.raises(UnsupportedUseError, match="unbatched"):
        with gradnoise.capture(model):
            model(torch.randn(4)).sum().backward()


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)),  # 2-D hook route
    lambda: nn.Sequential(nn.Conv1d(4, 3, 1), nn.Flatten()),             # custom-Function route
])
def test_second_backward_through_the_same_graph_is_refused(make):
    model = make()
    x = torch.randn(5, 4, 1) if isinstance(model[0], nn.Conv1d) else torch.randn(5, 4)
    with pytest.raises(CaptureStateError, match="second backward"):
        with gradnoise.capture(model, reduction="sum"):
            loss = model(x).pow(2).sum()
            loss.backward(retain_graph=True)
            loss.backward()


def test_fsdp2_capture_follows_sharded_parameters_and_refuses_tensor_parallel():
    """FSDP2 (fully_shard) parameters are followed through their unsharded copies;
    a DTensor parameter outside FSDP2 (tensor parallelism) is refused by name."""
    import torch.distributed as dist

    fully_shard = pytest.importorskip("torch.distributed.fsdp").fully_shard
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
        sharded = copy.deepcopy(plain)
        fully_shard(sharded[0])
        fully_shard(sharded)
        x = torch.randn(5, 4, dtype=torch.float64)
        with gradnoise.capture(plain) as ref:
            plain(x).pow(2).mean().backward()
        with gradnoise.capture(sharded) as got:
            sharded(x).pow(2).mean().backward()
        assert set(got.per_sample_sq_norms) == set(ref.per_sample_sq_norms)
        for n, v in ref.per_sample_sq_norms.items():
            torch.testing.assert_close(got.per_sample_sq_norms[n], v, rtol=1e-12, atol=0)
        assert got.stats().trace_cov == pytest.approx(ref.stats().trace_cov, rel=1e-12)
        from torch.distributed.tensor import Replicate, distribute_tensor, init_device_mesh

        lin = nn.Linear(4, 3)  # tensor-parallel style: a DTensor parameter, no FSDP
        lin.weight = nn.Parameter(distribute_tensor(lin.weight.detach(), init_device_mesh("cpu", (1,)), [Replicate()]))
        with pytest.raises(UnsupportedUseError, match=r"'weight' is a DTensor .*not from fully_shard"):
            with gradnoise.capture(lin):
                pass
    finally:
        dist.destroy_process_group()
