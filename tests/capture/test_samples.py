"""Samples followed, not guessed: a dimension that happens to equal the batch size is never
read as the samples, and data whose samples moved (transposes, reshapes, folds) is
measured where they went — exact against the float64 oracle, or a gradnoise error naming
the call that lost them; never a torch error or a wrong number."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradnoise
from checks import check_capture
from gradnoise.capture import layout as L
from gradnoise.capture.layout import Layout
from gradnoise.errors import GradNoiseError, UnsupportedUseError


def _check(model, x, y, loss_fn=None):
    loss_fn = loss_fn or (lambda out, t: F.mse_loss(out, t))
    model, x, y = model.double(), x.double(), y.double()
    check_capture(model, x, y, loss_fn)


CONVS = [
    (nn.Conv1d, (5,)), (nn.Conv2d, (4, 5)), (nn.Conv3d, (3, 4, 3)),
    (nn.ConvTranspose1d, (5,)), (nn.ConvTranspose2d, (4, 5)), (nn.ConvTranspose3d, (3, 4, 3)),
]


@pytest.mark.parametrize("conv, spatial", CONVS, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("batch", [2, 3, 4])
def test_batch_size_equal_to_channels(conv, spatial, batch):
    """3 input channels; batch 3 equals them (the ConvTranspose1d of the issue raised a
    torch error there), batch 2 and 4 do not."""
    torch.manual_seed(batch)
    kwargs = {"stride": 2, "output_padding": 1} if "Transpose" in conv.__name__ else {"padding": 1}
    model = nn.Sequential(conv(3, 2, 2, **kwargs), nn.Tanh())
    x = torch.randn(batch, 3, *spatial)
    y = torch.randn_like(model(x))
    _check(model, x, y)


@pytest.mark.parametrize("batch", [2, 3, 4])
def test_groupnorm_with_batch_equal_to_channels_and_groups(batch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Tanh(), nn.Conv2d(4, 3, 1))
    x = torch.randn(batch, 3, 4, 4)
    _check(model, x, torch.randn(batch, 3, 4, 4))


class SeqFirstLinear(nn.Module):
    """``[B, T, d]`` transposed to ``[T, B, d]``, then a Linear, a learned position per
    step ``[T, 1, d]``, a LayerNorm, and a Linear on the folded ``[T·B, d]``."""

    def __init__(self, T: int, d: int = 4):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.pos = nn.Parameter(torch.randn(T, 1, d))
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        h = self.norm(torch.tanh(self.fc(x.transpose(0, 1))) + self.pos)  # [T, B, d]
        return self.out(h.reshape(-1, h.shape[-1])).view(h.shape[0], h.shape[1], 3).transpose(0, 1)


@pytest.mark.parametrize("batch, T", [(2, 4), (3, 6), (4, 4), (5, 3)])
def test_linear_on_sequence_first_data(batch, T):
    """``T`` a multiple of ``B`` (or equal): read as ``k`` rows per sample, sample-major,
    this was silently wrong; followed through the transpose it is exact."""
    torch.manual_seed(T)
    model = SeqFirstLinear(T)
    x = torch.randn(batch, T, 4)
    _check(model, x, torch.randn(batch, T, 3))


class Unfollowable(nn.Module):
    """``[B, T, d]`` re-read as ``[T, B, d]`` by a view (not a transpose): every row of the
    result mixes pieces of different samples."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x.reshape(x.shape[1], x.shape[0], -1)).sum(0)


def test_samples_lost_in_a_reshape_is_an_error_naming_the_call():
    model = Unfollowable()
    x = torch.randn(2, 3, 4)
    with pytest.raises(UnsupportedUseError, match=r"F.linear.*reshape.*cannot follow"):
        with gradnoise.capture(model):
            model(x).pow(2).mean().backward()


class Picks(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.fc, self.how = nn.Linear(4, 4), how

    def forward(self, x):
        if self.how == "index":
            return self.fc(x[1:])            # drops a sample
        return self.fc(x.flip(0))            # reorders samples


@pytest.mark.parametrize("how", ["index", "flip"])
def test_samples_selected_or_reordered_are_an_error(how):
    model = Picks(how)
    with pytest.raises(GradNoiseError):
        with gradnoise.capture(model):
            model(torch.randn(3, 4)).pow(2).mean().backward()


# ---- the layout arithmetic alone ------------------------------------------------------------
def test_reshape_follows_folds_both_ways():
    n, T, d = 3, 4, 5
    assert L.reshaped(Layout(0), (n, T, d), (n * T, d), n) == Layout(0, 1, T)
    assert L.reshaped(Layout(1), (T, n, d), (T * n, d), n) == Layout(0, T, 1)
    assert L.reshaped(Layout(0, T, 1), (T * n, d), (T, n, d), n) == Layout(1)
    assert L.reshaped(Layout(0), (n, T, d), (n, T, 1, d), n) == Layout(0)
    assert L.reshaped(Layout(0), (2 * n, T), (n, 2 * T), 2 * n) is None  # samples split in two


def test_moves_and_contractions():
    lay = Layout(1)
    assert L.transposed(lay, 0, 1) == Layout(0)
    assert L.permuted(lay, (2, 0, 1)) == Layout(2)
    assert L.unsqueezed(lay, 0) == Layout(2)
    assert L.matmul_out(Layout(0), 3, 2, 3, first=True) == Layout(0)
    assert L.matmul_out(Layout(2), 3, 2, 3, first=True) is None  # contracted
    assert L.einsum_out(Layout(0), "btd,de->bte", 0) == Layout(0)
    assert L.einsum_out(Layout(0), "btd->td", 0) is None
    assert L.narrowed(Layout(0, 2, 1), 0, 3, 3, 6, 3) == Layout(0, 1, 1)
    assert L.narrowed(Layout(0), 0, 1, 2, 3, 3) is None


def test_to_samples_puts_each_samples_rows_together():
    n, T = 3, 2
    x = torch.arange(T * n).view(T, n)  # sample i at column i
    s = L.to_samples(x, Layout(1), n)
    assert s.shape == (n, 1, T) and all((s[i] == x[:, i]).all() for i in range(n))
    flat = x.reshape(-1)                 # [T·n], sample-minor
    s = L.to_samples(flat, Layout(0, T, 1), n)
    assert all(sorted(s[i].reshape(-1).tolist()) == sorted(x[:, i].tolist()) for i in range(n))


def test_a_sample_major_fold_is_seen_at_a_glance():
    """``stays`` with the sample count: a reshape whose dim 0 stays a multiple of the batch
    keeps the samples sample-major on dim 0 (nothing to record); any other goes to the
    full layout computation."""
    from gradnoise.capture.follow import stays
    x = torch.randn(4, 3, 2)
    for new in [(12, 2), (24,), (4, 6), (8, 3)]:
        out = x.reshape(new)
        assert stays(torch.Tensor.reshape, x, out, (x, new), {}, 4), new
        assert not stays(torch.Tensor.reshape, x, out, (x, new), {}) or new[0] == 4  # without n: same rows only
    out = x.reshape(3, 8)  # dim 0 no longer holds whole samples
    assert not stays(torch.Tensor.reshape, x, out, (x, (3, 8)), {}, 4)
    y = x.reshape(12, 2)
    assert stays(torch.Tensor.view, y, y.view(4, 3, 2), (y, (4, 3, 2)), {}, 4)  # unfolded back
    assert not stays(torch.Tensor.transpose, x, x.transpose(0, 1), (x, 0, 1), {}, 4)
