"""What the monitor produces for each optimizer step, and its JSON form.

Run-file format ``gradnoise-run`` version 1 (JSON Lines, one object per line, each with a
``type``): the first line is a ``header``, every later line a ``step``::

    {"type": "header", "format": "gradnoise-run", "version": 1, "source": "per_sample",
     "every": 1, "beta": 0.95, "params": ["fc.weight", ...], "created": "2026-…Z"}
    {"type": "step", "step": 12, "source": "per_sample", "skipped": false, "flag": null,
     "loss_scale": null, "batch_size": 128, "n_groups": 128,
     "raw":      {"trace_cov": …, "grad_sq_norm": …, "b_simple": …, "flag": null},
     "smoothed": {"trace_cov": …, "grad_sq_norm": …, "b_simple": …},
     "b_simple_interval": [low, high],
     "by_param": {"fc.weight": {"raw": {…}, "smoothed": {…}}, …}}

Numbers that are undefined are ``null``; an unbounded interval end is ``"inf"`` or
``"-inf"``. Readers must refuse a ``version`` they do not know.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from ..stats import NoiseStats

FORMAT = "gradnoise-run"
VERSION = 1


@dataclass(frozen=True)
class StepRecord:
    """The noise of one optimizer step.

    Attributes:
        step: the optimizer step's index (counting every step, measured or not).
        source: ``"per_sample"``, ``"microbatch"`` or ``"ddp"``.
        raw: this step alone (:class:`~gradnoise.stats.NoiseStats`, with ``by_param``).
        smoothed: from debiased EMAs of ``tr(Σ)`` and ``|G|²`` taken separately, and
            their ratio; ``by_param`` likewise.
        b_simple_interval: 95 % interval of the smoothed ``B_simple`` (Fieller);
            ``(-inf, inf)`` while the signal is not clearly above the noise.
        skipped: True when this step was not folded into the averages (its raw
            statistics are flagged, e.g. inf/NaN gradients of a mixed-precision step).
        flag: why it was skipped, or the raw statistics' flag.
        loss_scale: the GradScaler scale that was removed, if any.
    """

    step: int
    source: str
    raw: NoiseStats
    smoothed: NoiseStats
    b_simple_interval: Tuple[float, float]
    skipped: bool = False
    flag: Optional[str] = None
    loss_scale: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        """The ``step`` line of the run file (module docstring)."""
        return {
            "type": "step",
            "step": self.step,
            "source": self.source,
            "skipped": self.skipped,
            "flag": self.flag,
            "loss_scale": self.loss_scale,
            "batch_size": self.raw.batch_size,
            "n_groups": self.raw.n_groups,
            "raw": _stats_dict(self.raw, with_flag=True),
            "smoothed": _stats_dict(self.smoothed),
            "b_simple_interval": [_bound(v) for v in self.b_simple_interval],
            "by_param": {
                name: {"raw": _stats_dict(s, with_flag=True), "smoothed": _stats_dict(self.smoothed.by_param.get(name))}
                for name, s in self.raw.by_param.items()
            },
        }

    def metrics(self, per_param: bool = True) -> Dict[str, float]:
        """Flat scalars for loggers: ``noise/b_simple``, ``noise/trace_cov``,
        ``noise/grad_sq_norm`` (smoothed), ``noise/raw/…``, ``noise/b_simple_low|high``,
        ``noise/batch_size`` and, with ``per_param``, ``noise/trace_cov/<param>`` etc.
        Undefined values are left out."""
        out: Dict[str, float] = {}
        for key in ("trace_cov", "grad_sq_norm", "b_simple"):
            _put(out, f"noise/{key}", getattr(self.smoothed, key))
            _put(out, f"noise/raw/{key}", getattr(self.raw, key))
        _put(out, "noise/b_simple_low", self.b_simple_interval[0])
        _put(out, "noise/b_simple_high", self.b_simple_interval[1])
        out["noise/batch_size"] = float(self.raw.batch_size)
        if per_param:
            for name, s in self.smoothed.by_param.items():
                for key in ("trace_cov", "grad_sq_norm", "b_simple"):
                    _put(out, f"noise/{key}/{name}", getattr(s, key))
        return out


def header(source: str, every: int, beta: float, params) -> Dict[str, Any]:
    """The ``header`` line of a run file."""
    from datetime import datetime, timezone

    return {
        "type": "header",
        "format": FORMAT,
        "version": VERSION,
        "source": source,
        "every": every,
        "beta": beta,
        "params": list(params),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _num(v: float) -> Optional[float]:
    return float(v) if v is not None and math.isfinite(v) else None


def _bound(v: float):
    if v is None or math.isnan(v):
        return None
    return float(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf")


def _put(out: Dict[str, float], key: str, v: float) -> None:
    if v is not None and math.isfinite(v):
        out[key] = float(v)


def _stats_dict(s: Optional[NoiseStats], with_flag: bool = False) -> Dict[str, Any]:
    if s is None:
        return {}
    d = {"trace_cov": _num(s.trace_cov), "grad_sq_norm": _num(s.grad_sq_norm), "b_simple": _num(s.b_simple)}
    if with_flag:
        d["flag"] = s.flag
    return d
