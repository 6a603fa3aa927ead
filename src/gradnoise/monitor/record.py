"""What the monitor produces for each optimizer step, and its ``step`` line in a run
file (format ``gradnoise-run``, :mod:`gradnoise.formats`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple

from ..formats import json_safe, num
from ..stats import NoiseStats

NAN2 = (math.nan, math.nan)


class LayerNoise(NamedTuple):
    """One layer's smoothed statistics (its parameters together) and the 95 % interval of
    its ``b_simple``."""

    smoothed: NoiseStats
    b_simple_interval: Tuple[float, float]


@dataclass(frozen=True)
class StepRecord:
    """The noise of one optimizer step.

    Attributes:
        step: the optimizer step's index (counting every step, measured or not).
        source: ``"per_sample"``, ``"microbatch"`` or ``"ddp"``.
        raw: this step alone (:class:`~gradnoise.stats.NoiseStats`, with ``by_param``).
        smoothed: from debiased EMAs of ``tr(Σ)`` and ``|G|²`` taken separately, and
            their ratio; ``by_param`` likewise.
        b_simple_interval: 95 % interval of the smoothed ``B_simple`` (Fieller, clipped
            to ``[0, inf)``): ``(low, inf)`` is a lower bound, ``(0, inf)`` "not
            determined" while the signal is not clearly above the noise.
        skipped: True when this step was not folded into the averages (its raw
            statistics are flagged, e.g. inf/NaN gradients of a mixed-precision step).
        flag: why it was skipped, or the raw statistics' flag.
        loss_scale: the GradScaler scale that was removed, if any.
        trace_cov_interval, grad_sq_norm_interval: 95 % intervals of the smoothed
            ``tr(Σ)`` and ``|G|²`` (clipped at 0; NaN below two steps).
        by_layer: layer path -> :class:`LayerNoise` (:mod:`gradnoise.monitor.names`).
        loss: the step's training loss, where the loop gave it (``monitor.step(loss=)``)
            or an integration read it.
        lr: the optimizer's first group's learning rate at this step (with ``optimizer=``).
        passes: forward passes of the watched model in this step on this process
            (gradient accumulation: micro-batches).
        tokens_per_sample: positions per sample where the model's first input is a
            ``[B, T, …]`` tensor of token ids (integers); None otherwise.
        preconditioned: for an Adam-type optimizer with state, the smoothed statistics of
            its update direction (:mod:`gradnoise.monitor.precond`) and the 95 % interval
            of their ``b_simple``; None otherwise.
    """

    step: int
    source: str
    raw: NoiseStats
    smoothed: NoiseStats
    b_simple_interval: Tuple[float, float]
    skipped: bool = False
    flag: Optional[str] = None
    loss_scale: Optional[float] = None
    trace_cov_interval: Tuple[float, float] = NAN2
    grad_sq_norm_interval: Tuple[float, float] = NAN2
    by_layer: Mapping[str, LayerNoise] = field(default_factory=dict, repr=False, compare=False)
    loss: Optional[float] = None
    lr: Optional[float] = None
    passes: Optional[int] = None
    tokens_per_sample: Optional[float] = None
    preconditioned: Optional[LayerNoise] = None

    def to_dict(self) -> Dict[str, Any]:
        """The ``step`` line of the run file (:mod:`gradnoise.formats`)."""
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
            "smoothed": {**_stats_dict(self.smoothed), "trace_cov_interval": json_safe(list(self.trace_cov_interval)),
                         "grad_sq_norm_interval": json_safe(list(self.grad_sq_norm_interval))},
            "b_simple_interval": json_safe(list(self.b_simple_interval)),
            "by_param": {
                name: {"raw": _stats_dict(s, with_flag=True), "smoothed": _stats_dict(self.smoothed.by_param.get(name))}
                for name, s in self.raw.by_param.items()
            },
            "by_layer": {name: _noise_dict(layer) for name, layer in self.by_layer.items()},
            "loss": num(self.loss),
            "lr": self.lr,
            "passes": self.passes,
            "tokens_per_sample": self.tokens_per_sample,
            "preconditioned": _noise_dict(self.preconditioned) if self.preconditioned is not None else None,
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
        if self.preconditioned is not None:
            _put(out, "noise/preconditioned/b_simple", self.preconditioned.smoothed.b_simple)
        if per_param:
            for name, s in self.smoothed.by_param.items():
                for key in ("trace_cov", "grad_sq_norm", "b_simple"):
                    _put(out, f"noise/{key}/{name}", getattr(s, key))
        return out


def _put(out: Dict[str, float], key: str, v: float) -> None:
    if v is not None and math.isfinite(v):
        out[key] = float(v)


def _noise_dict(layer: LayerNoise) -> Dict[str, Any]:
    return {"smoothed": _stats_dict(layer.smoothed), "b_simple_interval": json_safe(list(layer.b_simple_interval))}


def _stats_dict(s: Optional[NoiseStats], with_flag: bool = False) -> Dict[str, Any]:
    if s is None:
        return {}
    d = {"trace_cov": num(s.trace_cov), "grad_sq_norm": num(s.grad_sq_norm), "b_simple": num(s.b_simple)}
    if with_flag:
        d["flag"] = s.flag
    return d
