"""Small built-in models for 8×8 digit images ``[N, 1, 8, 8]`` -> logits ``[N, 10]``."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .names import MODEL_NAMES as MODELS


class LearnedPosition(nn.Module):
    """Adds a learned position embedding ``[T, d]`` to a sequence ``[N, T, d]`` (measured
    through the torch.func fallback, as any custom layer would be)."""

    def __init__(self, length: int, dim: int):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(length, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pos


class RowTransformer(nn.Module):
    """Reads the image as a sequence of its 8 rows: Linear embedding, learned positions,
    one pre-norm Transformer encoder layer, mean-pool, Linear classifier."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.position = LearnedPosition(8, dim)
        self.encoder = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.position(self.embed(x.reshape(x.shape[0], 8, 8)))
        return self.head(self.encoder(h).mean(1))


def build(name: str) -> nn.Module:
    """One of :data:`MODELS`, freshly initialised (seed torch first for repeatability)."""
    if name == "mlp":
        return nn.Sequential(OrderedDict(
            flatten=nn.Flatten(), fc1=nn.Linear(64, 128), act1=nn.ReLU(), fc2=nn.Linear(128, 64), act2=nn.ReLU(),
            head=nn.Linear(64, 10)))
    if name == "cnn":
        return nn.Sequential(OrderedDict(
            conv1=nn.Conv2d(1, 16, 3, padding=1), act1=nn.ReLU(), conv2=nn.Conv2d(16, 32, 3, padding=1),
            act2=nn.ReLU(), pool=nn.MaxPool2d(2), flatten=nn.Flatten(), fc=nn.Linear(32 * 4 * 4, 64),
            act3=nn.ReLU(), head=nn.Linear(64, 10)))
    if name == "transformer":
        return RowTransformer()
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
