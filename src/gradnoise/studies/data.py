"""Built-in data: scikit-learn's bundled handwritten digits (1,797 images of 8×8
pixels, 10 classes), shipped inside the package, so nothing is downloaded."""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch


def digits() -> Tuple[torch.Tensor, torch.Tensor]:
    """All digits as ``(x, y)``: ``x`` ``[1797, 1, 8, 8]`` float32 in [0, 1], ``y``
    ``[1797]`` int64 class labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images / 16.0).astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    return x, y


def sample_batch(x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator):
    """A batch of ``batch_size`` distinct samples drawn uniformly without replacement."""
    if not 1 <= batch_size <= len(y):
        raise ValueError(f"batch size must be between 1 and {len(y)}, got {batch_size}")
    idx = torch.randperm(len(y), generator=generator)[:batch_size]
    return x[idx], y[idx]
