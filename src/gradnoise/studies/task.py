"""What a study runs on: a model, a data set held in memory, and a loss.

The protocol for your own task (``gradnoise study --task package.module:function``, or
``--task path/to/file.py:function``): a
function with no required arguments that returns ``(model, dataset, loss_fn)``:

* ``model``: an ``nn.Module``, freshly initialised. Studies train copies of it, so
  every run starts from the same weights; ``torch.manual_seed(seed)`` is called before
  the function, so seed-dependent initialisation follows ``--seed``.
* ``dataset``: a pair of tensors ``(x, y)`` with the samples along dimension 0, or any
  map-style ``torch.utils.data.Dataset`` of ``(input, target)`` pairs with tensor
  entries (e.g. ``TensorDataset``); it is stacked into tensors once, so it must fit in
  memory. Studies draw batches from it without replacement.
* ``loss_fn(output, target)``: the loss averaged over the batch (``reduction="mean"``),
  e.g. ``torch.nn.functional.cross_entropy``. A loss summed over the batch is declared
  by returning a fourth element, ``(model, dataset, loss_fn, "sum")``; the studies then
  divide it by the batch size. The reduction is checked when the task loads (the loss of
  a batch repeated twice must equal the batch's loss for a mean, twice it for a sum), so
  a wrong declaration is an error, never a silently wrong number.

The model must be something the per-sample engine can measure (``gradnoise.capture``):
no BatchNorm in training mode, no other layer that mixes samples.
See ``examples/my_task.py``.
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .data import digits
from .models import build

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BUILTIN = {"digits-mlp": "mlp", "digits-cnn": "cnn", "pydoc-gpt": "gpt"}
DEFAULT_TASKS = ("digits-mlp", "digits-cnn")
LM_LENGTH = 64      # pydoc-gpt's sequence length (bytes)


@dataclass
class Task:
    """A model template, the whole data set and a mean-reduced loss.

    Attributes:
        name: used in file names and the report (letters, digits, ``-_.``).
        model: the initial model; :meth:`fresh_model` gives copies of it.
        x: inputs ``[N, ...]``; y: targets ``[N, ...]``.
        loss_fn: ``loss_fn(model(x_b), y_b)`` is the batch mean.
    """

    name: str
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    loss_fn: LossFn

    @property
    def size(self) -> int:
        """``N``, the number of samples."""
        return len(self.x)

    def fresh_model(self) -> nn.Module:
        """A copy of the initial model, in training mode."""
        return copy.deepcopy(self.model).train()


def builtin(name: str, seed: int = 0) -> Task:
    """``digits-mlp`` or ``digits-cnn``: the bundled digits with a built-in model;
    ``pydoc-gpt``: a small GPT on the byte windows of the standard library's
    documentation topics (:mod:`gradnoise.studies.gpt`)."""
    torch.manual_seed(seed)
    if name == "pydoc-gpt":
        from .gpt import TinyGPT, corpus_bytes, token_loss, windows

        x, y = windows(corpus_bytes(), LM_LENGTH)
        return Task(name, TinyGPT(LM_LENGTH), x, y, token_loss)
    x, y = digits()
    return Task(name, build(BUILTIN[name]), x, y, F.cross_entropy)


def _as_tensors(dataset) -> Tuple[torch.Tensor, torch.Tensor]:
    if isinstance(dataset, (tuple, list)) and len(dataset) == 2 and all(torch.is_tensor(t) for t in dataset):
        x, y = dataset
    else:
        try:
            n = len(dataset)
            pairs = [dataset[i] for i in range(n)]
            x = torch.stack([torch.as_tensor(p[0]) for p in pairs])
            y = torch.stack([torch.as_tensor(p[1]) for p in pairs])
        except Exception as e:
            raise ValueError("the dataset must be (x, y) tensors or a map-style Dataset of (input, target) "
                             f"tensor pairs ({type(e).__name__}: {e})") from None
    if len(x) != len(y):
        raise ValueError(f"the dataset's inputs and targets differ in length ({len(x)} vs {len(y)})")
    if len(x) < 4:
        raise ValueError(f"the dataset needs at least 4 samples, got {len(x)}")
    return x, y


REDUCTIONS = ("mean", "sum")


def _per_sample_mean(loss_fn: LossFn) -> LossFn:
    """A summed loss as a batch mean: ``loss_fn(out, y) / len(y)``."""
    def mean_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return loss_fn(output, target) / len(target)
    return mean_loss


@torch.no_grad()
def check_reduction(spec: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn,
                    declared: str) -> None:
    """Refuse a loss whose reduction is not the ``declared`` one.

    With samples ``i`` and the same samples twice, ``[i, i]``, a batch mean gives the same
    loss and a sum twice the loss (the model in eval mode, so dropout and BatchNorm do
    not differ between the two). Pairs of samples are tried until one has a loss ≠ 0.

    Raises:
        ValueError: the loss is a sum where a mean was declared (or the reverse), or
            neither; the message says how to declare it.
    """
    was_training = model.training
    model.eval()
    try:
        for start in range(0, min(len(x) - 1, 8), 2):
            i = torch.tensor([start, start + 1])
            once = float(loss_fn(model(x[i]), y[i]))
            twice = float(loss_fn(model(x[i.repeat(2)]), y[i.repeat(2)]))
            if math.isfinite(once) and once != 0.0 and math.isfinite(twice):
                break
        else:
            return  # a loss that is 0 (or not finite) everywhere: nothing to tell apart
    finally:
        model.train(was_training)
    ratio = twice / once
    found = "mean" if abs(ratio - 1) < 1e-3 else "sum" if abs(ratio - 2) < 1e-3 else None
    if found is None:
        raise ValueError(f"task {spec!r}: loss_fn is neither a batch mean nor a sum over samples (repeating "
                         f"the batch multiplied its loss by {ratio:.4g}); gradnoise needs one of the two")
    if found != declared:
        how = ("return (model, dataset, loss_fn, 'sum') from the task function to declare it, or use "
               "reduction='mean'") if found == "sum" else "drop the 'sum' declaration"
        raise ValueError(f"task {spec!r}: loss_fn is a {found} over the batch (repeating the batch multiplied "
                         f"its loss by {ratio:.3g}) but the task declares {declared!r}: {how}")


def _import(name: str):
    """A module by dotted name (the current folder is searched too, as ``python -m``
    does) or by file path ``path/to/file.py``."""
    if name.endswith(".py"):
        path = Path(name).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"no such file {name}")
        if str(path.parent) not in sys.path:  # its sibling modules import as in `python file.py`
            sys.path.insert(0, str(path.parent))
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(path.stem, None)
            raise
        return module
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    return importlib.import_module(name)


def load(spec: str, seed: int = 0) -> Task:
    """A built-in task name, ``package.module:function`` or ``path/file.py:function``
    (the protocol above).

    Raises:
        ValueError: a one-line reason when the spec is malformed, the module does not
            import, the function is missing or fails, or its result breaks the protocol.
    """
    if spec in BUILTIN:
        return builtin(spec, seed)
    if ":" not in spec and spec.endswith(".py"):
        raise ValueError(f"task {spec!r} names a file but not its function: use {spec}:function "
                         f"(e.g. {spec}:task)")
    if ":" not in spec:
        raise ValueError(f"unknown task {spec!r}: use one of {', '.join(BUILTIN)}, or your task as "
                         "path/to/file.py:function or package.module:function")
    mod_name, _, fn_name = spec.rpartition(":")
    try:
        module = _import(mod_name)
    except Exception as e:
        raise ValueError(f"task {spec!r}: cannot import {mod_name!r} ({type(e).__name__}: {e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"task {spec!r}: {mod_name!r} has no function {fn_name!r}")
    torch.manual_seed(seed)
    try:
        result = fn()
    except Exception as e:
        raise ValueError(f"task {spec!r} failed: {type(e).__name__}: {e}") from None
    if not (isinstance(result, (tuple, list)) and len(result) in (3, 4)):
        raise ValueError(f"task {spec!r} must return (model, dataset, loss_fn) or (model, dataset, loss_fn, "
                         f"reduction), got {type(result).__name__}")
    model, dataset, loss_fn = result[:3]
    reduction = result[3] if len(result) == 4 else "mean"
    if reduction not in REDUCTIONS:
        raise ValueError(f"task {spec!r}: the reduction must be 'mean' or 'sum', got {reduction!r}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"task {spec!r}: the model must be an nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise ValueError(f"task {spec!r}: loss_fn must be callable")
    x, y = _as_tensors(dataset)
    try:
        check_reduction(spec, model, x, y, loss_fn, reduction)
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"task {spec!r}: the model or loss_fn fails on a batch of the dataset "
                         f"({type(e).__name__}: {e})") from None
    if reduction == "sum":
        loss_fn = _per_sample_mean(loss_fn)
    stem = Path(mod_name).stem if mod_name.endswith(".py") else mod_name.rsplit(".", 1)[-1]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem if fn_name == "task" else fn_name)
    return Task(name, model, x, y, loss_fn)
