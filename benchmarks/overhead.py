"""Overhead of gradnoise's per-sample capture against a plain step and against peers.

    python benchmarks/overhead.py [--repeats N] [--models M1,M2] [--json PATH]

For each reference model (benchmarks/models.py) every method runs the same training step
on its own copy of the same weights and the same fixed batch:

    zero_grad -> forward -> mean cross-entropy -> backward -> read per-sample norms

``plain`` skips the last part. ``gradnoise`` wraps forward and backward in
``gradnoise.capture(model, reduction="mean")`` and reads ``cap.per_sample_sq_norms``.
Peers, each used only if importable: ``torch.func`` (vmap(grad) over functional_call),
BackPACK ``BatchL2Grad``, Opacus ``GradSampleModule`` and Opacus ghost clipping
(``GradSampleModuleFastGradientClipping``, one backward: norms and the ordinary
gradient). Every method leaves ``p.grad`` equal to the plain gradient, so each one
delivers what gradnoise delivers.

Timing: 2 threads, float32, fixed seed; each method is first checked against a
per-sample autograd loop, warmed up, then timed in rounds, all in one process. A round
runs every method once, each right next to a plain step, in an order that rotates from
round to round. Reported: the median time per method, the ratio of medians to ``plain``
and (in the notes) the median ratio to the neighbouring plain step. Peak memory is
measured afterwards in separate runs (benchmarks/memory.py), so the instrumentation
never touches a timed step; reported as the ratio of peaks to ``plain``.

Progress goes to stderr; the Markdown table to stdout.
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, load_average, log, setup_path, split_checked, write_json  # noqa: E402

setup_path()

import memory  # noqa: E402  (benchmarks/memory.py)
import models  # noqa: E402  (benchmarks/models.py)

Norms = Dict[str, torch.Tensor]  # parameter name -> [B] per-sample squared norms


class Unavailable(Exception):
    """A method that cannot run here: not installed, or the model is unsupported."""


def short(exc: BaseException, limit: int = 120) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- methods ----------------------------------------------------------------------------
class Method:
    """One way of running the step. ``step()`` returns per-sample norms (None for plain)."""

    name = "?"

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable = F.cross_entropy):
        self.model, self.x, self.y, self.loss_fn = model, x, y, loss_fn
        self.notes: List[str] = []

    def step(self) -> Optional[Norms]:
        raise NotImplementedError


class Plain(Method):
    name = "plain"

    def step(self) -> None:
        self.model.zero_grad(set_to_none=True)
        self.loss_fn(self.model(self.x), self.y).backward()


class Gradnoise(Method):
    name = "gradnoise"

    def __init__(self, model, x, y, loss_fn=F.cross_entropy):
        super().__init__(model, x, y, loss_fn)
        try:
            import gradnoise
        except Exception as exc:  # the engine may be missing or half-written
            raise Unavailable(f"gradnoise does not import ({short(exc)})") from exc
        self.capture = getattr(gradnoise, "capture", None)
        if not callable(self.capture):
            raise Unavailable("gradnoise.capture is not available yet")

    def step(self) -> Norms:
        self.model.zero_grad(set_to_none=True)
        with self.capture(self.model, reduction="mean") as cap:
            self.loss_fn(self.model(self.x), self.y).backward()
        return dict(cap.per_sample_sq_norms)


class TorchFunc(Method):
    """Per-sample gradients with vmap(grad(...)) over functional_call, then norms.

    ``p.grad`` is set to the mean of the per-sample gradients (the plain gradient).
    """

    name = "torch.func"

    def __init__(self, model, x, y, loss_fn=F.cross_entropy):
        super().__init__(model, x, y, loss_fn)
        from torch.func import functional_call, grad, vmap

        def sample_loss(params, buffers, xi, yi):
            out = functional_call(model, (params, buffers), (xi.unsqueeze(0),))
            return loss_fn(out, yi.unsqueeze(0))

        self.per_sample_grads = vmap(grad(sample_loss), in_dims=(None, None, 0, 0))

    def step(self) -> Norms:
        self.model.zero_grad(set_to_none=True)
        named = dict(self.model.named_parameters())
        params = {k: p.detach() for k, p in named.items()}
        buffers = {k: b.detach() for k, b in self.model.named_buffers()}
        grads = self.per_sample_grads(params, buffers, self.x, self.y)
        norms = {}
        for k, g in grads.items():
            norms[k] = g.flatten(1).pow(2).sum(1)
            named[k].grad = g.mean(0)
        return norms


class BackpackL2(Method):
    """BackPACK ``BatchL2Grad``. It reports norms of the 1/B-scaled terms: times B²."""

    name = "backpack"

    def __init__(self, model, x, y, loss_fn=F.cross_entropy):
        super().__init__(model, x, y, loss_fn)
        try:
            from backpack import backpack, extend
            from backpack.extensions import BatchL2Grad
        except ImportError as exc:
            raise Unavailable("not installed (pip install backpack-for-pytorch)") from exc
        self.ctx, self.ext = backpack, BatchL2Grad
        try:
            self.model = extend(model)
            self.loss_fn = extend(nn.CrossEntropyLoss())
        except Exception as exc:
            raise Unavailable(f"unsupported: {short(exc)}") from exc
        self.scale = float(x.shape[0]) ** 2

    def step(self) -> Norms:
        self.model.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(self.x), self.y)
        with self.ctx(self.ext()):
            loss.backward()
        norms = {}
        for k, p in self.model.named_parameters():
            l2 = getattr(p, "batch_l2", None)
            if l2 is not None:
                norms[k] = l2 * self.scale
                del p.batch_l2  # no stale values next step
        return norms


class OpacusGSM(Method):
    """Opacus ``GradSampleModule``: materialised per-sample gradients, then norms."""

    name = "opacus"

    def __init__(self, model, x, y, loss_fn=F.cross_entropy):
        super().__init__(model, x, y, loss_fn)
        try:
            from opacus import GradSampleModule
        except ImportError as exc:
            raise Unavailable("not installed (pip install opacus)") from exc
        try:
            self.gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        except Exception as exc:
            raise Unavailable(f"unsupported: {short(exc)}") from exc

    def step(self) -> Norms:
        self.gsm.zero_grad(set_to_none=True)
        self.loss_fn(self.gsm(self.x), self.y).backward()
        return {
            k: p.grad_sample.flatten(1).pow(2).sum(1)
            for k, p in self.gsm._module.named_parameters()
            if getattr(p, "grad_sample", None) is not None
        }


class OpacusGhost(Method):
    """Opacus ghost clipping hooks, one backward: per-sample norms and ``p.grad``.

    Opacus' DP training adds a second, reweighted backward; measuring noise needs only
    the first, so only the first is timed.
    """

    name = "opacus-ghost"

    def __init__(self, model, x, y, loss_fn=F.cross_entropy):
        super().__init__(model, x, y, loss_fn)
        try:
            from opacus.grad_sample import GradSampleModuleFastGradientClipping
        except ImportError as exc:
            raise Unavailable("not installed (pip install opacus)") from exc
        try:
            self.gsm = GradSampleModuleFastGradientClipping(
                model, batch_first=True, loss_reduction="mean", use_ghost_clipping=True
            )
        except Exception as exc:
            raise Unavailable(f"unsupported: {short(exc)}") from exc

    def step(self) -> Norms:
        self.gsm.zero_grad(set_to_none=True)
        self.loss_fn(self.gsm(self.x), self.y).backward()
        return {
            k: p._norm_sample.pow(2)
            for k, p in self.gsm._module.named_parameters()
            if getattr(p, "_norm_sample", None) is not None
        }


METHODS: Dict[str, type] = {
    m.name: m for m in (Plain, Gradnoise, TorchFunc, BackpackL2, OpacusGSM, OpacusGhost)
}


def run_step(method: Method) -> None:
    """One step as timed: the step, plus a reduction that reads every norm."""
    norms = method.step()
    if norms:
        torch.stack([v.sum() for v in norms.values()]).sum()


# ---- correctness check --------------------------------------------------------------------
def reference_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn=F.cross_entropy) -> Norms:
    """Per-sample squared gradient norms by one autograd backward per sample."""
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    rows = {k: [] for k in names}
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        loss_fn(model(x[i : i + 1]), y[i : i + 1]).backward()
        for k, p in model.named_parameters():
            if k in rows:
                rows[k].append(p.grad.pow(2).sum())
    model.zero_grad(set_to_none=True)
    return {k: torch.stack(v) for k, v in rows.items()}


def check(method: Method, ref: Norms, ref_grads: Dict[str, torch.Tensor]) -> None:
    """Run one step; note coverage and errors of the norms and of ``p.grad``."""
    norms = method.step()
    if norms is None:
        return
    covered = [k for k in ref if k in norms]
    if len(covered) < len(ref):
        inner = _inner(method)
        missing = sorted({
            type(inner.get_submodule(k.rpartition(".")[0])).__name__
            for k in ref if k not in norms
        })
        method.notes.append(
            f"partial: norms for {len(covered)}/{len(ref)} params (none for {', '.join(missing)})"
        )
    if not covered:
        method.notes.append("no norms returned")
        return
    scale = max(float(ref[k].abs().max()) for k in covered)
    err = max(float((norms[k].detach() - ref[k]).abs().max()) for k in covered) / scale
    method.notes.append(f"norm err {err:.1e}" + (" MISMATCH" if err > 1e-3 else ""))
    named = dict(_inner(method).named_parameters())
    gerr = max(
        float((named[k].grad - g).abs().max()) / max(float(g.abs().max()), 1e-30)
        if named[k].grad is not None else float("inf")
        for k, g in ref_grads.items()
    )
    if gerr > 1e-3:
        method.notes.append(f"p.grad differs from plain (rel err {gerr:.1e})")


def _inner(method: Method) -> nn.Module:
    gsm = getattr(method, "gsm", None)
    return gsm._module if gsm is not None else method.model


# ---- timing and memory ---------------------------------------------------------------------
def _timed(method: Method) -> float:
    t0 = time.perf_counter()
    run_step(method)
    return time.perf_counter() - t0


def time_methods(
    plain: Method, others: List[Method], repeats: int, warmup: int, label: str
) -> Tuple[Dict[str, List[float]], Dict[str, List[float]]]:
    """Seconds per step, from ``repeats`` rounds of plain/method pairs.

    A round runs every other method once, each right next to a plain step (plain first
    in every other pair), in an order that rotates from round to round. Returns the times
    per method (``plain`` gets one per pair) and, per other method, the ratio of each
    method step to its neighbouring plain step.
    """
    for _ in range(warmup):
        for m in [plain, *others]:
            run_step(m)
    times: Dict[str, List[float]] = {m.name: [] for m in [plain, *others]}
    paired: Dict[str, List[float]] = {m.name: [] for m in others}
    gc.collect()
    n = max(1, len(others))
    report_every = max(1, repeats // 5)
    for r in range(repeats):
        if not others:
            times[plain.name].append(_timed(plain))
        for j in range(len(others)):
            m = others[(r + j) % n]
            if (r + j) % 2 == 0:
                tp, tm = _timed(plain), _timed(m)
            else:
                tm, tp = _timed(m), _timed(plain)
            times[plain.name].append(tp)
            times[m.name].append(tm)
            paired[m.name].append(tm / tp)
        if (r + 1) % report_every == 0:
            log(f"  {label}: timing round {r + 1}/{repeats}")
    return times, paired


def peak_memory(method: Method, measure: Callable, runs: int = 3) -> int:
    """Median over ``runs`` of the peak bytes allocated during one step (after one warm step)."""
    run_step(method)
    peaks = []
    for _ in range(runs):
        gc.collect()
        peaks.append(measure(lambda: run_step(method)))
    if max(peaks) != min(peaks):
        method.notes.append(f"peak varied {min(peaks)}..{max(peaks)} B")
    return int(statistics.median(peaks))


def _build_reference(name: str, seed: int):
    return (*models.build(name, seed), F.cross_entropy)


def setup_methods(name: str, wanted: List[str], seed: int, build: Callable = _build_reference, table=None):
    """``build(name, seed) -> (model, x, y, loss_fn)``; one copy of the model per method."""
    base, x, y, loss_fn = build(name, seed)
    methods, skipped = [], {}
    for key in wanted:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                methods.append((table or METHODS)[key](copy.deepcopy(base), x, y, loss_fn))
        except Unavailable as exc:
            skipped[key] = str(exc)
    return base, x, y, loss_fn, methods, skipped


def checked_methods(name: str, args, build: Callable = _build_reference, table=None) -> Tuple[List[Method], Dict[str, str]]:
    """Set up the methods and check each against the per-sample reference."""
    base, x, y, loss_fn, methods, skipped = setup_methods(name, args.methods, args.seed, build, table)
    ref = reference_norms(base, x, y, loss_fn)
    loss_fn(base(x), y).backward()
    ref_grads = {k: p.grad.detach().clone() for k, p in base.named_parameters()}
    ok = []
    for m in methods:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # peers warn about modules they skip
                check(m, ref, ref_grads)
            ok.append(m)
        except Exception as exc:
            what = "failed" if m.name in ("plain", "gradnoise") else "unsupported"
            skipped[m.name] = f"{what}: {short(exc)}"
            log(f"  {name}: {m.name} {skipped[m.name]}")
    if "plain" in skipped:
        raise SystemExit(f"{name}: plain step {skipped['plain']}")
    return ok, skipped


def result_row(name: str, m: Method, times, paired, peaks) -> dict:
    med = statistics.median(times[m.name])
    q = statistics.quantiles(times[m.name], n=4) if len(times[m.name]) > 1 else [med] * 3
    pr = statistics.median(paired[m.name]) if m.name in paired else 1.0
    return {
        "model": name, "method": m.name, "status": "ok",
        "median_ms": 1e3 * med,
        "time_ratio": med / statistics.median(times["plain"]),
        "paired_ratio": pr,
        "quartiles_ms": [1e3 * q[0], 1e3 * q[2]],
        "peak_bytes": peaks[m.name],
        "peak_ratio": peaks[m.name] / peaks["plain"] if peaks["plain"] else None,
        "times_ms": [1e3 * t for t in times[m.name]],
        "notes": "; ".join(([f"paired {pr:.2f}"] if m.name in paired else []) + m.notes),
    }


def bench_model(name: str, args, build: Callable = _build_reference, table=None) -> List[dict]:
    """Check, time, then measure memory of every method on one model; one row each."""
    log(f"{name}: {models.PROBLEMS[name].description if build is _build_reference else name}")
    ok, skipped = checked_methods(name, args, build, table)
    plain = next(m for m in ok if m.name == "plain")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        others = [m for m in ok if m is not plain]
        times, paired = time_methods(plain, others, args.repeats, args.warmup, name)
        peaks = {}
        for m in ok:
            log(f"  {name}: peak memory of {m.name}")
            peaks[m.name] = peak_memory(m, memory.METHODS[args.memory])
    rows = [result_row(name, m, times, paired, peaks) for m in ok]
    rows += [{"model": name, "method": k, "status": "skipped", "notes": why}
             for k, why in skipped.items()]
    order = {k: i for i, k in enumerate(args.methods)}
    return sorted(rows, key=lambda r: order[r["method"]])


def markdown(rows: List[dict]) -> str:
    lines = [
        "| model | method | median ms | time ratio | peak-memory ratio | notes |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        if r["status"] == "ok":
            peak = f"{r['peak_ratio']:.2f}" if r["peak_ratio"] is not None else "n/a"
            mib = r["peak_bytes"] / memory.MiB
            lines.append(
                f"| {r['model']} | {r['method']} | {r['median_ms']:.2f} | "
                f"{r['time_ratio']:.2f} | {peak} ({mib:.1f} MiB) | {r['notes']} |"
            )
        else:
            lines.append(f"| {r['model']} | {r['method']} | – | – | – | {r['notes']} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated, from {','.join(METHODS)} (plain is always run)")
    p.add_argument("--memory", choices=sorted(memory.METHODS), default="profiler",
                   help="peak-memory measurement (default profiler; see benchmarks/memory.py)")
    args = p.parse_args(argv)
    args.models = split_checked(p, args.models, models.PROBLEMS, "model")
    args.methods = split_checked(p, args.methods, METHODS, "method")
    if "plain" not in args.methods:
        args.methods.insert(0, "plain")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)
    load_before = load_average()
    start = time.perf_counter()
    rows: List[dict] = []
    for name in args.models:
        rows.extend(bench_model(name, args))
    elapsed = time.perf_counter() - start
    print(markdown(rows))
    env = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
           f"{platform.processor() or platform.machine()}, python {platform.python_version()}")
    print(f"\n{env}; {args.repeats} rounds after {args.warmup} warm-up; "
          f"time ratio = median / median(plain); peak memory by {args.memory}; "
          f"{elapsed:.0f} s in all; load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")
    if args.json:
        write_json(args.json, {
            "repeats": args.repeats, "warmup": args.warmup, "threads": torch.get_num_threads(),
            "seed": args.seed, "memory_method": args.memory, "models": args.models,
            "methods": args.methods, "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "elapsed_s": elapsed, "load_before": load_before,
            "load_after": os.getloadavg()[0],
        }, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
