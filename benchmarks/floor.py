"""The floor: what the leanest hook-based measurement costs, with no gradnoise code at all.

    python benchmarks/floor.py [--repeats N] [--models M1,M2,M3]

The speed targets of issues 2 and 3 (1.10× and 1.02× a plain step) are checked here
against the cheapest thing any Python implementation on top of autograd hooks can do,
so that the price of gradnoise's own checks and bookkeeping can be told apart from the
price of merely being called by autograd. Each variant below is a few lines, keeps
nothing but what it needs, and skips every safety check gradnoise makes:

* ``hooks only``: a forward hook on every ``nn.Linear`` registers a hook on its output
  tensor; both hooks do nothing else (the cost of being called).
* ``hooks + norms``: the same hooks compute ``||a_i||²`` and ``||δ_i||²`` per sample
  (``torch.linalg.vector_norm``), which gives the exact per-sample norm of a 2-D Linear
  weight, ``||a_i||²·||δ_i||²``. Only 2-D Linear layers are measured; nothing else.
* ``post-accumulate norms``: the model's step split in 2 micro-batches (the monitor's
  ``microbatch`` source), with a ``register_post_accumulate_grad_hook`` per parameter
  that takes the squared norm of ``p.grad`` after each backward (the least that source
  can do); against the same 2-micro-batch plain step with an SGD update.

Rounds alternate the variants with their plain step; medians of the times and their
ratio to plain are printed as a Markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, load_average, log, split_checked, time_rotating  # noqa: E402

import models  # noqa: E402  (benchmarks/models.py)


def per_sample_variants(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Dict[str, Callable[[], None]]:
    """``plain``, ``hooks only`` and ``hooks + norms`` steps on the Linear layers."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    kept: List[torch.Tensor] = []

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    def hooked(norms: bool) -> Callable[[], None]:
        def forward_hook(mod, inputs, out):
            a = inputs[0]

            def grad_hook(g):
                if norms and g.dim() == 2:
                    kept.append(torch.linalg.vector_norm(a, dim=1).square()
                                * torch.linalg.vector_norm(g, dim=1).square())
            out.register_hook(grad_hook)

        def step() -> None:
            handles = [m.register_forward_hook(forward_hook) for m in linears]
            plain()
            for h in handles:
                h.remove()
            kept.clear()
        return step

    return {"plain": plain, "hooks only": hooked(False), "hooks + norms": hooked(True)}


def microbatch_variants(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Dict[str, Callable[[], None]]:
    """``plain`` (2 micro-batches + SGD) and ``post-accumulate norms``."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    parts = list(zip(x.chunk(2), y.chunk(2)))
    params = [p for p in model.parameters() if p.requires_grad]
    kept: List[torch.Tensor] = []

    def plain() -> None:
        for xb, yb in parts:
            (F.cross_entropy(model(xb), yb) / len(parts)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def hook(p: torch.Tensor) -> None:
        kept.append(torch.linalg.vector_norm(p.grad).square())

    def norms() -> None:
        handles = [p.register_post_accumulate_grad_hook(hook) for p in params]
        plain()
        for h in handles:
            h.remove()
        torch.stack(kept).tolist()  # the values reach Python, as a monitor's would
        kept.clear()

    return {"plain": plain, "post-accumulate norms": norms}


def time_variants(fns: Dict[str, Callable[[], None]], repeats: int, warmup: int) -> Dict[str, float]:
    """Median seconds per variant; every round runs them all, in a rotating order."""
    return {k: statistics.median(v) for k, v in time_rotating(fns, repeats, warmup).items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p, repeats=200)
    args = p.parse_args(argv)
    names = split_checked(p, args.models, models.PROBLEMS, "model")
    torch.set_num_threads(args.threads)
    load_average()
    print("| model | variant | time | × plain |\n|---|---|---|---|")
    for name in names:
        for group in (per_sample_variants, microbatch_variants):
            model, x, y = models.build(name, args.seed)
            log(f"{name}: {group.__name__} ...")
            med = time_variants(group(model, x, y), args.repeats, args.warmup)
            for k, t in med.items():
                print(f"| {name} | {k} | {t * 1e3:.2f} ms | {t / med['plain']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
