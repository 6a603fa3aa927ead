"""A batch-size schedule to train with, built from a monitored run's noise scale.

The signal. At each logged step ``t`` of a ``gradnoise-run`` file the noise scale is the
smoothed ``B_simple`` — for an Adam-family run (``header.optimizer.family == "adam"``)
the noise scale of the update direction (``preconditioned``) whenever the file has it
(steps without it are undefined, so the basis never mixes), else the raw one — times
an optional calibration ratio ``c`` (``proxy.ratio`` or ``proxy.preconditioned_ratio``
of a ``gradnoise-probe`` file, the branch-measured ``B_noise`` over the proxy)::

    s_t = c · low_t         (criterion "low": the lower end of the 95 % interval)
    s_t = c · B_simple_t    (criterion "value")

The lower end is the default: growing only once the noise scale is *known* to exceed
the next size is the safe side (a batch above the critical batch wastes data).

The axis. Samples consumed, ``S_t = Σ B_u`` over the run's steps ``u ≤ t`` (logged
steps ``t`` and ``t'`` stand for ``t' − t`` steps of ``B_t'``), and tokens
``S_t · tokens_per_sample`` when the run knows its tokens per sample (the median of
the steps that record it). The noise scale is a function of training progress, so the
schedule is keyed by data consumed, not by optimizer steps.

The sizes. ``B ∈ {base · factor^k : k ≥ 0} ∩ [min_batch, max_batch]`` (``base`` default:
the run's first batch size, the one its learning rate was tuned for; ``factor`` an
integer ≥ 2; ``max_batch`` default unbounded). The schedule starts at the smallest
and only grows. With the current size ``B`` a step *calls for* the largest size
``B'`` with ``s_t ≥ (1 + margin) · B'``; after ``patience`` consecutive logged steps
calling for more than ``B`` the size moves to the smallest of their calls (a level held
throughout), from the samples consumed after that step. An undefined ``s_t`` (no value
yet, ``[0, inf]`` interval read as low 0) restarts the count.

The learning rate. ``lr = base_lr · m(base, B)`` with the rules of
:mod:`gradnoise.stats.rules`: ``adam_sqrt`` (the square root of AdaScale's gain, the rule
the report's verdict gives the same run) for the Adam family, ``adascale`` for SGD,
``sqrt`` for an unknown optimizer (the cautious choice; ``linear`` on request;
AdaScale's and ``adam_sqrt``'s ``B_noise`` is ``c · B_simple_t`` at the switch).
``base_lr`` is the run header's ``optimizer.lr``, else the first step's ``lr``.

Pure: step dicts in, a :class:`Schedule` out (no torch, no files, except
:func:`gradnoise.formats.read_probe`, which reads and checks the calibration file). The schedule's JSON
(``gradnoise-schedule`` version 1, :func:`to_json`) is what
:class:`~gradnoise.control.AdaptiveBatchSampler` follows in its fixed mode::

    {"format": "gradnoise-schedule", "version": 1, "units": {...},
     "base_batch": 32, "factor": 2, "min_batch": 32, "max_batch": null,
     "basis": "preconditioned", "criterion": "low", "margin": 0.1, "patience": 5,
     "calibration": {"ratio": 3.0, "note": "..."} | null,
     "optimizer_family": "adam", "lr_rule": "sqrt", "base_lr": 0.001,
     "tokens_per_sample": 128 | null, "run_samples": 96000, "run_tokens": 12288000 | null,
     "segments": [{"samples": 0, "tokens": 0, "step": null, "batch_size": 32,
                   "tokens_per_batch": 4096, "lr_multiplier": 1.0, "lr": 0.001,
                   "b_noise": null}, ...]}

A segment holds from its ``samples`` (and ``tokens``) to the next segment's; the last
holds to the end of training. ``step`` is the run's step whose reading made the switch;
``b_noise`` the signal ``s_t`` there.
"""
from __future__ import annotations

import json
import math
import statistics
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

from ..errors import GradNoiseError
from ..formats import interval, json_safe, probe_ratio, to_float
from ..stats import rules

FORMAT, VERSION = "gradnoise-schedule", 1
CRITERIA = ("low", "value")
LR_RULES = ("linear", "sqrt", "adascale", "adam_sqrt")
UNITS = {"samples": "training samples consumed since the start (the global batch counts every rank's)",
         "tokens": "samples × tokens_per_sample (null when the run did not record tokens per sample)",
         "batch_size": "global batch in samples"}


class Segment(NamedTuple):
    """From ``samples`` consumed (``tokens``, or None) on, the global batch ``batch_size``
    and the learning rate ``base_lr · lr_multiplier``; ``step``/``b_noise``: the run's
    step and signal that made the switch (None for the first segment)."""

    samples: int
    tokens: Optional[int]
    step: Optional[int]
    batch_size: int
    lr_multiplier: float
    lr: Optional[float]
    b_noise: Optional[float]


class Schedule(NamedTuple):
    """A batch-size schedule (see the module docstring for the fields' meaning)."""

    segments: List[Segment]
    base_batch: int
    factor: int
    min_batch: int
    max_batch: Optional[int]
    basis: str
    criterion: str
    margin: float
    patience: int
    ratio: Optional[float]
    calibration_note: Optional[str]
    family: Optional[str]
    lr_rule: str
    base_lr: Optional[float]
    tokens_per_sample: Optional[float]
    run_samples: int


# ------------------------------------------------------------------ the run's signal
def _family(header: Dict[str, Any]) -> Optional[str]:
    opt = header.get("optimizer") if isinstance(header, dict) else None
    return opt.get("family") if isinstance(opt, dict) else None


def _reading(d: Optional[Dict[str, Any]]) -> Tuple[float, float]:
    """``(B_simple, low)`` of a step's (or its ``preconditioned``) smoothed noise."""
    if not isinstance(d, dict):
        return math.nan, math.nan
    sm = d.get("smoothed")
    value = to_float(sm.get("b_simple")) if isinstance(sm, dict) else math.nan
    return value, interval(d.get("b_simple_interval"))[0]


def basis_of(header: Dict[str, Any], steps: Sequence[Dict[str, Any]]) -> str:
    """``"preconditioned"`` for an Adam-family run whose file has that noise, else ``"raw"``."""
    if _family(header) == "adam" and any(isinstance(s.get("preconditioned"), dict) for s in steps):
        return "preconditioned"
    return "raw"


def signal(steps: Sequence[Dict[str, Any]], basis: str, criterion: str = "low",
           ratio: float = 1.0) -> List[Tuple[int, int, float, float]]:
    """``[(step, samples_after, s_t, c·B_simple_t)]`` along the run (module docstring);
    ``s_t`` NaN where undefined."""
    out, samples, prev = [], 0, -1
    for s in steps:
        step, b = int(s["step"]), s.get("batch_size")
        if not isinstance(b, int) or b < 1:
            raise GradNoiseError(f"step {step} has no batch size ({b!r}); a schedule needs the samples of every step")
        samples += b * max(1, step - prev)
        prev = step
        value, low = _reading(s.get("preconditioned") if basis == "preconditioned" else s)
        x = low if criterion == "low" else value
        ok = math.isfinite(x) and x > 0
        out.append((step, samples, ratio * x if ok else math.nan, ratio * value))
    return out


def tokens_per_sample(steps: Sequence[Dict[str, Any]]) -> Optional[float]:
    """The median ``tokens_per_sample`` of the steps that record one (None if none do)."""
    vals = [float(s["tokens_per_sample"]) for s in steps
            if isinstance(s.get("tokens_per_sample"), (int, float)) and s["tokens_per_sample"] > 0]
    return statistics.median(vals) if vals else None


# ------------------------------------------------------------------ the sizes
def grid(base: int, factor: int, min_batch: int, max_batch: Optional[int]) -> Tuple[int, Optional[int]]:
    """``(first, last)``: the smallest ``base·factor^k`` in the bounds and the largest
    (None: unbounded). ``ValueError`` on bad sizes or an empty grid."""
    for name, v in (("base batch", base), ("factor", factor), ("min batch", min_batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"the {name} must be a positive whole number, got {v!r}")
    if factor < 2:
        raise ValueError(f"the factor must be a whole number ≥ 2 (sizes are base × factor^k), got {factor}")
    bad_max = isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < min_batch
    if max_batch is not None and bad_max:
        raise ValueError(f"the max batch must be a whole number ≥ the min batch {min_batch}, got {max_batch!r}")
    first = base
    while first < min_batch:
        first *= factor
    if max_batch is not None and first > max_batch:
        raise ValueError(f"no size base × factor^k = {base} × {factor}^k lies in [{min_batch}, {max_batch}]")
    last = None
    if max_batch is not None:
        last = first
        while last * factor <= max_batch:
            last *= factor
    return first, last


def _call(s: float, cur: int, factor: int, margin: float, last: Optional[int]) -> int:
    """The largest size ≥ ``cur`` of the grid with ``s ≥ (1 + margin)·size`` (``cur`` if none)."""
    size = cur
    while math.isfinite(s) and s >= (1.0 + margin) * size * factor and (last is None or size * factor <= last):
        size *= factor
    return size


def _multiplier(rule: str, base: int, b: int, b_noise: float, prev: float) -> float:
    if rule in ("adascale", "adam_sqrt"):
        m = getattr(rules, rule)(base, b, b_noise)
        return prev if math.isnan(m) else m
    return getattr(rules, rule)(base, b)


def default_rule(family: Optional[str]) -> str:
    """``adam_sqrt`` (the square root of AdaScale's gain, as ``gradnoise report`` and
    AdaScale's adam-sqrt mode advise) for the Adam family, ``adascale`` for SGD, ``sqrt``
    for an unknown optimizer (the cautious choice)."""
    return {"sgd": "adascale", "adam": "adam_sqrt"}.get(family, "sqrt")


def build(header: Dict[str, Any], steps: Sequence[Dict[str, Any]], *, base: Optional[int] = None,
          factor: int = 2, min_batch: Optional[int] = None, max_batch: Optional[int] = None,
          margin: float = 0.1, patience: int = 5, criterion: str = "low", ratio: Optional[float] = None,
          calibration_note: Optional[str] = None, lr_rule: Optional[str] = None) -> Schedule:
    """The schedule of a run's step dicts (``gradnoise.read_run``), as in the module docstring.

    Raises:
        ValueError: bad sizes, factor, bounds, margin, patience, criterion, ratio or rule.
        GradNoiseError: the run has no steps, or no step with a defined signal.
    """
    if not steps:
        raise GradNoiseError("the run file has no step lines")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number ≥ 0, got {margin!r}")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ValueError(f"patience must be a whole number ≥ 1, got {patience!r}")
    if ratio is not None and not (math.isfinite(ratio) and ratio > 0):
        raise ValueError(f"the calibration ratio must be a finite number > 0, got {ratio!r}")
    family = _family(header)
    rule = lr_rule or default_rule(family)
    if rule not in LR_RULES:
        raise ValueError(f"lr rule must be one of {', '.join(LR_RULES)}, got {rule!r}")
    base = steps[0].get("batch_size") if base is None else base
    first, last = grid(base, factor, base if min_batch is None else min_batch, max_batch)
    basis = basis_of(header, steps)
    sig = signal(steps, basis, criterion, 1.0 if ratio is None else ratio)
    if not any(math.isfinite(x) for _, _, x, _ in sig):
        what = "preconditioned " if basis == "preconditioned" else ""
        end = "interval's lower end" if criterion == "low" else "value"
        raise GradNoiseError(f"no step of the run has a defined {what}B_simple ({end} > 0); "
                             "a schedule needs the monitor's smoothed noise scale")
    opt = header.get("optimizer") if isinstance(header.get("optimizer"), dict) else {}
    base_lr = next((float(v) for v in (opt.get("lr"), steps[0].get("lr")) if isinstance(v, (int, float))), None)
    tps = tokens_per_sample(steps)

    def segment(samples, step, b, m, b_noise):
        tok = None if tps is None else int(round(samples * tps))
        return Segment(samples, tok, step, b, m, None if base_lr is None else base_lr * m, b_noise)

    first_value = next((v for _, _, _, v in sig if math.isfinite(v)), math.nan)
    m0 = _multiplier(rule, base, first, first_value, 1.0)
    segs = [segment(0, None, first, m0, None)]
    cur, calls = first, []
    for step, samples, s, value in sig:
        call = _call(s, cur, factor, margin, last)
        calls = calls + [call] if call > cur else []
        if len(calls) >= patience:
            cur = min(calls[-patience:])
            m = _multiplier(rule, base, cur, value, segs[-1].lr_multiplier)
            segs.append(segment(samples, step, cur, m, s))
            calls = []
    return Schedule(segs, base, factor, base if min_batch is None else min_batch, max_batch, basis, criterion,
                    float(margin), patience, ratio, calibration_note, family, rule, base_lr, tps, sig[-1][1])


def batch_at(segments: Sequence[Segment], samples: float) -> Segment:
    """The segment in force once ``samples`` have been consumed."""
    cur = segments[0]
    for seg in segments:
        if seg.samples <= samples:
            cur = seg
    return cur


# ------------------------------------------------------------------ calibration
def calibration(probe: Dict[str, Any], basis: str) -> Tuple[Optional[float], str]:
    """``(ratio, note)`` from a probe object for the run's basis: ``proxy.ratio`` (raw) or
    ``proxy.preconditioned_ratio``. A missing, null or non-positive ratio is no
    calibration: ``(None, why)``; the note then says the schedule is uncalibrated."""
    proxy = probe.get("proxy") if isinstance(probe.get("proxy"), dict) else {}
    mc = probe.get("mccandlish") if isinstance(probe.get("mccandlish"), dict) else {}
    ratio, key = probe_ratio(probe, basis == "preconditioned")
    b_noise, b_simple = to_float(mc.get("b_noise")), to_float(proxy.get("b_simple"))
    if ratio is None:
        why = mc.get("reason") if isinstance(mc.get("reason"), str) else "the branches could not measure B_noise"
        given = json.dumps(json_safe(proxy.get(key)))
        return None, (f"no calibration: the probe file's proxy.{key} is {given} ({why}); "
                      "the schedule follows the uncalibrated noise scale")
    src = f"B_noise {b_noise:.4g} / B_simple {b_simple:.4g}" if basis == "raw" and math.isfinite(b_noise + b_simple) \
        else f"the probe's proxy.{key}"
    return ratio, f"calibrated: {basis} B_simple × {ratio:.3g} ({src})"


# ------------------------------------------------------------------ the JSON the sampler reads
def to_json(s: Schedule) -> Dict[str, Any]:
    """The schedule as a ``gradnoise-schedule`` object (module docstring)."""
    tps = s.tokens_per_sample
    return {"format": FORMAT, "version": VERSION, "units": UNITS, "base_batch": s.base_batch, "factor": s.factor,
            "min_batch": s.min_batch, "max_batch": s.max_batch, "basis": s.basis, "criterion": s.criterion,
            "margin": s.margin, "patience": s.patience,
            "calibration": None if s.ratio is None and s.calibration_note is None
            else {"ratio": s.ratio, "note": s.calibration_note},
            "optimizer_family": s.family, "lr_rule": s.lr_rule, "base_lr": s.base_lr, "tokens_per_sample": tps,
            "run_samples": s.run_samples, "run_tokens": None if tps is None else int(round(s.run_samples * tps)),
            "segments": [{**seg._asdict(),
                          "tokens_per_batch": None if tps is None else int(round(seg.batch_size * tps))}
                         for seg in s.segments]}


def segments_from_json(obj: Any, where: str = "schedule") -> List[Tuple[int, int, float]]:
    """``[(samples, batch_size, lr_multiplier)]`` of a ``gradnoise-schedule`` object, checked:
    starts at 0 samples, samples increase, sizes are positive whole numbers that never shrink."""
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        fmt = obj.get("format") if isinstance(obj, dict) else None
        raise ValueError(f"{where}: {'a ' + fmt + ' file' if isinstance(fmt, str) else 'no format'}, "
                         f"not a {FORMAT} file (gradnoise schedule --format json writes one)")
    if obj.get("version") != VERSION:
        raise ValueError(f"{where}: version {obj.get('version')!r} of {FORMAT} is not supported (reads {VERSION})")
    out: List[Tuple[int, int, float]] = []
    for i, seg in enumerate(obj.get("segments") or []):
        try:
            n, b, m = int(seg["samples"]), int(seg["batch_size"]), float(seg["lr_multiplier"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{where}: segment {i} needs samples, batch_size and lr_multiplier") from None
        if b < 1 or not (math.isfinite(m) and m > 0) or (out and (n <= out[-1][0] or b < out[-1][1])):
            raise ValueError(f"{where}: segment {i} breaks the schedule (samples must increase, sizes be "
                             "positive and never shrink, multipliers be finite and > 0)")
        out.append((n, b, m))
    if not out or out[0][0] != 0:
        raise ValueError(f"{where}: the schedule's first segment must start at 0 samples")
    return out
