"""Tiny, fast tasks for the study tests: a noisy linear classification problem and a
two-layer MLP (float32 for the studies, float64 where a study's numbers meet the oracle)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradnoise.studies.task import Task


def make_task(n: int = 256, seed: int = 0, classes: int = 3, dtype=torch.float32, name: str = "toy") -> Task:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=dtype)
    w = torch.randn(6, classes, generator=g, dtype=dtype)
    y = (x @ w + 0.5 * torch.randn(n, classes, generator=g, dtype=dtype)).argmax(1)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, classes)).to(dtype)
    return Task(name, model, x, y, F.cross_entropy)


def make_toy64(n: int = 300, classes: int = 3, seed: int = 0) -> Task:
    """The float64 toy task ``toy64`` (differences of weights and oracle checks exact enough)."""
    return make_task(n, seed, classes, torch.float64, "toy64")


@pytest.fixture
def toy64():
    """:func:`make_toy64`, to call (a fresh task each time)."""
    return make_toy64


@pytest.fixture
def toy():
    return make_task()
