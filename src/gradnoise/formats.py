"""The file formats gradnoise writes, in one place: versions, encoding, readers and
validation. The monitor writes run files, the studies write study files, the branch probe
writes probe files, the report reads all three; none of them re-implements any of this.

Run and study files are JSON Lines: one object per line, each with a ``type``, appended
and flushed line by line, so a reader sees every finished line while the writer runs and
a killed writer leaves a readable prefix (a half-written last line is skipped with a
warning). A probe file is one JSON object, written at once and atomically (a temporary
file renamed over the target), so a reader sees the whole file or none. Numbers are
encoded by :func:`json_safe`: an undefined number is ``null``, an infinite one
``"inf"`` / ``"-inf"`` — so "unbounded" and "undefined" stay apart. Readers refuse a
version they do not know.

``gradnoise-run`` (the monitor's run file), version 2::

    {"type": "header", "format": "gradnoise-run", "version": 2, "source": "per_sample",
     "every": 1, "beta": 0.95, "params": ["fc.weight", ...],
     "layers": {"fc": {"type": "Linear", "params": ["fc.weight", "fc.bias"]}, ...},
     "optimizer": {"class": "AdamW", "family": "adam", "groups": 1, "lr": 0.001,
                   "betas": [0.9, 0.999], "eps": 1e-08, "weight_decay": 0.01},
     "world_size": 1, "created": "2026-…Z"}
    {"type": "step", "step": 12, "source": "per_sample", "skipped": false, "flag": null,
     "loss_scale": null, "batch_size": 128, "n_groups": 128,
     "raw":      {"trace_cov": …, "grad_sq_norm": …, "b_simple": …, "flag": null},
     "smoothed": {"trace_cov": …, "grad_sq_norm": …, "b_simple": …,
                  "trace_cov_interval": [lo, hi], "grad_sq_norm_interval": [lo, hi]},
     "b_simple_interval": [low, high],
     "by_param": {"fc.weight": {"raw": {…}, "smoothed": {…}}, …},
     "by_layer": {"fc": {"smoothed": {…}, "b_simple_interval": [low, high]}, …},
     "loss": 2.31, "lr": 0.001, "passes": 1, "tokens_per_sample": 128,
     "preconditioned": {"smoothed": {…}, "b_simple_interval": [low, high]}}

``optimizer`` (``null`` when the monitor was not given one) has the class, its
``family`` — ``"adam"`` (a second-moment preconditioner), ``"sgd"`` or ``"other"`` — and
the first group's hyper-parameters it has. ``world_size`` counts data-parallel ranks. In
a step line ``loss`` is the training loss the loop gave (``null`` when not given), ``lr``
the first group's learning rate, ``passes`` the forward passes of this process in the
step (micro-batches), ``tokens_per_sample`` the positions per sample when the model's
first input is token ids, and ``preconditioned`` the smoothed noise of an Adam-type
optimizer's update direction (:mod:`gradnoise.monitor.precond`; ``null`` before the
optimizer has state or for other optimizers). Files written before these fields existed
lack them and are read as if they were ``null``.

Parameter and layer names are those of the user's model: a ``DistributedDataParallel``
or Lightning wrapper adds no prefix. A layer is the module that owns the parameters
(its path, ``""`` never: a parameter of the root module is its own layer, named like the
parameter) with the module's class name as ``type``. Intervals are 95 %, clipped to the
quantity's domain (``tr(Σ)``, ``|G|²``, ``B_simple`` ≥ 0): ``[66.0, "inf"]`` is a lower
bound, ``[0.0, "inf"]`` means "not determined from these steps", ``[null, null]`` "not
yet defined" (fewer than two steps). Version 1 files (no ``layers``, no ``by_layer``, no
smoothed intervals, ``b_simple_interval`` possibly ``["-inf", "inf"]``) are still read.

``gradnoise-study`` (one study on one task), version 2: ``<out>/<study>-<task>.jsonl``.
The header::

    {"type": "header", "format": "gradnoise-study", "version": 2, "study": "law",
     "task": "digits-mlp", "seed": 0, "size": "default", "config": {...},
     "created": "2026-…+00:00"}

Later lines, by study (undefined numbers are ``null``; intervals are ``[low, high]``
with unbounded ends written ``"inf"`` / ``"-inf"``):

``law``
    ``checkpoint``: ``{"checkpoint": "init"|"trained", "step", "population", "loss",
    "trace_cov", "grad_sq_norm"}`` — full-data values at fixed parameters; ``trace_cov``
    is the population variance ``(1/N) Σ||g_i − ∇J||²`` from the per-sample engine.
    ``point``: ``{"checkpoint", "batch_size", "batches", "mse", "mse_se", "predicted",
    "z"}`` — ``mse`` the Monte-Carlo mean of ``||ĝ_B − ∇J||²`` over ``batches`` batches
    drawn without replacement, ``mse_se`` its standard error, ``predicted`` =
    ``trace_cov/B · (N − B)/(N − 1)``, ``z = (mse − predicted)/mse_se``.
    ``summary``: ``{"max_abs_z", "checkpoint", "batch_size", "points"}``.
``trajectory``
    ``step``: ``{"step", "loss", "full_loss"}`` — the batch loss of every step and the
    full-data loss where it was evaluated (else ``null``). The noise of the same steps is
    in the monitor's run file ``config["run_file"]`` (format ``gradnoise-run``, beside
    this file). ``summary``: ``{"final_loss", "b_simple_first", "b_simple_first_step",
    "b_simple_first_interval", "b_simple_last", "b_simple_interval"}`` — the first smoothed
    ``B_simple`` whose interval is bounded (v2), and the last one.
``critical-batch``
    ``run``: ``{"batch_size", "lr", "seed", "reached", "steps", "examples",
    "final_loss", "b_simple", "b_simple_interval"}`` — one training run to
    ``config["target_loss"]``; ``steps``/``examples`` are ``null`` when it did not
    reach it; ``b_simple`` is the monitor's smoothed value at the end of the run.
    ``best``: ``{"batch_size", "seed", "lr", "steps", "examples"}`` — the fewest steps
    over the learning-rate grid. ``summary``: ``{"target_loss", "s_min", "e_min",
    "b_crit", "b_crit_interval", "b_crit_bound", "b_simple", "b_simple_interval", "points",
    "runs", "reason"}`` — the fit ``(S/S_min − 1)(E/E_min − 1) = 1``,
    ``B_crit = E_min/S_min``, to the ``points`` of the ``runs`` best runs that measure
    ``S`` (v2: a run that reached the target at its first evaluation, or whose best rate
    is an edge of the grid, is left out); ``b_crit`` is ``null`` when the points cannot
    support a fit, and ``b_crit_bound`` (``">512"``, ``"<8"``) records a fit beyond the
    sweep;
    ``b_simple`` is the median over the best runs of the monitor's smoothed value at
    their end and ``b_simple_interval`` the range of those values; ``reason`` (or
    ``null``) says why the fit is missing or doubtful (several notes joined by
    ``"; "``).
``lr-batch``
    ``cell``: ``{"batch_size", "lr", "final_loss", "diverged", "no_progress",
    "skipped"}`` — ``diverged``: the run blew up (NaN/inf, or a loss far above the
    initial one); ``no_progress``: it stayed finite but ended less than 0.1 % below its
    start (too small a rate, or stuck); ``skipped``: not run, since the two rates below it
    already diverged (counted as diverged). ``stable``: ``{"batch_size", "lr_max",
    "lr_best", "best_loss"}`` — the largest rate of the grid that trained (neither
    diverged nor made no progress) and the rate with the lowest final loss (``null``
    if none). ``summary``: ``{"eps_max", "b_noise", "b_noise_interval", "rms",
    "stable_fit", "b_simple", "best", "points", "reason"}`` — the fit
    ``ε(B) = ε_max/(1 + B_noise/B)`` to the ``points`` of ``best`` (``[[B, lr_best]]``)
    whose rate lies inside the grid (v2; ``null`` fields when they cannot support a fit,
    or the fit lies beyond the sweep); ``stable_fit`` is the same law
    fitted to ``lr_max`` (``{"eps_max", "b_noise", "b_noise_interval", "rms"}``, or
    ``null``); ``b_simple`` was measured at initialisation; ``reason`` (or ``null``)
    says why the fit is missing or doubtful (several notes joined by ``"; "``).
``recommend``
    ``summary``: ``{"run_file", "batch_size", "b_crit", "b_crit_interval", "steps", "step",
    "reason", "rules": [{"to_batch", "linear", "sqrt", "adascale"}, ...]}`` — the smoothed
    ``B_simple`` of the run's last measured step (``step``) as the critical batch size at
    that stage, and the
    learning-rate multiplier each rule gives for moving from ``batch_size`` to
    ``to_batch``.

``gradnoise-probe`` (the branch probe at one checkpoint), version 1: one JSON object,
``<out>/probe-<task>.json``, written by ``gradnoise probe`` (or ``write_probe(path,
gradnoise.probe(...))``, :func:`write_probe`), read by :func:`read_probe`::

    {"format": "gradnoise-probe", "version": 1, "created": "2026-…+00:00",
     "task": "digits-mlp", "checkpoint": {"step": 300, "loss": 0.41},
     "optimizer": {"class": "AdamW", "family": "adam", ...},
     "base_batch": 32, "lr": 0.001, "lr_rule": "sqrt", "budget": 8192,
     "batch_sizes": [16, 32, 64, 128, 256, 512], "seeds": 3,
     "branches": [{"batch_size": 64, "seed": 0, "lr": 0.0014, "steps": 128, "diverged": false,
                   "curve": [[samples, steps, held_out_loss], ...],
                   "steps_to_target": 40.5, "examples_to_target": 2592.0,
                   "loss_at_budget": 0.33}, ...],
     "target_loss": 0.36,
     "mccandlish": {"b_noise": 120.0, "interval": [80.0, 200.0], "s_min": 12.0, "e_min": 1440.0,
                    "points": [[batch_size, median_steps_to_target], ...], "reason": null},
     "merrill": {"b_crit": 128, "interval": [64, 256], "tolerance": 0.05, "best_loss": 0.31,
                 "losses": [[batch_size, median_loss_at_budget, [low, high]], ...], "reason": null},
     "proxy": {"b_simple": 40.0, "b_simple_interval": [30.0, 55.0],
               "preconditioned": 90.0, "preconditioned_interval": [60.0, 140.0],
               "ratio": 3.0, "ratio_interval": [1.5, 6.7],
               "preconditioned_ratio": 1.3, "preconditioned_ratio_interval": [0.6, 3.3],
               "batches": 8},
     "seconds": 42.0}

``checkpoint`` is the parent's step count (``null`` if unknown) and its held-out loss at
the branch point; ``optimizer`` is :func:`gradnoise.monitor.precond.describe` of the
parent's optimizer; ``base_batch`` and ``lr`` the parent's batch size and learning rate;
``lr_rule`` how a branch's rate follows its batch size (``"sqrt"`` for the Adam family,
``"linear"`` for SGD); ``budget`` the samples each branch may use (the
fixed budget of Merrill's form). ``branches`` has one entry per (batch size, seed): its
rate, steps taken, whether it diverged, its held-out loss ``curve`` evaluated along the
branch (first point: the checkpoint), the steps and examples it took to reach
``target_loss`` (``null`` if it did not) and its loss at the budget. ``mccandlish`` is the
fit ``S = S_min (1 + B_noise/B)`` to the median steps to ``target_loss`` at each batch
size (``points``); ``merrill`` the largest batch whose median loss at the budget stays
within ``tolerance`` of the best (``losses``, each with its interval across seeds);
``proxy`` the noise scale ``B_simple`` measured at the checkpoint on ``batches`` batches
of ``base_batch`` — raw, and of an Adam-family optimizer's update direction
(``preconditioned``: ``null`` unless the optimizer is of the Adam family and has state) —
and ``ratio`` = ``mccandlish.b_noise / b_simple`` (``preconditioned_ratio`` likewise).
Intervals are 95 %, ``[low, high]``, clipped to the quantity's domain (batch sizes ≥ 0),
or ``null``; ``reason`` (or ``null``) says why a critical batch is missing (every batch
equal, the bend outside the sweep). ``seconds`` is the probe's wall time. Where the probe
tried several learning rates per batch size, ``lr_grid`` lists the multipliers of the
rule's rate, each branch has its ``lr_multiplier``, and ``mccandlish`` / ``merrill`` have
``multipliers`` (``[[batch_size, multiplier], ...]``, the one each reading used); these
keys are optional, and readers ignore keys they do not know.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Optional, Tuple

RUN_FORMAT = "gradnoise-run"
RUN_VERSION = 2
RUN_VERSIONS = (1, 2)
STUDY_FORMAT = "gradnoise-study"
STUDY_VERSION = 2
STUDY_VERSIONS = (1, 2)
PROBE_FORMAT = "gradnoise-probe"
PROBE_VERSION = 1
PROBE_VERSIONS = (1,)
FORMATS = {STUDY_FORMAT: STUDY_VERSIONS, RUN_FORMAT: RUN_VERSIONS, PROBE_FORMAT: PROBE_VERSIONS}

Lines = List[Dict[str, Any]]


# ---------------------------------------------------------------- numbers
def json_safe(v: Any) -> Any:
    """Values JSON can hold: NaN -> ``None``, ±inf -> ``"inf"``/``"-inf"``; tuples become
    lists; dicts and lists are converted recursively."""
    if isinstance(v, float):
        if math.isnan(v):
            return None
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return v
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


def num(v: Optional[float]) -> Optional[float]:
    """A finite float for JSON, ``None`` for a missing or non-finite one (a quantity
    that has no meaningful infinity, such as a loss)."""
    return float(v) if v is not None and math.isfinite(v) else None


def to_float(v: Any) -> float:
    """A float from a file value: numbers as they are, ``"inf"``/``"-inf"`` as ±inf,
    ``None`` and anything else as NaN."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v.strip().lower() in ("inf", "+inf", "-inf"):
        return -math.inf if v.strip().startswith("-") else math.inf
    return math.nan


def interval(v: Any) -> Tuple[float, float]:
    """``(low, high)`` floats from a file's ``[low, high]`` (NaN ends when malformed)."""
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return to_float(v[0]), to_float(v[1])
    return math.nan, math.nan


# ---------------------------------------------------------------- headers
def run_header(source: str, every: int, beta: float, params, layers: Optional[Dict[str, Dict[str, Any]]] = None,
               optimizer: Optional[Dict[str, Any]] = None, world_size: int = 1) -> Dict[str, Any]:
    """The ``header`` line of a run file (module docstring)."""
    return {"type": "header", "format": RUN_FORMAT, "version": RUN_VERSION, "source": source, "every": every,
            "beta": beta, "params": list(params), "layers": dict(layers or {}), "optimizer": optimizer,
            "world_size": world_size, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def study_header(study: str, task: str, seed: int, size: str, config: Dict[str, Any]) -> Dict[str, Any]:
    """The ``header`` line of a study file (module docstring)."""
    return {"type": "header", "format": STUDY_FORMAT, "version": STUDY_VERSION, "study": study, "task": task,
            "seed": seed, "size": size, "config": config,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def check_header(obj: Any, where: str, lineno: int, expected: Optional[str] = None) -> str:
    """The header's format, after checking it is a header of a known format (``expected``
    when given) and version; ``ValueError`` naming ``where`` (and ``lineno`` when > 0)."""
    at = f"{where}, line {lineno}" if lineno else where
    if not isinstance(obj, dict) or obj.get("type") != "header" or "format" not in obj:
        raise ValueError(f"{at}: no header line (expected {{\"type\": \"header\", \"format\": ...}}, "
                         f"got {str(obj)[:60]!r})")
    fmt = obj["format"]
    if fmt not in FORMATS:
        raise ValueError(f"{where}: unknown format {fmt!r}; expected {expected or ' or '.join(FORMATS)}")
    if expected is not None and fmt != expected:
        raise ValueError(f"{where}: this is a {fmt} file, not a {expected} file")
    _check_version(fmt, obj.get("version"), where)
    if fmt == STUDY_FORMAT and not isinstance(obj.get("study"), str):
        raise ValueError(f"{where}: the study file's header names no study")
    return fmt


def _check_version(fmt: str, version: Any, where: str) -> None:
    if version not in FORMATS[fmt]:
        raise ValueError(f"{where}: version {version!r} of {fmt} is not supported by this gradnoise "
                         f"(it reads version {', '.join(map(str, FORMATS[fmt]))}); upgrade gradnoise")


# ---------------------------------------------------------------- readers
def read_jsonl(path: "os.PathLike[str] | str", check: Callable[[Any, str, int], Any],
               accept: Callable[[Dict[str, Any]], bool], what: str) -> Tuple[Dict[str, Any], Lines]:
    """The header and later lines of a JSON Lines file written line by line and flushed.

    Blank lines are ignored. A final line without its newline that is not a JSON object
    (a writer still running, or killed mid-line) is skipped with a warning.

    Args:
        path: the file.
        check: ``check(obj, path, lineno)`` raises ``ValueError`` unless ``obj`` (the
            first line) is a header this reader knows.
        accept: whether a later line (a dict) belongs in the file.
        what: the accepted lines, for the error message (``"a step line"``).

    Raises:
        ValueError: naming the file (and line) when it is missing, empty, has no header,
            or has a corrupt or unexpected line before the last.
    """
    path = os.fspath(path)
    data = _read_bytes(path)
    if not data.strip():
        raise ValueError(f"{path}: the file is empty (no header line)")
    rows = data.split(b"\n")  # rows[-1] is b"" when the file ends with a newline
    header: Optional[Dict[str, Any]] = None
    lines: Lines = []
    for lineno, raw in enumerate(rows, start=1):
        if not raw.strip():
            continue
        obj, err = _parse(raw)
        if lineno == len(rows) and header is not None and not isinstance(obj, dict):
            warnings.warn(f"{path}, line {lineno}: incomplete last line skipped "
                          "(file still being written, or its writer was killed)", stacklevel=3)
            break
        if err is not None:
            raise ValueError(f"{path}, line {lineno}: corrupt line, not JSON ({err})")
        if header is None:
            check(obj, path, lineno)
            header = obj
        elif isinstance(obj, dict) and accept(obj):
            lines.append(obj)
        else:
            raise ValueError(f"{path}, line {lineno}: expected {what}, not {raw[:80]!r}")
    if header is None:
        raise ValueError(f"{path}: no header line")
    return header, lines


def read_run(path: "os.PathLike[str] | str") -> Tuple[Dict[str, Any], Lines]:
    """Read and validate a ``gradnoise-run`` file.

    Returns:
        ``(header, steps)``: the header dict and the step dicts in file order, as written
        (undefined numbers ``None``, unbounded interval ends ``"inf"``/``"-inf"``).

    Raises:
        ValueError: naming the file (and line) when it is missing, empty, has no header,
            is of another format or an unknown version, or has a corrupt line before the last.
    """
    return read_jsonl(path, lambda obj, p, n: check_header(obj, p, n, RUN_FORMAT),
                      lambda obj: obj.get("type") == "step", "a step line")


def read_study(path: "os.PathLike[str] | str") -> Tuple[Dict[str, Any], Lines]:
    """Read and validate a ``gradnoise-study`` file.

    Returns:
        ``(header, lines)``: the header dict and every later line (dicts with a
        ``type``) in file order, as written.

    Raises:
        ValueError: naming the file (and line) when it is missing, empty, not JSON, has
            no header, is of another format or an unknown version, or has a corrupt
            line before the last.
    """
    return read_jsonl(path, lambda obj, p, n: check_header(obj, p, n, STUDY_FORMAT),
                      lambda obj: isinstance(obj.get("type"), str), "an object with a 'type'")


def sniff(path: "os.PathLike[str] | str") -> str:
    """The format of a file, from its first non-blank line (checked, version included).

    Raises:
        ValueError: naming the file when it is missing, empty, not JSON, has no header
            line, or is of an unknown format or version.
    """
    path = os.fspath(path)
    data = _read_bytes(path)
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if raw.strip():
            obj, err = _parse(raw)
            if err is not None:  # a probe file may spread its one object over several lines
                obj, whole = _parse(data)
                if whole is not None:
                    raise ValueError(f"{path}, line {lineno}: not JSON, so not a {STUDY_FORMAT}, {RUN_FORMAT} "
                                     f"or {PROBE_FORMAT} file ({err})")
            if _is_probe(obj):
                _check_version(PROBE_FORMAT, obj.get("version"), path)
                return PROBE_FORMAT
            return check_header(obj, path, lineno)
    raise ValueError(f"{path}: the file is empty (no header line)")


def top_object(path: "os.PathLike[str] | str") -> Any:
    """The parsed first non-blank line, or the whole file when that line is not JSON but
    the file is (one object over several lines); None when absent or neither is JSON."""
    first = first_object(path)
    if first is not None:
        return first
    try:
        return _parse(_read_bytes(os.fspath(path)))[0]
    except ValueError:
        return None


def first_object(path: "os.PathLike[str] | str") -> Any:
    """The parsed first non-blank line (None when absent or not JSON)."""
    try:
        with open(path, "rb") as f:
            for raw in f:
                if raw.strip():
                    return _parse(raw)[0]
    except OSError:
        return None
    return None


# ---------------------------------------------------------------- probe files
def _is_probe(obj: Any) -> bool:
    """A probe file's object: its own ``format``, no ``type`` (it is not a header line)."""
    return isinstance(obj, dict) and obj.get("format") == PROBE_FORMAT and "type" not in obj


def _number(v: Any) -> bool:
    """A file number: a finite int or float (not a bool), or ``"inf"``/``"-inf"``."""
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, float)):
        return math.isfinite(v)
    return v in ("inf", "-inf")


def _count(v: Any, least: int = 1) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def _nullable(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _interval(v: Any) -> bool:
    return v is None or (isinstance(v, list) and len(v) == 2 and all(x is None or _number(x) for x in v))


def _rows(*cells: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """A list of rows ``[cell, …]``, each cell passing its check."""
    def check(v: Any) -> bool:
        return isinstance(v, list) and all(
            isinstance(r, list) and len(r) == len(cells) and all(c(x) for c, x in zip(cells, r)) for r in v)
    return check


Check = Tuple[str, Callable[[Any], bool]]   # (what the value must be, its test)
NUMBER: Check = ("a number or null", _nullable(_number))
INTERVAL: Check = ("[low, high] or null", _interval)
TEXT: Check = ("a string", lambda v: isinstance(v, str))
NOTE: Check = ("a string or null", _nullable(lambda v: isinstance(v, str)))
OBJECT: Check = ("an object", lambda v: isinstance(v, dict))
COUNT: Check = ("a positive integer", _count)
INDEX: Check = ("an integer ≥ 0 or null", _nullable(lambda v: _count(v, 0)))

PROBE_KEYS: Dict[str, Check] = {
    "created": TEXT, "task": TEXT, "checkpoint": OBJECT,
    "optimizer": ("an object or null", _nullable(lambda v: isinstance(v, dict))),
    "base_batch": COUNT, "lr": NUMBER, "lr_rule": TEXT,
    "budget": ("a positive number", lambda v: _number(v) and v not in ("inf", "-inf") and v > 0),
    "batch_sizes": ("a non-empty list of positive integers", lambda v: isinstance(v, list) and bool(v)
                    and all(_count(b) for b in v)),
    "seeds": COUNT,
    "branches": ("a list of objects", lambda v: isinstance(v, list) and all(isinstance(b, dict) for b in v)),
    "target_loss": NUMBER, "mccandlish": OBJECT, "merrill": OBJECT, "proxy": OBJECT, "seconds": NUMBER,
}
PROBE_PARTS: Dict[str, Dict[str, Check]] = {
    "checkpoint": {"step": INDEX, "loss": NUMBER},
    "mccandlish": {"b_noise": NUMBER, "interval": INTERVAL, "s_min": NUMBER, "e_min": NUMBER,
                   "points": ("a list of [batch_size, median_steps_to_target]",
                              _rows(_count, _nullable(_number))), "reason": NOTE},
    "merrill": {"b_crit": NUMBER, "interval": INTERVAL, "tolerance": NUMBER, "best_loss": NUMBER,
                "losses": ("a list of [batch_size, median_loss_at_budget, [low, high]]",
                           _rows(_count, _nullable(_number), _interval)), "reason": NOTE},
    "proxy": {"b_simple": NUMBER, "b_simple_interval": INTERVAL, "preconditioned": NUMBER,
              "preconditioned_interval": INTERVAL, "ratio": NUMBER, "ratio_interval": INTERVAL,
              "preconditioned_ratio": NUMBER, "preconditioned_ratio_interval": INTERVAL, "batches": INDEX},
}
BRANCH_KEYS: Dict[str, Check] = {
    "batch_size": COUNT, "seed": ("an integer ≥ 0", lambda v: _count(v, 0)), "lr": NUMBER, "steps": INDEX,
    "diverged": ("true or false", lambda v: isinstance(v, bool)),
    "curve": ("a list of [samples, steps, held_out_loss]", _rows(*[_nullable(_number)] * 3)),
    "steps_to_target": NUMBER, "examples_to_target": NUMBER, "loss_at_budget": NUMBER,
}


def _check_keys(obj: Dict[str, Any], keys: Dict[str, Check], where: str, prefix: str = "") -> None:
    for key, (what, ok) in keys.items():
        if key not in obj:
            raise ValueError(f"{where}: the required key {prefix + key!r} is missing")
        if not ok(obj[key]):
            raise ValueError(f"{where}: {prefix + key} must be {what}, not {json.dumps(obj[key])[:60]}")


def check_probe(obj: Any, where: str) -> Dict[str, Any]:
    """``obj`` after checking it is a probe file's object (module docstring): its format and
    version, every required key and the type of each value; extra keys are allowed.

    Raises:
        ValueError: one line naming ``where`` and the first fault found.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: not a {PROBE_FORMAT} file (the file is not a JSON object)")
    fmt = obj.get("format")
    if fmt != PROBE_FORMAT:
        if fmt in FORMATS:
            raise ValueError(f"{where}: this is a {fmt} file, not a {PROBE_FORMAT} file")
        named = f"unknown format {fmt!r}" if "format" in obj else "no format field"
        raise ValueError(f"{where}: {named}; expected {PROBE_FORMAT}")
    _check_version(PROBE_FORMAT, obj.get("version"), where)
    _check_keys(obj, PROBE_KEYS, where)
    for part, keys in PROBE_PARTS.items():
        _check_keys(obj[part], keys, where, f"{part}.")
    for i, branch in enumerate(obj["branches"]):
        _check_keys(branch, BRANCH_KEYS, where, f"branches[{i}].")
    return obj


def probe_ratio(probe: Dict[str, Any], preconditioned: bool) -> Tuple[Optional[float], str]:
    """``(ratio, key)``: the probe's measured critical batch over the noise scale a run
    rests on — ``proxy.preconditioned_ratio`` (an Adam run's update direction) or
    ``proxy.ratio`` (raw) — None where it is missing, undefined or not positive."""
    key = "preconditioned_ratio" if preconditioned else "ratio"
    proxy = probe.get("proxy") if isinstance(probe.get("proxy"), dict) else {}
    v = to_float(proxy.get(key))
    return (v if math.isfinite(v) and v > 0 else None), key


def read_probe(path: "os.PathLike[str] | str") -> Dict[str, Any]:
    """Read and validate a ``gradnoise-probe`` file.

    Returns:
        The file's object, as written (undefined numbers ``None``, unbounded interval ends
        ``"inf"``/``"-inf"``).

    Raises:
        ValueError: one line naming the file when it is missing, empty, not JSON, of another
            format or an unknown version, lacks a required key or holds a value of the
            wrong type (:func:`check_probe`).
    """
    path = os.fspath(path)
    data = _read_bytes(path)
    if not data.strip():
        raise ValueError(f"{path}: the file is empty (expected one {PROBE_FORMAT} JSON object)")
    obj, err = _parse(data)
    if err is not None:
        raise ValueError(f"{path}: corrupt, not one JSON object ({err})")
    return check_probe(obj, path)


def _plain(v: Any) -> Any:
    """A numpy or torch scalar (or array) as Python numbers, for :func:`json.dumps`."""
    if hasattr(v, "tolist"):
        return json_safe(v.tolist())
    raise TypeError(f"{type(v).__name__} is not a number, string, list or object")


def write_probe(path: "os.PathLike[str] | str", obj: Dict[str, Any]) -> str:
    """Write a probe file atomically: encode ``obj`` with :func:`json_safe`, check it as
    :func:`read_probe` would, write it to a temporary file beside ``path`` and rename that
    over ``path`` (a reader sees the old file or the new one, never half of one).

    ``format``, ``version`` and ``created`` are filled in when ``obj`` lacks them.

    Returns:
        ``path``, as a string.

    Raises:
        ValueError: naming ``path`` when ``obj`` is not a valid probe object (nothing is
            written then).
    """
    path = os.fspath(path)
    head = {"format": PROBE_FORMAT, "version": PROBE_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    full = {**head, **obj}
    try:
        text = json.dumps(json_safe(full), default=_plain, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: cannot be written as JSON ({e})") from None
    check_probe(json.loads(text), path)
    tmp = f"{path}.{os.getpid()}.partial"  # beside the target: the rename stays on one file system
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from None


def _parse(raw: bytes) -> Tuple[Any, Optional[Exception]]:
    try:
        return json.loads(raw.decode("utf-8")), None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        return None, e
