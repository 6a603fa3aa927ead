"""What AdaScale and the AdaptiveBatchSampler add to a training step beyond the monitor
they read (issue 10's target: at most 2 %).

For each reference model (M1 MLP, M2 CNN, M3 Transformer, ``benchmarks/models.py``), one
training step of SGD with a ``NoiseMonitor(source="per_sample", every=1)``:

* ``monitor`` — the step without either piece: forward, backward, ``monitor.step()``,
  ``opt.step()``; batches from a plain shuffled ``DataLoader``;
* ``+ AdaScale`` — the same, with ``AdaScale(opt, monitor, …).step()`` in place of
  ``opt.step()`` (the Adam variant too, with Adam as the optimizer in both);
* ``+ sampler`` — batches from ``DataLoader(batch_sampler=AdaptiveBatchSampler(…))``
  through ``sampler.steps(loader)`` (an adjustment point every 10 steps), against a plain
  ``DataLoader`` of the same batch size.

Alternating blocks of ``steps`` steps, median over ``repeats`` blocks, 2 threads, in one
process; the ratio is median(with)/median(without).

    python benchmarks/control_overhead.py [--repeats 20] [--models M1,M2,M3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

from common import add_common_args, load_average, log, setup_path, split_checked

setup_path()

import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import gradnoise  # noqa: E402
from gradnoise.control import AdaptiveBatchSampler, AdaScale  # noqa: E402
from models import build  # noqa: E402

STEPS = 10


def _data(name: str, seed: int, n: int = 512):
    model, x, y = build(name, seed)
    reps = -(-n // len(x))
    return model, torch.cat([x] * reps)[:n], torch.cat([y] * reps)[:n]


def _loop(model, opt, monitor, loader, loss_fn, ada=None, sampler=None) -> float:
    """Seconds for ``STEPS`` optimizer steps."""
    t0 = time.perf_counter()
    it = sampler.steps(loader) if sampler is not None else iter(loader)
    for _ in range(STEPS):
        batch = next(it)
        parts = list(batch) if sampler is not None else [(batch, 1.0)]
        for (xb, yb), w in parts:
            (loss_fn(model(xb), yb) * w).backward()
        monitor.step()
        (ada or opt).step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def bench(name: str, repeats: int, seed: int):
    model, x, y = _data(name, seed)
    b = len(x) // 16
    loss_fn = torch.nn.functional.cross_entropy
    monitor = gradnoise.NoiseMonitor(model, source="per_sample")
    rows = []
    for label, make_opt, mode in (("SGD", lambda: torch.optim.SGD(model.parameters(), lr=1e-3), "sgd"),
                                  ("Adam", lambda: torch.optim.Adam(model.parameters(), lr=1e-4), "adam-sqrt")):
        opt = make_opt()
        ada = AdaScale(opt, monitor, base_batch_size=b // 2, batch_size=b, mode=mode)
        plain = DataLoader(TensorDataset(x, y), batch_size=b, shuffle=True, drop_last=True)
        sampler = AdaptiveBatchSampler(len(x), monitor=monitor, base_batch_size=b, min_batch=b, max_batch=b,
                                       adjust_every=10, drop_last=True)
        adaptive = DataLoader(TensorDataset(x, y), batch_sampler=sampler)
        cases = {"monitor": lambda: _loop(model, opt, monitor, _cycle(plain), loss_fn),
                 "+ AdaScale": lambda: _loop(model, opt, monitor, _cycle(plain), loss_fn, ada=ada),
                 "+ sampler": lambda: _loop(model, opt, monitor, adaptive, loss_fn, sampler=_Looping(sampler))}
        times = {k: [] for k in cases}
        for r in range(repeats + 2):
            for k, f in (list(cases.items()) if r % 2 else list(cases.items())[::-1]):
                t = f()
                if r >= 2:
                    times[k].append(t)
        base = statistics.median(times["monitor"])
        for k in ("+ AdaScale", "+ sampler"):
            rows.append({"model": name, "optimizer": label, "case": k, "step_ms": 1e3 * base / STEPS,
                         "ratio": statistics.median(times[k]) / base})
        log(f"  {name} {label}: done")
    monitor.close()
    return rows


def _cycle(loader):
    while True:
        yield from loader


class _Looping:
    """``sampler.steps(loader)`` over epochs without end."""

    def __init__(self, sampler):
        self.sampler, self.epoch = sampler, 0

    def steps(self, loader):
        while True:
            self.sampler.set_epoch(self.epoch)
            self.epoch += 1
            yield from self.sampler.steps(loader)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, repeats=20)
    args = p.parse_args(argv)
    names = split_checked(p, args.models, ("M1", "M2", "M3"), "model")
    torch.set_num_threads(args.threads)
    load_average()
    rows = [row for n in names for row in bench(n, args.repeats, args.seed)]
    print("| model | optimizer | case | monitored step | time ratio |")
    print("|---|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['optimizer']} | {r['case']} | {r['step_ms']:.2f} ms | {r['ratio']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
