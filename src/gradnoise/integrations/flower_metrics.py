"""The framework-free half of the Flower integration (:mod:`gradnoise.integrations.flower`):
the client's measurement, the ``gradnoise.*`` metrics format, and the server's
decomposition of one round's client metrics with its flags. No ``flwr`` import: a
NumPyClient or any other framework can use it with plain dicts."""
from __future__ import annotations

import math
import warnings
from dataclasses import replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..capture import capture
from ..errors import GradNoiseError
from ..stats.clients import (FLAG_NONPOSITIVE, FLAG_SINGLE_CLIENT, ClientMoments, ClientNoise,
                             client_moments, decompose)

__all__ = [
    "measure_client", "moments_to_metrics", "moments_from_metrics", "decompose_metrics",
    "noise_metrics", "aggregate_fit_metrics", "fedsgd_sq_norm",
]

PREFIX = "gradnoise."
KEY_N, KEY_SUM_SQ, KEY_MEAN_SQ, KEY_POPULATION = (PREFIX + k for k in ("n", "sum_sq", "mean_sq", "population"))
GRAD_PREFIX = PREFIX + "mean_grad/"
FLAG_MISSING = "missing_metrics"
FLAG_CORRUPT = "corrupt_metrics"
FLAG_NO_AGGREGATE = "no_aggregate"
OUTPUTS = ("within", "between", "dissimilarity_sq", "grad_sq_norm", "trace_cov_total")


# ------------------------------------------------------------------------ client side
def _measure(model: nn.Module, loss_fn: Callable, inputs: Any, targets: Any,
             reduction: str) -> Tuple[float, int, Dict[str, torch.Tensor]]:
    """``(S = Σ_i ||g_i||², n, {name: ḡ restricted to it})`` from one captured pass; the
    parameters' ``.grad`` are restored afterwards (zeros for parameters with no gradient)."""
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    saved = [p.grad for _, p in params]
    try:
        for _, p in params:
            p.grad = None
        with capture(model, reduction) as cap:
            out = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
            loss_fn(out, targets).backward()
        n = cap.batch_size
        if not n:
            raise GradNoiseError("the measurement pass ran no backward through the model")
        scale = 1.0 if reduction == "mean" else 1.0 / n
        grads = {name: torch.zeros_like(p) if p.grad is None else p.grad.detach() * scale
                 for name, p in params}
        S = math.fsum(cap.sq_norm_sums.values())
    finally:
        for (_, p), g in zip(params, saved):
            p.grad = g
    return S, int(n), grads


def measure_client(model: nn.Module, loss_fn: Callable, inputs: Any, targets: Any,
                   reduction: str = "mean", population: Optional[int] = None,
                   keep_mean_grad: bool = True) -> ClientMoments:
    """One client's :class:`~gradnoise.stats.ClientMoments` at the model's current weights.

    Args:
        model: the client's model, already holding the global weights.
        loss_fn: ``loss_fn(model(inputs), targets)`` -> scalar, the mean (or sum) of the
            per-sample losses of the batch.
        inputs: the measurement batch, samples on dim 0 (a tuple is unpacked into ``model``).
        targets: its targets.
        reduction: ``"mean"`` or ``"sum"``, the reduction of ``loss_fn`` (DESIGN.md §1).
        population: ``N_k`` when the batch was drawn without replacement from the
            client's ``N_k`` samples (the whole client data: ``N_k = n_k``, a census).
        keep_mean_grad: keep ``ḡ_k`` (flattened, ``[D]``) in the record.
    """
    S, n, grads = _measure(model, loss_fn, inputs, targets, reduction)
    vec = torch.cat([g.flatten() for g in grads.values()])
    return client_moments(S, vec, n, population, keep_mean_grad)


def moments_to_metrics(m: ClientMoments) -> Dict[str, float]:
    """The scalars of a record under the ``gradnoise.*`` keys (for any metrics dict)."""
    out: Dict[str, Any] = {KEY_N: int(m.n), KEY_SUM_SQ: float(m.sq_norm_sum), KEY_MEAN_SQ: float(m.mean_sq_norm)}
    if m.population is not None:
        out[KEY_POPULATION] = int(m.population)
    return out


# ------------------------------------------------------------------------ server side
def _number(metrics: Mapping, key: str, integer: bool) -> float:
    if key not in metrics:
        raise ValueError(f"no {key!r}")
    v = metrics[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{key!r} = {v!r} is not a number")
    if integer and not (math.isfinite(v) and v == int(v) and v >= 1):
        raise ValueError(f"{key!r} = {v!r} is not a positive integer")
    if math.isfinite(v) and v < 0:
        raise ValueError(f"{key!r} = {v!r} is negative")
    return v


def moments_from_metrics(metrics: Mapping[str, Any], mean_grad: Optional[torch.Tensor] = None) -> ClientMoments:
    """One client's record from its ``gradnoise.*`` metrics (and ``ḡ_k`` ``[D]``, if sent).

    Raises:
        ValueError: a key is missing, or a value is impossible (the reason says which).
    """
    n = int(_number(metrics, KEY_N, True))
    S, q = _number(metrics, KEY_SUM_SQ, False), _number(metrics, KEY_MEAN_SQ, False)
    pop = int(_number(metrics, KEY_POPULATION, True)) if KEY_POPULATION in metrics else None
    if pop is not None and pop < n:
        raise ValueError(f"population {pop} < n {n}")
    if math.isfinite(S) and math.isfinite(q) and S < n * q * (1 - 1e-4):
        raise ValueError(f"Σ||g_i||² = {S:.6g} < n||ḡ||² = {n * q:.6g}")
    vec = None
    if mean_grad is not None:
        vec = torch.as_tensor(mean_grad).detach().flatten()
        q_vec = float(vec.double().pow(2).sum())
        if math.isfinite(q) and not math.isclose(q_vec, q, rel_tol=1e-5, abs_tol=1e-30):
            raise ValueError(f"the mean gradient's ||ḡ||² = {q_vec:.6g} is not the reported {q:.6g}")
    return ClientMoments(n, float(S), float(q), vec, pop)


def _flagged(flag: str, reason: str) -> ClientNoise:
    nan = math.nan
    return ClientNoise(nan, nan, nan, nan, nan, (), (), (), (), nan, flag, reason)


def _vectors(mean_grads, names) -> Tuple[Optional[List[torch.Tensor]], Optional[str]]:
    """Flattened ``ḡ_k`` in one key order, or ``(None, why not)``."""
    if mean_grads is None or all(g is None for g in mean_grads):
        return None, "the clients sent no mean gradients"
    lacking = [nm for nm, g in zip(names, mean_grads) if g is None]
    if lacking:
        return None, f"{', '.join(lacking)} sent no mean gradient while the others did"
    keys = list(mean_grads[0])
    for nm, g in zip(names, mean_grads):
        if set(g) != set(keys):
            raise ValueError(f"{nm}: its mean-gradient arrays {sorted(g)} differ from {names[0]}'s {sorted(keys)}")
    return [torch.cat([torch.as_tensor(g[k]).flatten().double() for k in keys]) for g in mean_grads], None


def decompose_metrics(metrics: Sequence[Mapping[str, Any]], weights: Sequence[Any],
                      mean_grads: Optional[Sequence[Optional[Mapping[str, Any]]]] = None,
                      aggregate_sq_norm: Optional[float] = None,
                      names: Optional[Sequence[str]] = None) -> ClientNoise:
    """:func:`gradnoise.stats.clients.decompose` of one round's client metrics; bad input
    gives a flagged result (module docstring), never an exception.

    Args:
        metrics: each client's metrics with the ``gradnoise.*`` keys.
        weights: each client's weight metric (``num-examples``); ``w_k = x_k / Σ x``.
        mean_grads: each client's ``{param: ḡ_k restricted to it}`` or None.
        aggregate_sq_norm: ``U = ||Σ_k w_k ḡ_k||²`` from elsewhere (used when given).
        names: the clients' names in reasons (default ``client 0``, ``client 1``, …).
    """
    names = list(names) if names is not None else [f"client {k}" for k in range(len(metrics))]
    if not metrics:
        return _flagged(FLAG_MISSING, "no client reply to decompose")
    missing = [nm for nm, m in zip(names, metrics) if m is None or KEY_N not in m]
    if missing:
        return _flagged(FLAG_MISSING, f"{', '.join(missing)} sent no gradnoise metrics (noise_mod on every ClientApp?)")
    try:
        w = [_number({"weight": x}, "weight", False) for x in weights]
        if len(w) != len(metrics) or not all(math.isfinite(x) for x in w) or sum(w) <= 0:
            raise ValueError(f"client weights {list(weights)} are not finite non-negative numbers, one per client")
        w = [x / math.fsum(w) for x in w]
        vecs, why = _vectors(mean_grads, names)
        records = []
        for k, (nm, m) in enumerate(zip(names, metrics)):
            try:
                records.append(moments_from_metrics(m, None if vecs is None else vecs[k]))
            except ValueError as e:
                raise ValueError(f"{nm}: {e}") from e
    except ValueError as e:
        return _flagged(FLAG_CORRUPT, f"corrupt gradnoise metrics: {e}")
    if aggregate_sq_norm is not None:
        return decompose([replace(r, mean_grad=None) for r in records], w, float(aggregate_sq_norm))
    if vecs is not None:
        return decompose(records, w)
    res = decompose(records, w, aggregate_sq_norm=0.0)  # within and the per-client terms only
    if res.flag not in (None, FLAG_NONPOSITIVE, FLAG_SINGLE_CLIENT):
        return res
    nan = math.nan
    return replace(res, between=nan, dissimilarity_sq=nan, grad_sq_norm=nan, trace_cov_total=nan,
                   aggregate_sq_norm=nan, flag=FLAG_NO_AGGREGATE,
                   reason=f"||Σ w_k ḡ_k||² is unknown ({why}): only within is estimated")


def noise_metrics(noise: ClientNoise) -> Dict[str, float]:
    """The round's scalars under ``gradnoise.*`` keys (NaN where undefined)."""
    out: Dict[str, Any] = {PREFIX + k: float(getattr(noise, k)) for k in OUTPUTS}
    out[PREFIX + "clients"] = len(noise.sizes)
    out[PREFIX + "ok"] = int(noise.ok)
    return out


def warn_flagged(noise: ClientNoise, where: str) -> None:
    if not noise.ok and noise.flag != FLAG_SINGLE_CLIENT:
        warnings.warn(f"gradnoise ({where}): {noise.flag}: {noise.reason}", RuntimeWarning, stacklevel=3)


def aggregate_fit_metrics(results: Sequence[Tuple[int, Mapping[str, Any]]]) -> Dict[str, float]:
    """A legacy ``fit_metrics_aggregation_fn``: ``[(num_examples, metrics)] -> metrics``.

    Only scalars reach it, so it reports ``within`` and flags ``no_aggregate``.
    """
    noise = decompose_metrics([m for _, m in results], [n for n, _ in results])
    warn_flagged(noise, "aggregate_fit_metrics")
    return noise_metrics(noise)


def fedsgd_sq_norm(lr: float, keys: Optional[Sequence[str]] = None) -> Callable[[Any, Any], float]:
    """``aggregate_sq_norm`` for FedSGD: each client took one plain SGD step of rate ``lr``
    on its measurement batch, so the aggregated update is ``−lr Σ_k w_k ḡ_k`` and
    ``U = ||aggregated − previous||² / lr²`` (in float64, over ``keys``, default every
    array: buffers that change, such as BatchNorm statistics, must be left out)."""
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")

    def sq_norm(previous, aggregated) -> float:
        names = list(previous.keys()) if keys is None else list(keys)
        return math.fsum(float(((torch.as_tensor(aggregated[k].numpy()).double()
                                 - torch.as_tensor(previous[k].numpy()).double()) ** 2).sum())
                         for k in names) / lr**2

    return sq_norm
