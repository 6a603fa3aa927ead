"""The launch-bound regime: tiny tensors, where a step's time is per-call host work, as on
a GPU whose kernels take a few microseconds each.

    python benchmarks/launchbound.py [--models gpt2,token-mlp,gn-resnet] [--repeats 40] [--json PATH]

Models (random init, float32, dropout 0):

* ``gpt2``: Hugging Face GPT-2, 12 layers, width 32, 2 heads, vocabulary 128, batch 2 × 16;
* ``token-mlp``: 12 pre-norm token-MLP blocks of width 32 with a learned position
  parameter added directly, batch 4 × 16;
* ``gn-resnet``: 6 GroupNorm residual blocks of 8 channels at 8 × 8, batch 4.

Variants of one training step (``zero_grad`` → forward → mean cross-entropy → backward):
``plain``; ``capture`` (every step inside ``gradnoise.capture``, norms read);
``monitor/10`` (``NoiseMonitor(source="per_sample", every=10)``: ten steps against ten
plain ones); floors: ``mode-only`` (a torch-function mode that passes every call through),
``module-hooks`` (a do-nothing full backward hook on every module) and ``leaf-hooks`` (the
least a plan-once engine would install: on every module holding parameters a forward hook
that puts a do-nothing tensor hook on its output, with no per-sample work at all). Time: rounds in
which every variant runs once in a rotating order; the ratio of medians to plain.
Kernels: the non-view aten operations one step dispatches (a dispatch mode counting).
Phases: the median time of opening the capture, forward, backward and closing it.
"""
from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_models, setup_path, time_rotating  # noqa: E402

setup_path()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import gradnoise  # noqa: E402
import zoo_models  # noqa: E402  (tests/zoo_models.py)

MODELS = ("gpt2", "token-mlp", "gn-resnet")


class TokenMLP(nn.Module):
    """Pre-norm token-MLP blocks over ``[B, T, d]`` tokens with a learned position parameter."""

    def __init__(self, vocab=64, T=16, d=32, blocks=12):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.02 * torch.randn(T, d))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)) for _ in range(blocks))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        h = self.embed(ids) + self.pos
        for b in self.blocks:
            h = h + b(h)
        return self.head(h)


class GNBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.n1 = nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(2, c)
        self.conv2, self.n2 = nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(2, c)

    def forward(self, x):
        return F.relu(x + self.n2(self.conv2(F.relu(self.n1(self.conv1(x))))))


def gn_resnet(c=8, blocks=6, classes=10):
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), *[GNBlock(c) for _ in range(blocks)],
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))


def build(name: str) -> Tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """``(model, inputs, targets)``; a token model's targets are its ids."""
    torch.manual_seed(0)
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel
        cfg = GPT2Config(vocab_size=128, n_positions=16, n_embd=32, n_layer=12, n_head=2,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        ids = torch.randint(0, 128, (2, 16))
        return zoo_models.Logits(GPT2LMHeadModel(cfg)), ids, ids
    if name == "token-mlp":
        ids = torch.randint(0, 64, (4, 16))
        return TokenMLP(), ids, ids
    return gn_resnet(), torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))


def loss_fn(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


class _PassThrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class KernelCount(TorchDispatchMode):
    """Counts the non-view aten operations dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.n += 1
        return func(*args, **(kwargs or {}))


def _tensor_hook(module, args, out) -> None:
    if isinstance(out, torch.Tensor) and out.requires_grad:
        out.register_hook(lambda d: None)


def variants(model: nn.Module, x, y) -> Dict[str, Callable[[], None]]:
    """Name -> one step (``monitor/10``: ten steps)."""
    def plain(m=model):
        m.zero_grad(set_to_none=True)
        loss_fn(m(x), y).backward()

    def capture():
        model.zero_grad(set_to_none=True)
        with gradnoise.capture(model) as cap:
            loss_fn(model(x), y).backward()
        torch.stack([v.sum() for v in cap.per_sample_sq_norms.values()]).sum()

    def mode_only():
        with _PassThrough():
            plain()

    def hooked(add: Callable[[nn.Module], List]) -> Callable[[], None]:
        """A plain step with ``add(module)``'s hooks on every module, removed after it."""
        def step():
            hooks = [h for m in model.modules() for h in add(m)]
            try:
                plain()
            finally:
                for h in hooks:
                    h.remove()
        return step

    module_hooks = hooked(lambda m: [m.register_full_backward_hook(lambda *a: None)])
    leaf_hooks = hooked(lambda m: [m.register_forward_hook(_tensor_hook)]
                        if next(m.parameters(recurse=False), None) is not None else [])

    monitor10 = monitored_block(model, x, y, "per_sample", 10)

    def plain10():
        for _ in range(10):
            plain()

    return {"plain": plain, "capture": capture, "mode-only": mode_only, "module-hooks": module_hooks,
            "leaf-hooks": leaf_hooks, "plain/10": plain10, "monitor/10": monitor10}


def monitored_block(model: nn.Module, x, y, source: str, every: int, compile_it: bool = False) -> Callable[[], None]:
    """Ten steps (one when ``every`` is 1) of a copy of ``model`` (``torch.compile``d with
    ``compile_it``) under ``NoiseMonitor(source=source, every=every)``. One step is run
    first, untimed, so that each block of ten ends with its measured step: a per-sample
    monitor runs compiled code eagerly from the ``monitor.step()`` before a measured step
    until that step's, a window that then stays inside the block."""
    inner = copy.deepcopy(model)  # its own copy, so the monitor's hooks act on no other variant
    run = torch.compile(inner) if compile_it else inner
    monitor = gradnoise.NoiseMonitor(run, source=source, every=every)

    def one():
        inner.zero_grad(set_to_none=True)
        if source == "microbatch":  # it needs ≥ 2 backward passes a step
            for part in halves(x, y):
                (loss_fn(run(part[0]), part[1]) / 2).backward()
        else:
            loss_fn(run(x), y).backward()
        monitor.step()

    one()

    def block():
        for _ in range(10 if every == 10 else 1):
            one()
    return block


def halves(x, y):
    """The batch as two micro-batches of equal size (a batch of even size)."""
    h = x.shape[0] // 2
    return [(x[:h], y[:h]), (x[h:], y[h:])]


def kernels(fn: Callable[[], None]) -> int:
    with KernelCount() as k:
        fn()
    return k.n


PHASES = ("open", "forward", "backward", "close")


def phases(model: nn.Module, x, y, capture: bool) -> List[float]:
    """Seconds of one step's phases: opening the capture, forward and loss, backward,
    closing the capture and reading its norms (plain: the open and close phases are 0)."""
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    cap = gradnoise.capture(model) if capture else None
    if cap is not None:
        cap.__enter__()
    t1 = time.perf_counter()
    loss = loss_fn(model(x), y)
    t2 = time.perf_counter()
    loss.backward()
    t3 = time.perf_counter()
    if cap is not None:
        cap.__exit__(None, None, None)
        cap.per_sample_sq_norms
    return [t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t3]


def bench(name: str, repeats: int, warmup: int) -> dict:
    model, x, y = build(name)
    fns = variants(model, x, y)
    counts = {k: kernels(fns[k]) for k in ("plain", "capture")}
    times = time_rotating(fns, repeats, warmup)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = {k: med[k] / med["plain"] for k in ("capture", "mode-only", "module-hooks", "leaf-hooks")}
    ratio["monitor/10"] = med["monitor/10"] / med["plain/10"]
    split = {k: [] for k in ("plain", "capture")}
    for _ in range(repeats):  # alternating, after the rounds above warmed both up
        for k in split:
            split[k].append(phases(model, x, y, k == "capture"))
    by_phase = {k: {p: 1e3 * statistics.median(r[i] for r in v) for i, p in enumerate(PHASES)} for k, v in split.items()}
    return {"model": name, "plain_ms": 1e3 * med["plain"], "ratios": ratio, "kernels": counts, "phases_ms": by_phase,
            "times_ms": {k: [1e3 * t for t in v] for k, v in times.items()}}


def markdown(rows: List[dict]) -> str:
    out = ["| model | plain step | capture | kernels capture / plain | monitor every=10 | floor: mode only | floor: module hooks | floor: leaf hooks |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        q, k = r["ratios"], r["kernels"]
        out.append(f"| {r['model']} | {r['plain_ms']:.1f} ms | **{q['capture']:.2f}×** | {k['capture']} / {k['plain']} "
                   f"({k['capture'] / k['plain']:.2f}×) | {q['monitor/10']:.2f}× | {q['mode-only']:.2f}× | "
                   f"{q['module-hooks']:.2f}× | {q['leaf-hooks']:.2f}× |")
    out += ["", "Where the time goes (median ms, plain / capture):", "",
            "| model | " + " | ".join(PHASES) + " |", "|---|" + "---:|" * len(PHASES)]
    for r in rows:
        ph = r["phases_ms"]
        out.append(f"| {r['model']} | " + " | ".join(f"{ph['plain'][p]:.2f} / {ph['capture'][p]:.2f}" for p in PHASES) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    return run_models(argv, __doc__, MODELS, bench, markdown, 40, 5, "plain")


if __name__ == "__main__":
    sys.exit(main())
