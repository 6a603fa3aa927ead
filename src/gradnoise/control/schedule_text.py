"""The four outputs of ``gradnoise schedule``: ``table`` (for people), ``csv`` (for
anyone), ``json`` (the ``gradnoise-schedule`` object that
:class:`~gradnoise.control.AdaptiveBatchSampler` follows) and ``megatron`` (the
ramp-up arguments of :mod:`gradnoise.control.megatron`). Text in, nothing printed."""
from __future__ import annotations

import csv
import io
import json

from ..formats import json_safe
from ..numbers import fmt_num
from . import megatron
from .schedule import Schedule, to_json

FORMATS = ("table", "csv", "json", "megatron")
COLUMNS = ("samples", "tokens", "step", "batch_size", "tokens_per_batch", "lr_multiplier", "lr", "b_noise")


def _about(s: Schedule) -> str:
    noise = "preconditioned B_simple (the update direction's noise)" if s.basis == "preconditioned" else "B_simple"
    end = "the lower end of its 95 % interval" if s.criterion == "low" else "its smoothed value"
    grow = (f"grows ×{s.factor} when {end} exceeds the next size by {100 * s.margin:.0f} % "
            f"for {s.patience} logged steps")
    bounds = f"sizes {s.base_batch}·{s.factor}^k in [{s.min_batch}, {s.max_batch or '∞'}]"
    return f"from the run's smoothed {noise}; {grow}; {bounds}"


def table(s: Schedule) -> str:
    rows = to_json(s)["segments"]
    tok = s.tokens_per_sample is not None
    head = f"{'from samples':>14}" + (f"{'from tokens':>16}" if tok else "") + f"{'run step':>10}{'batch':>8}" \
        + (f"{'tokens/batch':>14}" if tok else "") + f"{'lr ×':>8}{'lr':>11}{'noise scale':>13}"
    out = [f"gradnoise schedule: {_about(s)}.",
           f"learning rate: {s.lr_rule} rule for the {s.family or 'unknown'} optimizer family"
           + (f", base lr {fmt_num(s.base_lr)} at batch {s.base_batch}" if s.base_lr is not None else ""),
           s.calibration_note or "uncalibrated (--calibration probe.json scales the noise scale by the probe's ratio)",
           "", head, "-" * len(head)]
    for r in rows:
        line = f"{r['samples']:>14,}" + (f"{r['tokens']:>16,}" if tok else "")
        line += f"{'—' if r['step'] is None else r['step']:>10}{r['batch_size']:>8}"
        line += f"{r['tokens_per_batch']:>14,}" if tok else ""
        line += f"{r['lr_multiplier']:>8.3g}{fmt_num(r['lr']) if r['lr'] is not None else '—':>11}"
        out.append(line + f"{fmt_num(r['b_noise']) if r['b_noise'] is not None else '—':>13}")
    out += ["", f"the monitored run consumed {s.run_samples:,} samples"
            + (f" ({round(s.run_samples * s.tokens_per_sample):,} tokens)" if tok else "")
            + "; the last size holds after that.",
            "noise scale: the (calibrated) value that made the switch, at the run step shown."]
    return "\n".join(out)


def csv_text(s: Schedule) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in to_json(s)["segments"]:
        w.writerow(["" if r[c] is None else r[c] for c in COLUMNS])
    return buf.getvalue().rstrip("\n")


def megatron_text(s: Schedule) -> str:
    ramp = megatron.fit(s)
    if ramp is None:
        return (f"--global-batch-size {s.segments[0].batch_size}\n"
                "# the schedule never grows: no --rampup-batch-size")
    lr = s.segments[-1].lr_multiplier
    return "\n".join([
        ramp.args,
        f"# Megatron grows the global batch from {ramp.start} by {ramp.increment} every "
        f"{ramp.samples / ((ramp.global_batch - ramp.start) // ramp.increment):,.0f} samples to "
        f"{ramp.global_batch} at {ramp.samples:,} samples",
        f"# fit to the schedule: at most {ramp.max_error:.0f} off (one increment = {ramp.increment}), "
        f"{ramp.mean_error:.1f} on average over the samples",
        f"# Megatron keeps --lr fixed during the ramp; the schedule's {s.lr_rule} rule gives lr × {lr:.3g} "
        f"at {ramp.global_batch}"]
        + ([f"# a linear ramp within one increment of this {len(s.segments)}-size schedule is a single jump: "
            "lower --max, or train in stages"] if ramp.increment == ramp.global_batch - ramp.start
           and len(s.segments) > 2 else []))


def render(s: Schedule, fmt: str) -> str:
    """The schedule as text in ``fmt`` (one of :data:`FORMATS`)."""
    if fmt == "table":
        return table(s)
    if fmt == "csv":
        return csv_text(s)
    if fmt == "json":
        return json.dumps(json_safe(to_json(s)), indent=2)
    if fmt == "megatron":
        return megatron_text(s)
    raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
