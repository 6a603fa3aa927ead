"""Time and peak memory of gradnoise on real-size models, against a plain step and torch.func.

    python benchmarks/realsize.py [--models gpt2,llama,bert,resnet50,vit] [--batch gpt2:4,8,16]
                                  [--threads 1] [--repeats 5] [--layers N] [--json PATH] [--no-check]

Five models at their real configurations, random init, float32, nothing downloaded:
GPT-2 small (124M, tied wte/lm_head), a 134M LLaMA (vocab 32000, d 768, 12 layers, untied),
bert-base for 3-class sequence classification, torchvision ResNet-50 in eval mode (BatchNorm
with running statistics) and timm ``vit_small_patch16_224``; dropout 0. Language models:
mean cross-entropy of ``model(input_ids=ids).logits`` against the ids, 4×128 tokens (BERT:
labels of 3 classes, 8×128); image models: 1000 random classes, 8×3×224×224.

A step is ``zero_grad`` -> forward -> loss -> backward (-> read the per-sample norms and reduce
them to one number), with the methods of ``benchmarks/overhead.py``: ``plain``,
``gradnoise`` (``gradnoise.capture(model, reduction="mean")``) and ``torch.func``.

* Exactness (unless ``--no-check``): the per-sample squared norms of each method against a
  per-sample loop (one forward/backward per sample) in float64 on a ``.double()`` copy, the
  truth; the float32 loop is held to the same truth. Error = max over parameters of
  max_i |norm_i - truth_i| / max_i truth_i, naming the worst parameter. Parameters whose
  true norms are below 1e-10 of the largest (BERT's key biases: zero gradient in exact
  arithmetic) are left out of that maximum and counted in the notes.
* Time: one process, ``overhead.time_methods``: rounds in which each method runs right next
  to a plain step, in rotating order; ratio = median(method) / median(plain), ``paired`` =
  median of method step / neighbouring plain step.
* Memory: every (model, batch, method) in a fresh subprocess, ``memory.peak_bytes_profiler``
  over one step after a warm one, median of ``--memory-runs`` steps; ratio to plain's peak.

Progress to stderr, a Markdown table to stdout, everything to ``--json``.
"""
from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random init only: a download attempt fails loudly

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, load_average, log, setup_path, split_checked, write_json  # noqa: E402

setup_path()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import memory  # noqa: E402  (benchmarks/memory.py)
import overhead  # noqa: E402  (benchmarks/overhead.py)
from zoo_models import Logits, _ce  # noqa: E402  (tests/zoo_models.py)

METHODS = ("plain", "gradnoise", "torch.func")
DEFAULT_BATCH = {"gpt2": 4, "llama": 4, "bert": 8, "resnet50": 8, "vit": 8}
T, IMG = 128, 224
START = time.perf_counter()


def say(msg: str) -> None:
    log(f"[{time.perf_counter() - START:6.0f} s] {msg}")


# ---- models ---------------------------------------------------------------------------------
def _tokens(vocab: int, classes: int = 0):
    def make(B: int):  # targets: the ids themselves (language models) or class labels
        ids = torch.randint(0, vocab, (B, T))
        return ids, (torch.randint(0, classes, (B,)) if classes else ids)
    return make


def _images(B: int):
    return torch.randn(B, 3, IMG, IMG), torch.randint(0, 1000, (B,))


def _gpt2(layers: Optional[int]):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, n_layer=layers or 12)
    return Logits(GPT2LMHeadModel(cfg)), _tokens(cfg.vocab_size)


def _llama(layers: Optional[int]):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=layers or 12,
                      num_attention_heads=12, num_key_value_heads=12, tie_word_embeddings=False)
    return Logits(LlamaForCausalLM(cfg)), _tokens(cfg.vocab_size)


def _bert(layers: Optional[int]):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
                     num_hidden_layers=layers or 12)
    return Logits(BertForSequenceClassification(cfg)), _tokens(cfg.vocab_size, classes=3)


def _resnet50(layers: Optional[int]):
    from torchvision.models.resnet import Bottleneck, ResNet

    blocks = [min(n, layers or n) for n in (3, 4, 6, 3)]  # resnet50's blocks per stage
    return ResNet(Bottleneck, blocks, num_classes=1000).eval(), _images


def _vit(layers: Optional[int]):
    import timm

    extra = {"depth": layers} if layers else {}
    return timm.create_model("vit_small_patch16_224", pretrained=False, **extra), _images


BUILDERS = {"gpt2": _gpt2, "llama": _llama, "bert": _bert, "resnet50": _resnet50, "vit": _vit}


def build(key: str, batch: int, layers: Optional[int], seed: int):
    """``(model, x, y, loss_fn)``: same weights and batch in every process for one seed."""
    torch.manual_seed(seed)
    model, make_batch = BUILDERS[key](layers)
    x, y = make_batch(batch)
    return model, x, y, _ce


# ---- exactness --------------------------------------------------------------------------------
def loop_norms(base, x, y, loss_fn, dtype) -> Dict[str, torch.Tensor]:
    """Per-sample squared norms by one backward per sample on a ``dtype`` copy (float64 out)."""
    model = copy.deepcopy(base).to(dtype)
    xs = x.to(dtype) if x.is_floating_point() else x
    return {k: v.double() for k, v in overhead.reference_norms(model, xs, y, loss_fn).items()}


def rel_error(norms, truth) -> dict:
    """max over parameters of max_i |norm - truth| / max_i truth, and the parameter."""
    top = max(float(t.max()) for t in truth.values())
    worst, name, zero, missing = 0.0, None, 0, 0
    for k, t in truth.items():
        if k not in norms:
            missing += 1
        elif float(t.max()) <= 1e-10 * top:
            zero += 1
        else:
            err = float((norms[k].detach().double() - t).abs().max()) / float(t.max())
            if err >= worst:
                worst, name = err, k
    return {"err": worst, "param": name, "zero_grad_params": zero, "missing": missing}


def first_steps(methods, failed: Dict[str, str], truth=None):
    """One step of each method (the check, or a trial with --no-check): a method whose step
    raises is dropped and noted in ``failed``. Returns the rest and, given the float64
    ``truth``, each one's error."""
    ok, errors = [], {}
    for m in methods:
        try:
            norms = m.step()
        except Exception as exc:
            failed[m.name] = overhead.short(exc, 100)
            say(f"  {m.name} fails: {failed[m.name]}")
            continue
        ok.append(m)
        if truth is not None and norms is not None:
            errors[m.name] = rel_error(norms, truth)
    return ok, errors


def check_notes(res: dict, failed: Dict[str, str]) -> str:
    """``gradnoise 3e-06 (wte); f32 loop 4e-07 (...)``: errors against the float64 loop."""
    def err(k: str, v: dict) -> str:
        missing = f", {v['missing']} params missing" if v["missing"] else ""
        return f"{k} {v['err']:.0e} ({(v['param'] or '?').removeprefix('model.')}){missing}"
    parts = [err(k, v) for k, v in res.items() if k != "loop32"] + [f"{k} fails: {why}" for k, why in failed.items()]
    loop = res.get("loop32")
    if loop:
        parts.append(err("f32 loop", loop))
        if loop["zero_grad_params"]:
            parts.append(f"{loop['zero_grad_params']} params with ~0 grad left out")
    return "; ".join(parts) or "not checked"


# ---- memory, each in its own process ------------------------------------------------------------
def memory_child(spec: dict) -> None:
    """Runs in the subprocess: print one JSON line with the peak bytes of one method's step."""
    torch.set_num_threads(spec["threads"])
    warnings.simplefilter("ignore")
    try:
        model, x, y, loss_fn = build(spec["model"], spec["batch"], spec["layers"], spec["seed"])
        method = overhead.METHODS[spec["method"]](model, x, y, loss_fn)
        peak = overhead.peak_memory(method, memory.peak_bytes_profiler, spec["runs"])
        print(json.dumps({"peak_bytes": peak, "notes": method.notes}), flush=True)
    except Exception as exc:
        print(json.dumps({"error": overhead.short(exc)}), flush=True)


def peak_in_subprocess(spec: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)  # inherits env, PYTHONPATH included
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = " ".join((proc.stderr or "").split()[-30:])
        return {"error": f"child exited {proc.returncode}: {tail[-200:]}"}
    return json.loads(lines[-1])


# ---- one row: a model at one batch size -----------------------------------------------------------
def checked_and_timed(key: str, batch: int, args, row: dict):
    """Exactness check (or trial steps), then interleaved timing; returns the times."""
    build_fn = lambda name, seed: build(name, batch, args.layers, seed)  # noqa: E731
    wanted = [m for m in args.methods if f"{m}@{key}:{batch}" not in args.skip]
    base, x, y, loss_fn, methods, failed = overhead.setup_methods(key, wanted, args.seed, build_fn)
    row["params"], row["failed"], truth = sum(p.numel() for p in base.parameters()), failed, None
    row["skipped"] = [m for m in args.methods if m not in wanted]
    if not args.no_check:
        say("  per-sample loop, float64")
        truth = loop_norms(base, x, y, loss_fn, torch.float64)
        say("  per-sample loop, float32")
        row["check"] = {"loop32": rel_error(loop_norms(base, x, y, loss_fn, torch.float32), truth)}
    say("  one step of each method" + ("" if args.no_check else ", checked"))
    methods, errors = first_steps(methods, failed, truth)
    row.setdefault("check", {}).update(errors)
    del base, truth
    plain = next(m for m in methods if m.name == "plain")
    say(f"  timing {', '.join(m.name for m in methods)}")
    return overhead.time_methods(plain, [m for m in methods if m is not plain], args.repeats, args.warmup,
                                 f"{key} b{batch}")


def bench_row(key: str, batch: int, args) -> dict:
    """One table row: check, time (this process), then each method's peak (subprocesses)."""
    row, t0 = {"model": key, "batch": batch, "layers": args.layers, "methods": {}}, time.perf_counter()
    say(f"{key} batch {batch}: building")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times, paired = checked_and_timed(key, batch, args, row)
    gc.collect()
    for name in times:
        say(f"  peak memory of {name} (subprocess)")
        spec = {"model": key, "batch": batch, "layers": args.layers, "seed": args.seed, "method": name,
                "threads": args.threads, "runs": args.memory_runs}
        row["methods"][name] = {"median_ms": 1e3 * statistics.median(times[name]),
                                "times_ms": [1e3 * t for t in times[name]],
                                "paired": statistics.median(paired[name]) if name in paired else 1.0,
                                **peak_in_subprocess(spec)}
    plain = row["methods"]["plain"]
    for r in row["methods"].values():
        r["time_ratio"] = r["median_ms"] / plain["median_ms"]
        r["peak_ratio"] = r["peak_bytes"] / plain["peak_bytes"] if "peak_bytes" in r and plain.get("peak_bytes") else None
    row["notes"] = check_notes(row["check"], row["failed"])
    row["elapsed_s"] = time.perf_counter() - t0
    say(f"{key} batch {batch}: done in {row['elapsed_s']:.0f} s; {row['notes']}")
    return row


# ---- output and CLI -----------------------------------------------------------------------------
def _cells(r: Optional[dict]) -> List[str]:
    if r is None:
        return ["skipped", "–"]
    mem = f"{r['peak_ratio']:.2f}× ({r['peak_bytes'] / memory.MiB:.0f} MiB)" if r.get("peak_ratio") else \
        f"– ({r.get('error', '?')[:60]})"
    return [f"{r['time_ratio']:.2f}× ({r['paired']:.2f})", mem]


def markdown(rows: List[dict]) -> str:
    lines = ["| model | batch | plain step | plain peak | gradnoise time (paired) | gradnoise memory "
             "| torch.func time (paired) | torch.func memory | exactness vs float64 loop |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        ms = row["methods"]["plain"]
        peak = f"{ms['peak_bytes'] / memory.MiB:.0f} MiB" if "peak_bytes" in ms else ms.get("error", "–")
        cells = [row["model"], str(row["batch"]), f"{ms['median_ms']:.0f} ms", peak]
        for name in ("gradnoise", "torch.func"):
            cells += ["fails", "–"] if name in row["failed"] else _cells(row["methods"].get(name))
        lines.append("| " + " | ".join(cells + [row["notes"]]) + " |")
    return "\n".join(lines)


def batches(p, specs: List[str], models: List[str]) -> Dict[str, List[int]]:
    """``--batch 8`` or ``--batch 4,8`` for every model; ``--batch gpt2:4,8,16`` for one."""
    out = {m: [DEFAULT_BATCH[m]] for m in models}
    for spec in specs or []:
        who, _, sizes = spec.rpartition(":")
        values = [int(s) for s in sizes.split(",") if s.strip().isdigit()]
        if len(values) != len(sizes.split(",")) or min(values) < 1 or (who and who not in BUILDERS):
            p.error(f"--batch {spec!r}: expected [MODEL:]B1,B2,... with B >= 1")
        for m in ([who] if who else models):
            if m in out:
                out[m] = values
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, repeats=5, warmup=1, models=",".join(BUILDERS), threads=1)
    p.add_argument("--batch", action="append", metavar="[MODEL:]B1,B2", help="batch sizes (repeatable)")
    p.add_argument("--methods", default=",".join(METHODS), help="from plain,gradnoise,torch.func")
    p.add_argument("--layers", type=int, help="transformer layers / blocks per stage (smoke runs)")
    p.add_argument("--memory-runs", type=int, default=2, help="measured steps per peak (median)")
    p.add_argument("--skip", action="append", default=[], metavar="METHOD@MODEL:B",
                   help="leave one method out of one row, e.g. torch.func@gpt2:16 (repeatable)")
    p.add_argument("--no-check", action="store_true", help="skip the per-sample-loop exactness check")
    p.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        return args
    args.models = split_checked(p, args.models, BUILDERS, "model")
    args.methods = split_checked(p, args.methods, METHODS, "method")
    if "plain" not in args.methods:
        args.methods.insert(0, "plain")
    if args.repeats < 1 or args.warmup < 0 or args.memory_runs < 1 or (args.layers is not None and args.layers < 1):
        p.error("--repeats, --memory-runs and --layers must be >= 1, --warmup >= 0")
    args.batches = batches(p, args.batch, args.models)
    for spec in args.skip:
        if spec.partition("@")[0] not in METHODS[1:] or ":" not in spec:
            p.error(f"--skip {spec!r}: expected METHOD@MODEL:BATCH, METHOD one of gradnoise,torch.func")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(json.loads(args.memory_child))
        return 0
    torch.set_num_threads(args.threads)
    load_before = load_average()
    where = importlib.util.find_spec("gradnoise").origin  # without importing: it may be mid-edit
    say(f"gradnoise from {where}; torch {torch.__version__}, {args.threads} threads")
    config = {"models": args.models, "batches": args.batches, "methods": args.methods, "layers": args.layers,
              "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup, "seed": args.seed,
              "memory_runs": args.memory_runs, "torch": torch.__version__, "gradnoise": where,
              "load_before": load_before}
    rows: List[dict] = []
    for key in args.models:
        for batch in args.batches[key]:
            rows.append(bench_row(key, batch, args))
            if args.json:
                write_json(args.json, {**config, "elapsed_s": time.perf_counter() - START}, rows)
    print(markdown(rows))
    print(f"\ntorch {torch.__version__}, threads {args.threads}, {args.repeats} rounds after {args.warmup} warm-up, "
          f"time ratio = median / median(plain) (paired in brackets), peak memory by profiler in a fresh process; "
          f"{time.perf_counter() - START:.0f} s in all; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
