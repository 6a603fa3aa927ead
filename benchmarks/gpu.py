"""gradnoise on a GPU: the zoo and the real-size models, float32 and bf16 autocast, eager and
compiled — time and peak memory against a plain step, exactness against a per-sample loop.

    python benchmarks/gpu.py [--models gpt2,vit,rs-gpt2,...] [--repeats 20] [--json PATH]
    python benchmarks/gpu.py --dry-run      # on the CPU, tiny sizes: checks the script runs

Models: the zoo of ``tests/zoo_models.py`` at its "bench" size (``gpt2``, ``vit``, …) and
the real-size models of ``benchmarks/realsize.py`` (``rs-gpt2``, ``rs-llama``, ``rs-bert``,
``rs-resnet50``, ``rs-vit``) at their default batches. For every model, precision
(``fp32``; ``bf16``: the forward under ``torch.autocast("cuda", torch.bfloat16)``) and mode
(``eager``; ``compiled``: ``torch.compile(model)``, whose measured steps run eagerly):

* time: rounds of a plain step and a captured step (``gradnoise.capture``, norms read)
  in alternating order, each timed between ``torch.cuda.synchronize()`` calls; the ratio
  of medians (compiled: to the compiled plain step);
* memory: ``torch.cuda.max_memory_allocated`` over one step after a warm one, as a ratio;
* exactness: the captured norms against a per-sample loop of the same model, precision
  and batch: ``max_i |norm_i − loop_i| / max_i loop_i`` over parameters.

``--dry-run`` runs everything on the CPU at the zoo's "test" size (real-size models with one
layer), two rounds, no memory column: a check that the script works where no GPU is.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, load_average, log, setup_path, split_checked, write_json  # noqa: E402

setup_path()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import gradnoise  # noqa: E402
import zoo_models  # noqa: E402  (tests/zoo_models.py)

REAL = ("rs-gpt2", "rs-llama", "rs-bert", "rs-resnet50", "rs-vit")
MODELS = tuple(zoo_models.ZOO) + REAL
PRECISIONS = ("fp32", "bf16")
MODES = ("eager", "compiled")


def build(name: str, device: str, dry: bool, batch: int):
    """``(model, x, y, loss_fn)`` on ``device``."""
    if name in REAL:
        import realsize  # benchmarks/realsize.py (imports transformers/timm lazily)
        key = name[3:]
        model, x, y, loss_fn = realsize.build(key, batch or realsize.DEFAULT_BATCH[key], 1 if dry else None, 0)
    else:
        model, x, y, loss_fn = zoo_models.build(name, batch or 16, size="test" if dry else "bench")
    move = (lambda t: t.to(device)) if isinstance(x, torch.Tensor) else (lambda t: tuple(a.to(device) for a in t))
    return model.to(device), move(x), y.to(device), loss_fn


def autocast(device: str, precision: str):
    if precision == "bf16":
        return torch.autocast(device, torch.bfloat16)
    return contextlib.nullcontext()


def call(model, x):
    return model(*x) if isinstance(x, tuple) else model(x)


def steps(model, x, y, loss_fn, device: str, precision: str, compiled: bool) -> Dict[str, Callable]:
    run = torch.compile(model) if compiled else model

    def plain():
        model.zero_grad(set_to_none=True)
        with autocast(device, precision):
            out = call(run, x)
        loss_fn(out.float(), y).backward()

    def captured():
        model.zero_grad(set_to_none=True)
        with gradnoise.capture(run) as cap:
            with autocast(device, precision):
                out = call(run, x)
            loss_fn(out.float(), y).backward()
        return cap.per_sample_sq_norms

    return {"plain": plain, "captured": captured}


def loop_norms(model, x, y, loss_fn, device: str, precision: str) -> Dict[str, torch.Tensor]:
    """Per-sample squared norms by one backward per sample (same precision)."""
    m = copy.deepcopy(model)
    names = [k for k, p in m.named_parameters() if p.requires_grad]
    rows: Dict[str, list] = {k: [] for k in names}
    n = (x[0] if isinstance(x, tuple) else x).shape[0]
    for i in range(n):
        m.zero_grad(set_to_none=True)
        xi = tuple(a[i:i + 1] for a in x) if isinstance(x, tuple) else x[i:i + 1]
        with autocast(device, precision):
            out = call(m, xi)
        loss_fn(out.float(), y[i:i + 1]).backward()
        for k, p in m.named_parameters():
            if k in rows:
                rows[k].append(p.grad.double().pow(2).sum() if p.grad is not None else torch.zeros((), device=device))
    return {k: torch.stack(v) for k, v in rows.items()}


def rel_error(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor]) -> float:
    common = [k for k in want if k in got]
    if len(common) < len(want):
        return float("inf")
    scale = max(float(want[k].abs().max()) for k in common) or 1.0
    return max(float((got[k].double() - want[k]).abs().max()) for k in common) / scale


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable, device: str) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def peak(fn: Callable, device: str) -> Optional[int]:
    if device != "cuda":
        return None
    fn()
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated()


def bench(name: str, precision: str, mode: str, args, device: str) -> dict:
    model, x, y, loss_fn = build(name, device, args.dry_run, args.batch)
    fns = steps(model, x, y, loss_fn, device, precision, mode == "compiled")
    row = {"model": name, "precision": precision, "mode": mode}
    try:
        got = fns["captured"]()
        row["error"] = rel_error(got, loop_norms(model, x, y, loss_fn, device, precision))
        for _ in range(args.warmup):
            fns["plain"]()
            fns["captured"]()
        times: Dict[str, List[float]] = {"plain": [], "captured": []}
        for r in range(args.repeats):
            order = ("plain", "captured") if r % 2 == 0 else ("captured", "plain")
            for k in order:
                times[k].append(timed(fns[k], device))
        med = {k: statistics.median(v) for k, v in times.items()}
        row.update(plain_ms=1e3 * med["plain"], time_ratio=med["captured"] / med["plain"])
        peaks = {k: peak(fns[k], device) for k in fns}
        row["peak_ratio"] = None if peaks["plain"] is None else peaks["captured"] / peaks["plain"]
        row["plain_peak_mib"] = None if peaks["plain"] is None else peaks["plain"] / 2**20
    except Exception as exc:  # a failure is a row of the table, not the end of the run
        row["failed"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return row


def markdown(rows: List[dict], device_name: str) -> str:
    out = [f"Device: {device_name}", "",
           "| model | precision | mode | plain step | time | plain peak | memory | error vs loop |",
           "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "failed" in r:
            out.append(f"| {r['model']} | {r['precision']} | {r['mode']} | — | — | — | — | {r['failed']} |")
            continue
        mem = "—" if r["peak_ratio"] is None else f"{r['peak_ratio']:.2f}×"
        pk = "—" if r["plain_peak_mib"] is None else f"{r['plain_peak_mib']:.0f} MiB"
        out.append(f"| {r['model']} | {r['precision']} | {r['mode']} | {r['plain_ms']:.1f} ms | "
                   f"**{r['time_ratio']:.2f}×** | {pk} | {mem} | {r['error']:.0e} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, repeats=20, warmup=3, models="gpt2,llama,vit,resnet18-eval-bn," + ",".join(REAL), threads=4)
    p.add_argument("--precisions", default=",".join(PRECISIONS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--batch", type=int, default=0, help="batch size (default: each model's own)")
    p.add_argument("--dry-run", action="store_true", help="on the CPU, tiny sizes, 2 rounds: the script works")
    args = p.parse_args(argv)
    names = split_checked(p, args.models, MODELS, "model")
    precisions = split_checked(p, args.precisions, PRECISIONS, "precision")
    modes = split_checked(p, args.modes, MODES, "mode")
    if args.dry_run:
        device, args.repeats, args.warmup = "cpu", min(args.repeats, 2), min(args.warmup, 1)
        device_name = "CPU (dry run: not a GPU measurement)"
    elif torch.cuda.is_available():
        device, device_name = "cuda", torch.cuda.get_device_name()
    else:
        p.error("no CUDA device here; use --dry-run to check the script on the CPU")
    torch.set_num_threads(args.threads)
    load = load_average()
    rows = []
    for name in names:
        for precision in precisions:
            for mode in modes:
                log(f"{name} {precision} {mode}")
                rows.append(bench(name, precision, mode, args, device))
    print(markdown(rows, device_name))
    print(f"\ntorch {torch.__version__}, {args.repeats} alternating rounds after {args.warmup}; load average {load:.1f}")
    if args.json:
        write_json(args.json, {"device": device_name, "repeats": args.repeats, "torch": torch.__version__}, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
