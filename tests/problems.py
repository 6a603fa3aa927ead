"""A shared table of small problems (model, batch, loss) for the capture tests.

Every problem's model maps a batch whose samples lie on dim 0 of every input to an
output whose samples lie on dim 0, with no mixing between samples. Losses come in two
reductions that agree on the per-sample loss ``l_i``:

* ``"mean"``: the batch loss is ``(1/B) Σ_i l_i`` (for a sequence, the mean over all
  ``B·T`` tokens, which is the mean of per-sequence token means);
* ``"sum"``: the batch loss is ``Σ_i l_i`` (the sum over all elements divided by the
  number of elements of one sample, so that ``l_i`` is still a per-sample mean).

On a batch of one both reductions return ``l_i``, which is what the oracle uses.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference import Inputs, LossFn, cast_floating

REDUCTIONS = ("mean", "sum")


# ------------------------------------------------------------------------------ losses
def cross_entropy(reduction: str) -> LossFn:
    """Cross-entropy with classes on the last dim: ``out [B, *T, C]``, ``y [B, *T]`` (long)."""
    _check(reduction)

    def loss(out: Tensor, y: Tensor) -> Tensor:
        if out.shape[:-1] != y.shape:
            raise ValueError(f"cross_entropy: output {tuple(out.shape)} vs targets {tuple(y.shape)}")
        flat_out, flat_y = out.reshape(-1, out.shape[-1]), y.reshape(-1)
        if reduction == "mean":
            return F.cross_entropy(flat_out, flat_y)
        per_sample = y[0].numel()  # tokens per sample
        return F.cross_entropy(flat_out, flat_y, reduction="sum") / per_sample

    return loss


def mse(reduction: str) -> LossFn:
    """Mean squared error; ``l_i`` is the mean over the elements of sample ``i``."""
    _check(reduction)

    def loss(out: Tensor, y: Tensor) -> Tensor:
        if out.shape != y.shape:
            raise ValueError(f"mse: output {tuple(out.shape)} vs targets {tuple(y.shape)}")
        if reduction == "mean":
            return F.mse_loss(out, y)
        per_sample = out[0].numel()
        return F.mse_loss(out, y, reduction="sum") / per_sample

    return loss


def _check(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


# ------------------------------------------------------------------------------ table
@dataclass(frozen=True)
class Problem:
    """One row of the table.

    Attributes:
        name: the test id.
        make_model: builds the model (float32, random init from the global seed).
        make_batch: ``B -> (inputs, targets)``; inputs a tensor or a tuple of tensors.
        make_loss: ``reduction -> loss_fn(output, targets)`` (:func:`cross_entropy`, :func:`mse`).
        dropout_free: the model's output is deterministic in training mode.
    """

    name: str
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[int], Tuple[Inputs, Tensor]]
    make_loss: Callable[[str], LossFn]
    dropout_free: bool = True

    @property
    def seed(self) -> int:
        return zlib.crc32(self.name.encode())

    def build(
        self, batch_size: int, dtype: torch.dtype = torch.float64, seed: int = 0
    ) -> Tuple[nn.Module, Inputs, Tensor]:
        """A seeded ``(model, inputs, targets)`` in ``dtype`` (integer tensors kept).

        The model depends on ``seed`` and the name only, not on ``batch_size``.
        """
        torch.manual_seed(self.seed + seed)
        model = self.make_model().to(dtype)
        torch.manual_seed(self.seed + seed + 7919 * batch_size + 1)
        inputs, targets = self.make_batch(batch_size)
        return model, cast_floating(inputs, dtype), cast_floating(targets, dtype)


# --------------------------------------------------------------------- batch factories
def _normal(*shape: int) -> Callable[[int], Tensor]:
    return lambda B: torch.randn(B, *shape)


def classes(x_shape: Tuple[int, ...], y_shape: Tuple[int, ...], n_classes: int):
    """Gaussian inputs ``[B, *x_shape]``, class targets ``[B, *y_shape]``."""
    return lambda B: (torch.randn(B, *x_shape), torch.randint(0, n_classes, (B, *y_shape)))


def regression(x_shape: Tuple[int, ...], y_shape: Tuple[int, ...]):
    """Gaussian inputs ``[B, *x_shape]`` and targets ``[B, *y_shape]``."""
    return lambda B: (torch.randn(B, *x_shape), torch.randn(B, *y_shape))


def token_ids(vocab: int, T: int, pad: int) -> Callable[[int], Tensor]:
    """Ids ``[B, T]`` where every sample holds ``pad`` (position 0) and a repeated id
    (positions 1 and 2)."""

    def make(B: int) -> Tensor:
        ids = torch.randint(0, vocab, (B, T))
        ids[:, 0] = pad
        ids[:, 2] = ids[:, 1]
        return ids

    return make


# ---------------------------------------------------------------------- custom models
class SeqFirstAttention(nn.Module):
    """Self-attention with ``batch_first=False``: takes ``[B, T, d]`` and transposes, so
    the attention module sees the batch on dim 1."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads)

    def forward(self, x: Tensor) -> Tensor:
        x = x.transpose(0, 1)
        return self.attn(x, x, x, need_weights=False)[0].transpose(0, 1)


class SelfAttention(nn.Module):
    """``batch_first=True`` self-attention, optionally with a key padding mask."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, x: Tensor, key_padding_mask: Tensor = None) -> Tensor:
        return self.attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)[0]


class CrossAttention(nn.Module):
    """Queries from ``x``; keys from ``k`` and values from ``v`` (other sequences)."""

    def __init__(self, d: int, heads: int, kdim: int = None, vdim: int = None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True, kdim=kdim, vdim=vdim)

    def forward(self, x: Tensor, k: Tensor, v: Tensor = None) -> Tensor:
        return self.attn(x, k, k if v is None else v, need_weights=False)[0]


class RNNOutput(nn.Module):
    """A recurrent layer (``batch_first=True``); the loss sees the output sequence and,
    with ``use_h_n``, the final hidden states of every layer as extra positions."""

    def __init__(self, rnn: nn.RNNBase, use_h_n: bool = False) -> None:
        super().__init__()
        self.rnn, self.use_h_n = rnn, use_h_n

    def forward(self, x: Tensor) -> Tensor:
        out, h = self.rnn(x)
        if not self.use_h_n:
            return out
        h_n = h[0] if isinstance(h, tuple) else h  # [layers, B, H]
        return torch.cat([out, h_n.transpose(0, 1)], dim=1)


class LearnedPosition(nn.Module):
    """Adds a learned positional embedding ``pos [T, d]`` to ``x [B, T, d]``."""

    def __init__(self, T: int, d: int) -> None:
        super().__init__()
        self.pos = nn.Parameter(0.5 * torch.randn(T, d))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.pos


class MatMul(nn.Module):
    """Uses its parameter directly: ``tanh(x @ W)`` with ``W [d_in, d_out]``."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(d_in, d_out) / d_in**0.5)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.W)


class TiedLM(nn.Module):
    """Embedding and output layer share one weight (``lm_head.weight = emb.weight``)."""

    def __init__(self, vocab: int, d: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mid = nn.Linear(d, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.lm_head(torch.tanh(self.mid(self.emb(ids))))


class LinearTwice(nn.Module):
    """One ``nn.Linear`` applied twice: ``lin(tanh(lin(x)))``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(torch.tanh(self.lin(x)))


class WithUnused(nn.Module):
    """Owns a Linear and a bare parameter that the forward never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(5, 3)
        self.unused = nn.Linear(5, 3)
        self.stray = nn.Parameter(torch.randn(4))

    def forward(self, x: Tensor) -> Tensor:
        return self.used(x)


def frozen_mlp() -> nn.Module:
    """An MLP whose first weight and last bias are frozen (their siblings train)."""
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    model[0].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    return model


def embedding_head(vocab: int, d: int, n_classes: int, padding_idx=None) -> nn.Module:
    return nn.Sequential(nn.Embedding(vocab, d, padding_idx=padding_idx), nn.Tanh(),
                         nn.Linear(d, n_classes))


def _pair(*makers: Callable[[int], Tensor]) -> Callable[[int], Tuple[Tensor, ...]]:
    return lambda B: tuple(m(B) for m in makers)


def _with_targets(make_inputs, make_targets):
    return lambda B: (make_inputs(B), make_targets(B))


def _padding_mask(T: int) -> Callable[[int], Tensor]:
    """A bool mask ``[B, T]`` (True = ignore); position 0 is never masked."""

    def make(B: int) -> Tensor:
        mask = torch.rand(B, T) < 0.4
        mask[:, 0] = False
        return mask

    return make


# ----------------------------------------------------------------------------- problems
PROBLEMS = [
    # Linear
    Problem("linear_mlp", lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)),
            classes((5,), (), 3), cross_entropy),
    Problem("linear_nobias", lambda: nn.Linear(5, 3, bias=False), classes((5,), (), 3), cross_entropy),
    Problem("linear_seq", lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)),
            classes((6, 4), (6,), 3), cross_entropy),
    Problem("linear_seq2d", lambda: nn.Linear(4, 3), regression((3, 5, 4), (3, 5, 3)), mse),
    # Convolutions
    Problem("conv1d", lambda: nn.Conv1d(3, 4, 3), regression((3, 10), (4, 8)), mse),
    Problem("conv1d_stride_pad", lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1),
            regression((3, 10), (4, 5)), mse),
    Problem("conv2d_stride2_pad1", lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1),
            regression((3, 8, 8), (4, 4, 4)), mse),
    Problem("conv2d_dilation2", lambda: nn.Conv2d(3, 4, 3, dilation=2),
            regression((3, 9, 9), (4, 5, 5)), mse),
    Problem("conv2d_groups2", lambda: nn.Conv2d(4, 6, 3, groups=2),
            regression((4, 7, 7), (6, 5, 5)), mse),
    Problem("conv2d_same", lambda: nn.Conv2d(3, 4, (3, 4), padding="same"),
            regression((3, 6, 7), (4, 6, 7)), mse),
    Problem("conv2d_nobias", lambda: nn.Conv2d(3, 4, 3, bias=False),
            regression((3, 6, 6), (4, 4, 4)), mse),
    Problem("conv3d", lambda: nn.Conv3d(2, 3, 2), regression((2, 4, 4, 4), (3, 3, 3, 3)), mse),
    Problem("conv_transpose2d",
            lambda: nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1),
            regression((3, 4, 4), (2, 8, 8)), mse),
    # Embeddings
    Problem("embedding_padding_idx", lambda: nn.Embedding(7, 4, padding_idx=0),
            _with_targets(token_ids(7, 6, pad=0), _normal(6, 4)), mse),
    Problem("embedding_head", lambda: embedding_head(7, 4, 3),
            _with_targets(token_ids(7, 6, pad=3), lambda B: torch.randint(0, 3, (B, 6))),
            cross_entropy),
    # Normalisation
    Problem("layernorm", lambda: nn.LayerNorm(6), regression((4, 6), (4, 6)), mse),
    Problem("groupnorm", lambda: nn.GroupNorm(2, 4), regression((4, 5, 5), (4, 5, 5)), mse),
    Problem("rmsnorm", lambda: nn.RMSNorm(6, eps=1e-5), regression((4, 6), (4, 6)), mse),
    Problem("instancenorm2d", lambda: nn.InstanceNorm2d(3, affine=True),
            regression((3, 4, 5), (3, 4, 5)), mse),
    # Attention
    Problem("mha_self_batch_first", lambda: SelfAttention(8, 2), regression((5, 8), (5, 8)), mse),
    Problem("mha_self_seq_first", lambda: SeqFirstAttention(8, 2), regression((5, 8), (5, 8)), mse),
    Problem("mha_cross", lambda: CrossAttention(8, 2),
            _with_targets(_pair(_normal(4, 8), _normal(6, 8)), _normal(4, 8)), mse),
    Problem("mha_cross_kdim_vdim", lambda: CrossAttention(8, 2, kdim=5, vdim=6),
            _with_targets(_pair(_normal(4, 8), _normal(6, 5), _normal(6, 6)), _normal(4, 8)), mse),
    Problem("mha_key_padding_mask", lambda: SelfAttention(8, 2),
            _with_targets(_pair(_normal(6, 8), _padding_mask(6)), _normal(6, 8)), mse),
    Problem("transformer_encoder_layer",
            lambda: nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True),
            regression((5, 8), (5, 8)), mse),
    # Recurrent
    Problem("gru", lambda: RNNOutput(nn.GRU(4, 5, batch_first=True)), regression((6, 4), (6, 5)), mse),
    Problem("lstm", lambda: RNNOutput(nn.LSTM(4, 5, batch_first=True)), regression((6, 4), (6, 5)), mse),
    Problem("gru_2layer_h_n", lambda: RNNOutput(nn.GRU(4, 5, num_layers=2, batch_first=True), use_h_n=True),
            regression((6, 4), (8, 5)), mse),
    # Other layers
    Problem("prelu", lambda: nn.PReLU(4), regression((4, 5), (4, 5)), mse),
    Problem("bilinear", lambda: nn.Bilinear(3, 4, 5),
            _with_targets(_pair(_normal(3), _normal(4)), lambda B: torch.randint(0, 5, (B,))),
            cross_entropy),
    Problem("learned_position", lambda: nn.Sequential(LearnedPosition(5, 4), nn.Tanh(), nn.Linear(4, 3)),
            classes((5, 4), (5,), 3), cross_entropy),
    Problem("param_matmul", lambda: MatMul(4, 3), regression((5, 4), (5, 3)), mse),
    # Parameter sharing, freezing, unused parameters
    Problem("tied_embedding", lambda: TiedLM(7, 4),
            _with_targets(token_ids(7, 5, pad=2), lambda B: torch.randint(0, 7, (B, 5))),
            cross_entropy),
    Problem("linear_twice", lambda: LinearTwice(4), classes((5, 4), (5,), 4), cross_entropy),
    Problem("frozen", frozen_mlp, classes((5,), (), 3), cross_entropy),
    Problem("unused_param", WithUnused, regression((5,), (3,)), mse),
]

BY_NAME: Dict[str, Problem] = {p.name: p for p in PROBLEMS}
assert len(BY_NAME) == len(PROBLEMS), "problem names must be unique"
