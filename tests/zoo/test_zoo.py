"""The engine on the models people train: Hugging Face transformers, timm, torchvision
(small configurations, random init), each against the float64 brute-force oracle, with
``p.grad`` unchanged. CI installs the libraries and sets GRADNOISE_ZOO_REQUIRED=1, so
there a missing library fails instead of skipping."""
import copy
import importlib
import os

import pytest
import torch

import gradnoise
from reference import per_sample_sq_norms
from zoo_models import ZOO, build

B = 4


def _need(library: str) -> None:
    try:
        importlib.import_module(library)
    except ImportError:
        if os.environ.get("GRADNOISE_ZOO_REQUIRED"):
            raise
        pytest.skip(f"{library} is not installed")


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_matches_oracle(name):
    _need(ZOO[name][0])
    model, x, y, loss_fn = build(name, B)
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    plain = copy.deepcopy(model)
    loss_fn(plain(x), y).backward()
    with gradnoise.capture(model) as cap:
        loss_fn(model(x), y).backward()
    got = cap.per_sample_sq_norms
    want = per_sample_sq_norms(model, loss_fn, x, y)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k].double(), want[k], rtol=1e-6, atol=1e-12, msg=k)
    for (k, p), q in zip(model.named_parameters(), plain.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=k)
    assert cap.stats().batch_size == B
