"""The ``gradnoise`` command: parse, call a study or the report, print. Errors are one
line and a non-zero exit (``--debug`` shows the traceback).

    gradnoise study [STUDY ...] [--task SPEC ...] [--seed N] [--out DIR] [--quiet] [--threads N]
        (SPEC: digits-mlp, digits-cnn, path/to/file.py:function or package.module:function)
    gradnoise report RUN.jsonl [...] [--out DIR]
    gradnoise measure [--model mlp|cnn|transformer | --task SPEC] [--batch-size B] [--json]
    gradnoise schedule RUN.jsonl [--calibration probe.json] [--format table|csv|json|megatron] [...]
    gradnoise probe --task SPEC [--checkpoint PATH] [--batch-sizes 16,32,...] [--seeds N] [--budget SAMPLES] [...]
    gradnoise --version
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from typing import List, Optional

from . import __version__
from .numbers import fmt_num
from .studies.names import MODEL_NAMES as MODELS
from .studies.names import STUDY_NAMES as NAMES

DEFAULT_OUT = "gradnoise-report"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gradnoise", description="Measure the noise of mini-batch gradients.")
    p.add_argument("--debug", action="store_true", help="show tracebacks (stop at the first failing study)")
    p.add_argument("--version", action="version", version=f"gradnoise {__version__}")
    sub = p.add_subparsers(dest="command")
    m = sub.add_parser("measure", help="per-layer gradient noise of one batch (built-in model or your task)")
    _debug_option(m)
    which = m.add_mutually_exclusive_group()
    which.add_argument("--model", choices=MODELS, default="mlp", help="a built-in model on the digits data")
    which.add_argument("--task", metavar="SPEC", help="your task: path/to/file.py:function or package.module:function "
                                                      "(the protocol of gradnoise study --task)")
    m.add_argument("--batch-size", type=_count, default=128)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _study_parser(sub)
    r = sub.add_parser("report", help="an HTML report from the run files a NoiseMonitor wrote")
    r.add_argument("runs", nargs="+", metavar="RUN.jsonl", help="gradnoise-run files (or study files)")
    r.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    r.add_argument("--quiet", action="store_true", help="print only the report's path")
    _debug_option(r)
    _schedule_parser(sub)
    _probe_parser(sub)
    return p


def _debug_option(sub) -> None:
    """``--debug`` after the subcommand too (SUPPRESS: it never resets an earlier one)."""
    sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")


def _study_parser(sub) -> None:
    s = sub.add_parser("study", help="reproduce the theory on real data and write an HTML report",
                       description="Studies: " + ", ".join(NAMES) + " (default: all).")
    s.add_argument("studies", nargs="*", metavar="STUDY", help="which studies (default: all)")
    s.add_argument("--task", action="append", default=[], metavar="SPEC",
                   help="digits-mlp, digits-cnn, or your task as path/to/file.py:function or "
                        "package.module:function (repeatable; default: both digits tasks)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    s.add_argument("--quiet", action="store_true", help="no progress bars, only the report's path")
    s.add_argument("--size", choices=("tiny", "default"), default="default",
                   help="tiny: a smoke run in seconds (numbers too rough to read)")
    s.add_argument("--run", action="append", default=[], metavar="RUN.jsonl",
                   help="run file(s) for the recommend study (default: the trajectory study's)")
    s.add_argument("--lr", type=_positive, help="SGD learning rate of law and trajectory (default 0.1)")
    s.add_argument("--lrs", type=_floats, help="comma-separated learning-rate grid of the sweeps")
    s.add_argument("--batch-sizes", type=_sizes, help="comma-separated batch sizes of the sweeps")
    s.add_argument("--target-loss", type=_positive, help="loss the critical-batch and adaptive runs train to "
                                                           "(full-data, default 0.2 and 0.3) and lm's (held-out "
                                                           "next-byte loss, default 2.4)")
    s.add_argument("--threads", type=_threads, help="torch threads (default 1: the studies' models are tiny, and "
                                                    "one thread stays fast when the machine is busy)")
    _debug_option(s)


def _schedule_parser(sub) -> None:
    s = sub.add_parser("schedule", help="a batch-size schedule (and its learning rates) from a run file's noise scale",
                       description="A batch-size schedule that only grows, in powers of --factor times a base "
                                   "batch, following the run's smoothed B_simple (see gradnoise.control.schedule).")
    s.add_argument("run", metavar="RUN.jsonl", help="a gradnoise-run file a NoiseMonitor wrote")
    s.add_argument("--calibration", metavar="probe.json", help="scale the noise scale by the probe's ratio")
    s.add_argument("--format", choices=("table", "csv", "json", "megatron"), default="table",
                   help="table (default), csv, json (for AdaptiveBatchSampler(schedule=...)) or megatron "
                        "(--rampup-batch-size)")
    s.add_argument("--base", type=float, help="base batch (default: the run's first batch size)")
    s.add_argument("--factor", type=float, default=2, help="sizes are base × factor^k (whole, ≥ 2; default 2)")
    s.add_argument("--min", type=float, help="smallest batch (default: the base)")
    s.add_argument("--max", type=float, help="largest batch (default: unbounded)")
    s.add_argument("--margin", type=float, default=0.1, help="grow when the noise scale exceeds the next size by "
                                                             "this fraction (default 0.1)")
    s.add_argument("--patience", type=float, default=5, help="for this many logged steps in a row (default 5)")
    s.add_argument("--criterion", choices=("low", "value"), default="low",
                   help="low: the interval's lower end (default); value: the smoothed value")
    s.add_argument("--lr-rule", choices=("linear", "sqrt", "adascale", "adam_sqrt"),
                   help="default: adam_sqrt for Adam-family, adascale for SGD, sqrt for unknown optimizers")
    _debug_option(s)


def _probe_parser(sub) -> None:
    s = sub.add_parser("probe", help="the critical batch measured by branching from a checkpoint, B_simple calibrated",
                       description="Short branches of training at several batch sizes from one checkpoint of the "
                                   "task (see gradnoise.studies.probe_task for the checkpoint format).")
    s.add_argument("--task", required=True, metavar="SPEC",
                   help="digits-mlp, digits-cnn, pydoc-gpt, or your task as path/to/file.py:function or "
                        "package.module:function")
    s.add_argument("--checkpoint", metavar="PATH", help="torch.save({'model', 'optimizer', 'step'}) of your loop "
                                                        "(gradnoise.save_checkpoint); default: train "
                                                        "from the start")
    s.add_argument("--batch-sizes", type=_sizes, help="comma-separated branch batch sizes (default base × ½ … 16)")
    s.add_argument("--seeds", type=_count, default=3, help="branches per batch size (default 3)")
    s.add_argument("--budget", type=_whole(1), help="samples per branch (default 64 base batches)")
    s.add_argument("--base-batch", type=_count, default=32, help="the run's batch size (default 32)")
    s.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd", help="default sgd")
    s.add_argument("--lr", type=_positive, help="learning rate (default 0.1 for sgd, 1e-3 for adamw, or the "
                                                "checkpoint's)")
    s.add_argument("--train-steps", type=_whole(0), help="training steps at the base batch before the probe "
                                                         "(default 100, 0 from a checkpoint)")
    s.add_argument("--lr-grid", type=_floats, default=[1.0], help="comma-separated multipliers of each branch's "
                                                                  "learning rate (default 1)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    s.add_argument("--quiet", action="store_true", help="no progress bar, only the report's path")
    _debug_option(s)


def run_probe(args, out=None) -> int:
    """``gradnoise probe``: check, train to the branch point, probe, write the probe file
    and its report page, print the readings."""
    out = out or sys.stdout
    from .report import build_report
    from .studies import probe_task

    cfg = probe_task.Config(task=args.task, checkpoint=args.checkpoint, batch_sizes=args.batch_sizes,
                            seeds=args.seeds, budget=args.budget, base_batch=args.base_batch,
                            optimizer=args.optimizer, lr=args.lr, train_steps=args.train_steps,
                            lr_grid=tuple(args.lr_grid), seed=args.seed, out=args.out, quiet=args.quiet)
    doc, path = probe_task.run(cfg)
    page = build_report([path], args.out)
    if not args.quiet:
        for line in probe_task.summary_lines(doc):
            print(line, file=out)
        print(f"probe file: {path}", file=out)
    print(f"report: {page}", file=out)
    return 0


def run_schedule(args, out=None) -> int:
    """``gradnoise schedule``: read the run (and the probe), build, print in ``--format``."""
    from .control import schedule as sc
    from .control.schedule_text import render
    from .formats import read_probe, read_run

    def whole(v):
        return int(v) if v is not None and float(v).is_integer() else v

    probe = read_probe(args.calibration) if args.calibration else None
    header, steps = read_run(args.run)
    ratio = note = None
    if probe is not None:
        ratio, note = sc.calibration(probe, sc.basis_of(header, steps))
        if ratio is None:  # printed, not warned: PYTHONWARNINGS=ignore must not hide it
            print(f"gradnoise: warning: {note}", file=sys.stderr)
    sched = sc.build(header, steps, base=whole(args.base), factor=whole(args.factor), min_batch=whole(args.min),
                     max_batch=whole(args.max), margin=args.margin, patience=whole(args.patience),
                     criterion=args.criterion, ratio=ratio, calibration_note=note, lr_rule=args.lr_rule)
    print(render(sched, args.format), file=out or sys.stdout)
    return 0


def _floats(text: str) -> List[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not vals or not all(math.isfinite(v) and v > 0 for v in vals):
        raise argparse.ArgumentTypeError(f"need finite positive numbers, got {text!r}")
    return vals


def _positive(text: str) -> float:
    """One finite number > 0 (a learning rate, a target loss)."""
    vals = _floats(text)
    if len(vals) != 1:
        raise argparse.ArgumentTypeError(f"need one finite positive number, got {text!r}")
    return vals[0]


def _whole(minimum: int):
    """An option type: one whole number ≥ ``minimum``."""
    def parse(text: str) -> int:
        vals = _ints(text)
        if len(vals) != 1 or vals[0] < minimum:
            raise argparse.ArgumentTypeError(f"need a whole number of at least {minimum}, got {text!r}")
        return vals[0]
    return parse


_count = _whole(2)     # a batch size: B = 1 has no sample variance
_threads = _whole(1)


def _ints(text: str) -> List[int]:
    vals = _floats(text)
    if any(v != int(v) for v in vals):
        raise argparse.ArgumentTypeError(f"need whole numbers, got {text!r}")
    return [int(v) for v in vals]


def _sizes(text: str) -> List[int]:
    """Batch sizes of a sweep: whole numbers ≥ 2 (the monitor needs two samples)."""
    vals = _ints(text)
    if min(vals) < 2:
        raise argparse.ArgumentTypeError(f"batch sizes must be at least 2, got {text!r}")
    return vals


def print_measure(r: dict, out=None) -> None:
    """The per-layer table of :func:`gradnoise.studies.measure.measure`, with a footer
    that explains each column."""
    out = out or sys.stdout
    width = max([28] + [len(row["layer"]) + 2 for row in r["layers"]])
    head = f"{'layer (type)':<{width}}{'params':>10}{'tr(Σ)':>12}{'|G|²':>12}{'B_simple':>11}{'noise share':>13}"
    print(f"gradnoise measure: {r['model']} on {r['data']}, one batch of {r['batch_size']} "
          f"of {r['population']} samples (seed {r['seed']}), loss {r['loss']:.4f}\n", file=out)
    print(head, file=out)
    print("-" * len(head), file=out)
    for row in r["layers"] + [{"layer": "total", **r["total"]}]:
        if row["layer"] == "total":
            print("-" * len(head), file=out)
        share = "—" if row["noise_share"] is None else f"{100 * row['noise_share']:.1f} %"
        print(f"{row['layer']:<{width}}{row['params']:>10,}{fmt_num(row['trace_cov']):>12}"
              f"{fmt_num(row['grad_sq_norm']):>12}{fmt_num(row['b_simple']):>11}{share:>13}", file=out)
    print("\nlayer (type): the module that owns the parameters, by its path in the model, and its class.", file=out)
    print("params: its trainable parameters. tr(Σ): the variance of one sample's gradient around the true", file=out)
    print("  gradient (unbiased, finite-population corrected). |G|²: the squared norm of the true gradient.", file=out)
    print("B_simple = tr(Σ)/|G|²: the noise scale; batches much larger than it buy little (McCandlish et", file=out)
    print("  al. 2018); — where |G|² is not above 0 in this batch. noise share: the layer's part of tr(Σ).", file=out)
    if r["total"]["reason"]:
        print(f"note: {r['total']['reason']}", file=out)


def _failures(outcomes) -> List[str]:
    return [f"{o.study} on {o.task}: {o.error}" for o in outcomes if o.error is not None]


def _skipped(outcomes) -> List[str]:
    return [f"{o.study} on {o.task}: {o.skipped}" for o in outcomes if o.skipped is not None]


def run_study(args, out=None) -> int:
    """``gradnoise study``: run, build the report, print a summary, the verdict and the
    report's path. Studies that do not fit a task are skipped with a note (exit 0);
    after Ctrl-C the page is rebuilt from the study files present, the interrupted
    study listed as missing (exit 130)."""
    out = out or sys.stdout
    from .report import build_report, verdict_lines
    from .report.verdict import WIDTH
    from .studies import registry, runner

    runner.set_threads(args.threads)
    outcomes = runner.run_studies(
        args.studies, args.task, args.out, seed=args.seed, size=args.size, quiet=args.quiet,
        overrides=runner.Overrides(lr=args.lr, lrs=args.lrs, batch_sizes=args.batch_sizes,
                                   target_loss=args.target_loss), run_files=args.run, keep_going=not args.debug)
    interrupted = any(o.interrupted for o in outcomes)
    files = runner.study_files(args.out)
    failures = _failures(outcomes)
    page = build_report(files, args.out, failures=failures, skipped=_skipped(outcomes)) if files else None
    done = [o for o in outcomes if o.error is None and o.skipped is None]
    if not args.quiet and (done or _skipped(outcomes)):
        print(f"gradnoise study (seed {args.seed}, size {args.size}):", file=out)
        for o in done:
            print(f"  {o.study:<15}{o.task:<24}{registry.get(o.study).line(o.summary)}  [{o.seconds:.0f} s]", file=out)
        for text in _skipped(outcomes):
            print(f"  skipped: {text}", file=out)
        if done:
            print(f"data files in {args.out}/", file=out)
    if not args.quiet and files:
        for text in verdict_lines(files, failures, width=WIDTH):
            print(text, file=out)
    if page is not None:
        print(f"report: {page}" + (" (incomplete: see the errors below)" if failures else ""), file=out)
    for f in failures:
        print(f"gradnoise: error: {f}", file=sys.stderr)
    if interrupted:
        print("gradnoise: interrupted: " + ("the report was rebuilt from the studies that finished" if page else
                                            "no study had finished, so there is no report"), file=sys.stderr)
        return 130
    return 2 if failures else 0


def run_report(args, out=None) -> int:
    """``gradnoise report``: the report of the given run files, its verdict and path."""
    out = out or sys.stdout
    from .report import build_report, verdict_lines
    from .report.verdict import WIDTH

    page = build_report(args.runs, args.out)
    if not args.quiet:
        for text in verdict_lines(args.runs, width=WIDTH):
            print(text, file=out)
    print(f"report: {page}", file=out)
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = str(message)
    text = text[len("gradnoise: "):] if text.startswith("gradnoise: ") else text
    print(f"gradnoise: warning: {text}", file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    with warnings.catch_warnings():
        if not args.debug:
            warnings.showwarning = _show_warning
        try:
            return _dispatch(args)
        except KeyboardInterrupt:
            if args.debug:
                raise
            print("gradnoise: interrupted", file=sys.stderr)
            return 130


def _dispatch(args) -> int:
    try:
        if args.command == "study":
            return run_study(args)
        if args.command == "report":
            return run_report(args)
        if args.command == "schedule":
            return run_schedule(args)
        if args.command == "probe":
            return run_probe(args)
        if args.command in (None, "measure"):
            from .studies.measure import measure

            r = measure(getattr(args, "model", "mlp"), getattr(args, "batch_size", 128), getattr(args, "seed", 0),
                        task=getattr(args, "task", None))
            if getattr(args, "json", False):
                print(json.dumps(r, indent=2))
            else:
                print_measure(r)
            return 0
    except Exception as e:  # one line for users; the traceback with --debug
        if args.debug:
            raise
        print(f"gradnoise: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
