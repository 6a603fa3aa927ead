"""The comparison every capture test makes: per-sample squared norms of one forward and
backward pass under ``gradnoise.capture`` against the float64 oracle (``reference.py``)."""
from __future__ import annotations

from typing import Dict

import torch

import gradnoise
import reference as R


def assert_norms_match(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor], rtol: float = 1e-7) -> None:
    """Same parameters, each ``[B]`` within ``rtol`` (and 1e-12 of its largest value)."""
    assert set(got) == set(want)
    for k, w in want.items():
        torch.testing.assert_close(got[k].double(), w, rtol=rtol, atol=1e-12 * float(w.max()), msg=k)


def check_capture(model, x, y, loss_fn, rtol: float = 1e-7, **capture_kw) -> Dict[str, torch.Tensor]:
    """Capture one pass of ``loss_fn(model(x), y)`` and compare with the oracle; the norms."""
    with gradnoise.capture.Capture(model, **capture_kw) as cap:
        loss_fn(R.call(model, x), y).backward()
    got = cap.per_sample_sq_norms
    assert_norms_match(got, R.per_sample_sq_norms(model, loss_fn, x, y), rtol)
    return got
