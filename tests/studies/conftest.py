"""A tiny, fast task for the study tests: 256 samples of a noisy linear classification
problem and a two-layer MLP."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradnoise.studies.task import Task


def make_task(n: int = 256, seed: int = 0) -> Task:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    w = torch.randn(6, 3, generator=g)
    y = (x @ w + 0.5 * torch.randn(n, 3, generator=g)).argmax(1)
    torch.manual_seed(seed)
    return Task("toy", nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)), x, y, F.cross_entropy)


@pytest.fixture
def toy():
    return make_task()
