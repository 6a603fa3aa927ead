"""The ``gradnoise`` command: parse, call a study, print. Errors are one line and a
non-zero exit (``--debug`` shows the traceback)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from .studies.models import MODELS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gradnoise", description="Measure the noise of mini-batch gradients.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command")
    m = sub.add_parser("measure", help="per-layer gradient noise of one batch of the built-in digits data")
    m.add_argument("--model", choices=MODELS, default="mlp")
    m.add_argument("--batch-size", type=int, default=128)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def _fmt(v, spec: str = ".3g") -> str:
    return "—" if v is None else format(v, spec)


def print_measure(r: dict, out=sys.stdout) -> None:
    """The per-layer table of :func:`gradnoise.studies.measure.measure`."""
    head = f"{'layer':<28}{'params':>9}{'tr(Σ)':>12}{'|G|²':>12}{'B_simple':>11}{'noise share':>13}"
    print(f"gradnoise measure: {r['model']} on digits, one batch of {r['batch_size']} "
          f"of {r['population']} samples (seed {r['seed']}), loss {r['loss']:.4f}\n", file=out)
    print(head, file=out)
    print("-" * len(head), file=out)
    for row in r["layers"] + [{"layer": "total", **r["total"]}]:
        if row["layer"] == "total":
            print("-" * len(head), file=out)
        share = "—" if row["noise_share"] is None else f"{100 * row['noise_share']:.1f} %"
        print(f"{row['layer']:<28}{row['params']:>9,}{_fmt(row['trace_cov']):>12}"
              f"{_fmt(row['grad_sq_norm']):>12}{_fmt(row['b_simple']):>11}{share:>13}", file=out)
    print("\ntr(Σ): variance of one sample's gradient; |G|²: squared norm of the true gradient;", file=out)
    print("B_simple = tr(Σ)/|G|²: batches much larger than it buy little (McCandlish et al. 2018).", file=out)
    if r["total"]["reason"]:
        print(f"note: {r['total']['reason']}", file=out)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command in (None, "measure"):
            from .studies.measure import measure

            r = measure(getattr(args, "model", "mlp"), getattr(args, "batch_size", 128), getattr(args, "seed", 0))
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
