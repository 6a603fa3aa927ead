"""Reference models and batches for the overhead benchmark.

Three problems, each a small classifier trained with mean cross-entropy:

* ``M1``: MLP 64→512→512→10 with ReLU, batch 128, input ``[128, 64]``.
* ``M2``: CNN Conv2d(1,32,3)-ReLU-Conv2d(32,64,3)-ReLU-MaxPool2d(2)-Flatten-
  Linear(9216,128)-ReLU-Linear(128,10) on ``[64, 1, 28, 28]``.
* ``M3``: Transformer classifier: Embedding(1000,128), two
  ``nn.TransformerEncoderLayer(128, nhead=4, dim_feedforward=256, batch_first=True,
  dropout=0)``, mean over the sequence, Linear(128,10); tokens ``[32, 64]``.

Everything is float32 and built from a seed, so every method of the benchmark starts
from the same weights and sees the same batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch
from torch import nn

NUM_CLASSES = 10


class MLP(nn.Module):
    """64→512→512→10 with ReLU. Input ``[B, 64]``, output ``[B, 10]``."""

    def __init__(self, d_in: int = 64, hidden: int = 512, n_out: int = NUM_CLASSES):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, n_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """Two 3×3 convolutions, max-pool, two Linear layers. Input ``[B, 1, 28, 28]``."""

    def __init__(self, n_out: int = NUM_CLASSES):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 12 * 12, 128),
            nn.ReLU(),
            nn.Linear(128, n_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerClassifier(nn.Module):
    """Embedding, encoder layers, mean-pool over tokens, Linear.

    Input: token ids ``[B, T]`` (int64). Output: logits ``[B, n_out]``.
    """

    def __init__(
        self,
        vocab: int = 1000,
        d_model: int = 128,
        nhead: int = 4,
        dim_feedforward: int = 256,
        num_layers: int = 2,
        n_out: int = NUM_CLASSES,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model,
                nhead,
                dim_feedforward=dim_feedforward,
                dropout=0.0,
                batch_first=True,
            )
            for _ in range(num_layers)
        )
        self.head = nn.Linear(d_model, n_out)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.head(h.mean(dim=1))


@dataclass(frozen=True)
class Problem:
    """One reference problem: a model factory and a batch factory."""

    name: str
    description: str
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[torch.Generator], Tuple[torch.Tensor, torch.Tensor]]


def _mlp_batch(g: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(128, 64, generator=g), torch.randint(0, NUM_CLASSES, (128,), generator=g)


def _cnn_batch(g: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.randn(64, 1, 28, 28, generator=g),
        torch.randint(0, NUM_CLASSES, (64,), generator=g),
    )


def _transformer_batch(g: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.randint(0, 1000, (32, 64), generator=g),
        torch.randint(0, NUM_CLASSES, (32,), generator=g),
    )


PROBLEMS: Dict[str, Problem] = {
    "M1": Problem("M1", "MLP 64-512-512-10, B=128", MLP, _mlp_batch),
    "M2": Problem("M2", "CNN 2xConv2d+pool+2xLinear, 1x28x28, B=64", CNN, _cnn_batch),
    "M3": Problem(
        "M3",
        "Transformer 2 layers d=128 h=4, T=64, B=32",
        TransformerClassifier,
        _transformer_batch,
    ),
}


def build(name: str, seed: int = 0) -> Tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Model (float32, train mode) and one fixed batch ``(x, y)`` for problem ``name``."""
    problem = PROBLEMS[name]
    torch.manual_seed(seed)
    model = problem.make_model().float().train()
    g = torch.Generator().manual_seed(seed + 1)
    x, y = problem.make_batch(g)
    return model, x, y
