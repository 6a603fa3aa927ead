"""Public names never shadow subpackages (DESIGN.md §3)."""
import importlib
import types

import torch
from torch import nn

import gradnoise


def test_capture_is_the_subpackage_and_opens_a_capture():
    assert isinstance(gradnoise.capture, types.ModuleType)
    linear = importlib.import_module("gradnoise.capture.linear")
    assert gradnoise.capture.linear is linear
    model = nn.Linear(3, 2)
    with gradnoise.capture(model, reduction="sum") as cap:
        model(torch.randn(4, 3)).sum().backward()
    assert isinstance(cap, gradnoise.Capture) and cap.batch_size == 4


def test_control_recommend_is_a_module():
    rec = importlib.import_module("gradnoise.control.recommend")
    assert gradnoise.control.recommend is rec
    assert gradnoise.control.advise is rec.advise
