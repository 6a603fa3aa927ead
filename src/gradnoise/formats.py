"""The two file formats gradnoise writes, in one place: versions, encoding, readers and
validation. The monitor writes run files, the studies write study files, the report
reads both; none of them re-implements any of this.

Both are JSON Lines: one object per line, each with a ``type``, appended and flushed line
by line, so a reader sees every finished line while the writer runs and a killed writer
leaves a readable prefix (a half-written last line is skipped with a warning). Numbers
are encoded by :func:`json_safe`: an undefined number is ``null``, an infinite one
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
FORMATS = {STUDY_FORMAT: STUDY_VERSIONS, RUN_FORMAT: RUN_VERSIONS}

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
    if obj.get("version") not in FORMATS[fmt]:
        raise ValueError(f"{where}: version {obj.get('version')!r} of {fmt} is not supported by this gradnoise "
                         f"(it reads version {', '.join(map(str, FORMATS[fmt]))}); upgrade gradnoise")
    if fmt == STUDY_FORMAT and not isinstance(obj.get("study"), str):
        raise ValueError(f"{where}: the study file's header names no study")
    return fmt


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
    for lineno, raw in enumerate(_read_bytes(path).split(b"\n"), start=1):
        if raw.strip():
            obj, err = _parse(raw)
            if err is not None:
                raise ValueError(f"{path}, line {lineno}: not JSON, so neither a {STUDY_FORMAT} "
                                 f"nor a {RUN_FORMAT} file ({err})")
            return check_header(obj, path, lineno)
    raise ValueError(f"{path}: the file is empty (no header line)")


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
