"""``torch.compile``: a compiled plain step against a compiled step measured by gradnoise.

    python benchmarks/compiled.py [--models mlp,token-mlp,gpt2,gn-resnet] [--repeats 30] [--json PATH]

Each model (``mlp``: 64→512→512→10 at batch 128; the tiny launch-bound models of
``benchmarks/launchbound.py``) is compiled once with ``torch.compile`` (inductor on this
machine's device). Variants of one step (``zero_grad`` → forward → mean cross-entropy →
backward), timed in rotating rounds after warm-up (compilation excluded):

* ``eager``: the uncompiled plain step, for scale;
* ``compiled``: the compiled plain step (the reference of every ratio);
* ``capture``: ``gradnoise.capture(compiled)`` on every step — a measured step runs the
  compiled model's code eagerly (``torch.compiler.set_stance("force_eager")``);
* ``monitor/10``: ``NoiseMonitor(compiled, source="per_sample", every=10)``, ten steps
  (one measured, nine compiled) against ten compiled plain ones (the monitor is built and
  closed in each block, ``launchbound.monitored_block``);
* ``microbatch``: ``NoiseMonitor(compiled, source="microbatch")`` on every step, compiled
  steps with parameter hooks, each step two micro-batches (the source needs ≥ 2); its
  ratio is to ``compiled/2``, the same two-micro-batch step unmonitored.

Also reported: the graphs compiled and graph breaks counted by Dynamo before and after
the measured variants ran (a capture must add none).
"""
from __future__ import annotations

import copy
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_models, setup_path, time_rotating  # noqa: E402

setup_path()

import gradnoise  # noqa: E402
import launchbound  # noqa: E402  (benchmarks/launchbound.py)

MODELS = ("mlp", "token-mlp", "gpt2", "gn-resnet")


def build(name: str):
    if name == "mlp":
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
        return model, torch.randn(128, 64), torch.randint(0, 10, (128,))
    return launchbound.build(name)


def loss_fn(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def variants(model: nn.Module, x, y) -> Dict[str, Callable[[], None]]:
    eager_model = copy.deepcopy(model)
    compiled = torch.compile(model)

    def step(m, c=None):
        m.zero_grad(set_to_none=True)
        loss_fn((m if c is None else c)(x), y).backward()

    def capture():
        model.zero_grad(set_to_none=True)
        with gradnoise.capture(compiled) as cap:
            loss_fn(compiled(x), y).backward()
        torch.stack([v.sum() for v in cap.per_sample_sq_norms.values()]).sum()

    def compiled10():
        for _ in range(10):
            step(model, compiled)

    def compiled2():  # gradient accumulation: two halves, each mean loss times 1/2
        model.zero_grad(set_to_none=True)
        for part in launchbound.halves(x, y):
            (loss_fn(compiled(part[0]), part[1]) / 2).backward()

    return {"eager": lambda: step(eager_model), "compiled": lambda: step(model, compiled), "capture": capture,
            "compiled/10": compiled10, "monitor/10": launchbound.monitored_block(model, x, y, "per_sample", 10, True),
            "compiled/2": compiled2, "microbatch": launchbound.monitored_block(model, x, y, "microbatch", 1, True)}


def dynamo_counts():
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))


def bench(name: str, repeats: int, warmup: int) -> dict:
    model, x, y = build(name)
    fns = variants(model, x, y)
    fns["compiled"]()
    fns["compiled"]()
    before = dynamo_counts()
    times = time_rotating(fns, repeats, warmup)
    after = dynamo_counts()
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {k: med[k] / med["compiled"] for k in ("eager", "capture")}
    ratios["microbatch"] = med["microbatch"] / med["compiled/2"]
    ratios["monitor/10"] = med["monitor/10"] / med["compiled/10"]
    return {"model": name, "compiled_ms": 1e3 * med["compiled"], "ratios": ratios,
            "graphs_before": before, "graphs_after": after,
            "times_ms": {k: [1e3 * t for t in v] for k, v in times.items()}}


def markdown(rows: List[dict]) -> str:
    out = ["| model | compiled step | eager step | capture every step | monitor every=10 | microbatch source | graphs, breaks (plain → all) |",
           "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        q = r["ratios"]
        out.append(f"| {r['model']} | {r['compiled_ms']:.2f} ms | {q['eager']:.2f}× | **{q['capture']:.2f}×** | "
                   f"{q['monitor/10']:.2f}× | {q['microbatch']:.2f}× | {r['graphs_before']} → {r['graphs_after']} |")
    return "\n".join(out)


def main(argv=None) -> int:
    return run_models(argv, __doc__, MODELS, bench, markdown, 30, 3, "the compiled plain step")


if __name__ == "__main__":
    sys.exit(main())
