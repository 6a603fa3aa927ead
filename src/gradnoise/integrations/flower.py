"""Flower (``flwr``): the within/between-client gradient noise of every federated round
(DESIGN.md §1, "Clients"; the maths is :mod:`gradnoise.stats.clients`).

Usage (Flower's Message API, ``pip install gradnoise[flower]``)::

    from gradnoise.integrations.flower import NoiseStrategy, noise_mod

    # ClientApp: measure at the received global weights, before local training
    app = ClientApp(mods=[noise_mod(model, loss_fn, batch=lambda ctx: (x, y))])

    # ServerApp
    strategy = NoiseStrategy(FedAvg(fraction_evaluate=0.0))
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()))
    strategy.history[-1].noise.dissimilarity_sq        # FedProx's B² of the last round
    result.train_metrics_clientapp[3]["gradnoise.between"]

Client side. :func:`noise_mod` acts on ``train`` messages only. It loads the message's
ArrayRecord (the global weights) into ``model``, runs one forward/backward pass of
``loss_fn(model(inputs), targets)`` on the client's measurement batch inside
:func:`gradnoise.capture` (the parameters' ``.grad`` are put back afterwards), then
calls the rest of the ClientApp and adds to the reply::

    MetricRecord  gradnoise.n           n_k, samples measured            (int)
                  gradnoise.sum_sq      S_k = Σ_i ||g_i||²              (float)
                  gradnoise.mean_sq     q_k = ||ḡ_k||²                  (float)
                  gradnoise.population  N_k, only when given            (int)
    ArrayRecord   gradnoise.mean_grad/<param>   ḡ_k, only with send_mean_grad=True

The keys go into the reply's only MetricRecord and ArrayRecord, because Flower's
strategies accept exactly one of each per reply. NumPyClient users call
:func:`measure_client` and merge :func:`moments_to_metrics` into ``fit``'s metrics
(these and the server's maths live in :mod:`~gradnoise.integrations.flower_metrics`, which
imports no ``flwr``).

Server side. Client ``k``'s weight is ``w_k ∝`` its ``weighted_by_key`` metric
(``"num-examples"``), the weights FedAvg averages with, so ``∇f = Σ_k w_k ∇F_k`` is the
gradient of the federated objective. :class:`NoiseStrategy` wraps any message-API
strategy: it takes the ``gradnoise.*`` entries out of each reply before the strategy sees
them (they never reach the global model or its averaged metrics), computes
``U = ||Σ_k w_k ḡ_k||²`` from the clients' mean gradients in float64, or, when the
clients send none, from the aggregated update through ``aggregate_sq_norm`` (see
:func:`fedsgd_sq_norm`), and adds ``gradnoise.within``, ``.between``,
``.dissimilarity_sq``, ``.grad_sq_norm``, ``.trace_cov_total``, ``.clients`` and ``.ok``
(1 or 0) to the round's MetricRecord; ``history`` keeps one :class:`RoundNoise` per round.
:func:`aggregate_train_metrics` does the same as a ``train_metrics_aggr_fn`` and
:func:`aggregate_fit_metrics` as the legacy ``fit_metrics_aggregation_fn``; neither sees
an aggregated update, so without mean gradients they report ``within`` only.

Never a silent wrong number: a client without the metrics, or with corrupt ones (n not
a positive integer, ``S < n q``, negative moments, mismatched gradient keys, bad
weight) flags the whole round (``missing_metrics``, ``corrupt_metrics``; NaN values,
``gradnoise.ok = 0``, a RuntimeWarning with the reason) instead of deciding over the rest;
no way to get ``U`` flags ``no_aggregate`` (``within`` and the per-client terms kept).
Clients whose reply is an error are left out, as the strategy leaves them out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import GradNoiseError
from ..stats.clients import ClientMoments, ClientNoise, client_moments
from .flower_metrics import (FLAG_CORRUPT, FLAG_MISSING, FLAG_NO_AGGREGATE, GRAD_PREFIX, KEY_N, PREFIX,
                             _measure, aggregate_fit_metrics, decompose_metrics, fedsgd_sq_norm,
                             measure_client, moments_from_metrics, moments_to_metrics, noise_metrics)
from .flower_metrics import warn_flagged as _warn
from .lazy import LazyClass

__all__ = [
    "NoiseStrategy", "RoundNoise", "noise_mod", "measure_client", "moments_to_metrics",
    "moments_from_metrics", "decompose_metrics", "noise_metrics", "aggregate_train_metrics",
    "aggregate_fit_metrics", "fedsgd_sq_norm", "FLAG_MISSING", "FLAG_CORRUPT", "FLAG_NO_AGGREGATE",
]

INSTALL_HINT = "pip install gradnoise[flower]"


def load_flwr():
    """The ``flwr`` package (the Message API: ``flwr.common``, ``flwr.serverapp``).

    Raises:
        ImportError: Flower is not installed, or too old for the Message API.
    """
    try:
        import flwr
        import flwr.serverapp.strategy  # noqa: F401
    except ImportError as e:
        raise ImportError("gradnoise.integrations.flower needs Flower ≥ 1.21: " + INSTALL_HINT) from e
    return flwr


# ------------------------------------------------------------------------ client side
def _single(records: Mapping, what: str, where: str, key: Optional[str] = None):
    if key is not None:
        if key not in records:
            raise GradNoiseError(f"{where} has no {what} named {key!r} (it has {sorted(records)})")
        return records[key]
    if len(records) != 1:
        raise GradNoiseError(f"{where} has {len(records)} {what}s {sorted(records)}: name the one to use")
    return next(iter(records.values()))


def _is_train(msg) -> bool:
    kind = msg.metadata.message_type
    return kind == "train" or kind.startswith("train.")


def _load_arrays(model: nn.Module, arrays) -> None:
    for key in [k for k in arrays.keys() if k.startswith(PREFIX)]:
        del arrays[key]  # a global model averaged without NoiseStrategy carries them
    state = {k: torch.from_numpy(v.numpy().copy()) for k, v in arrays.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise GradNoiseError(f"noise_mod: the received ArrayRecord does not fit the model it was given: {e}") from e


def noise_mod(model: nn.Module, loss_fn: Callable, batch: Callable[[Any], Tuple[Any, Any]], *,
              reduction: str = "mean", population: Any = None, send_mean_grad: bool = True,
              arrays_key: Optional[str] = None, metrics_key: Optional[str] = None) -> Callable:
    """A Flower mod ``mod(msg, context, call_next)`` measuring at the received global weights.

    Args:
        model: an ``nn.Module`` whose ``state_dict`` keys are the ArrayRecord's keys; its
            weights are overwritten by the received ones (the train function loads them
            anyway), its ``.grad`` left as they were.
        loss_fn: ``loss_fn(model(inputs), targets)`` -> scalar.
        batch: ``batch(context) -> (inputs, targets)``, the client's measurement batch.
        reduction: the reduction of ``loss_fn``, ``"mean"`` or ``"sum"``.
        population: ``N_k``, or ``population(context) -> N_k``, when the batch is drawn
            without replacement from the client's ``N_k`` samples; None for i.i.d.
        send_mean_grad: also send ``ḡ_k`` (one model's size more upload) so the server
            computes ``U`` exactly; False sends the three scalars only.
        arrays_key, metrics_key: the records to read and write, when a message has
            several (default: the only one).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")

    def gradnoise_mod(msg, context, call_next):
        if not _is_train(msg) or not msg.has_content():
            return call_next(msg, context)
        _load_arrays(model, _single(msg.content.array_records, "ArrayRecord", "the train message", arrays_key))
        inputs, targets = batch(context)
        pop = population(context) if callable(population) else population
        S, n, grads = _measure(model, loss_fn, inputs, targets, reduction)
        m = client_moments(S, torch.cat([g.flatten() for g in grads.values()]), n, pop, False)
        reply = call_next(msg, context)
        if reply.has_error() or not reply.has_content():
            return reply
        _attach(reply.content, m, grads if send_mean_grad else None, arrays_key, metrics_key)
        return reply

    return gradnoise_mod


def _attach(content, m: ClientMoments, grads, arrays_key, metrics_key) -> None:
    from flwr.common import Array, MetricRecord

    if not content.metric_records and metrics_key is None:
        content["metrics"] = MetricRecord()
    metrics = _single(content.metric_records, "MetricRecord", "the train reply", metrics_key)
    for k, v in moments_to_metrics(m).items():
        metrics[k] = v
    if grads:
        arrays = _single(content.array_records, "ArrayRecord", "the train reply", arrays_key)
        for name, g in grads.items():
            arrays[GRAD_PREFIX + name] = Array(g.detach().cpu().numpy())


# ------------------------------------------------------------------------ server side
def _take(content, pop: bool) -> Tuple[Optional[dict], Optional[dict]]:
    """The reply's ``gradnoise.*`` metrics and mean-gradient arrays (removed when ``pop``)."""
    metrics = grads = None
    for rec in content.metric_records.values():
        if KEY_N in rec or any(k.startswith(PREFIX) for k in rec.keys()):
            metrics = {k: rec[k] for k in list(rec.keys()) if k.startswith(PREFIX)}
            for k in metrics if pop else ():
                del rec[k]
    for rec in content.array_records.values():
        keys = [k for k in rec.keys() if k.startswith(GRAD_PREFIX)]
        if keys:
            grads = {k[len(GRAD_PREFIX):]: rec[k].numpy() for k in keys}
            for k in keys if pop else ():
                del rec[k]
    return metrics, grads


def _weight(content, key: str) -> Any:
    for rec in content.metric_records.values():
        if key in rec:
            return rec[key]
    return math.nan


def aggregate_train_metrics(records: Sequence[Any], weighted_by_key: str) -> Any:
    """A message-API ``train_metrics_aggr_fn(records, weighted_by_key) -> MetricRecord``:
    Flower's weighted average of the other metrics plus the round's ``gradnoise.*``."""
    load_flwr()
    from flwr.common import MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

    taken = [_take(rd, pop=False) for rd in records]
    noise = decompose_metrics([m for m, _ in taken], [_weight(rd, weighted_by_key) for rd in records],
                              [g for _, g in taken])
    _warn(noise, "aggregate_train_metrics")
    rest = [RecordDict({k: MetricRecord({n: v for n, v in rec.items() if not n.startswith(PREFIX)})
                        for k, rec in rd.metric_records.items()}) for rd in records]
    out = aggregate_metricrecords(rest, weighted_by_key)
    for k, v in noise_metrics(noise).items():
        out[k] = v
    return out


@dataclass(frozen=True)
class RoundNoise:
    """One round of :class:`NoiseStrategy`: its number, the decomposition and the node ids
    of the clients in it (those whose reply was not an error)."""

    server_round: int
    noise: ClientNoise
    node_ids: Tuple[int, ...]


class NoiseStrategyHooks:
    """The behaviour of :class:`NoiseStrategy`; Flower's ``Strategy`` base is added on
    first use.

    Args:
        strategy: the message-API strategy doing the work (``FedAvg``, ``FedProx``,
            ``FedAdam``, …); it never sees the ``gradnoise.*`` entries.
        weighted_by_key: the metric giving ``w_k ∝`` its value; default the strategy's
            own ``weighted_by_key`` (``"num-examples"``).
        aggregate_sq_norm: ``f(previous, aggregated) -> U`` from the round's global and
            aggregated ArrayRecords, used when the clients send no mean gradients (e.g.
            :func:`fedsgd_sq_norm`).

    Attributes:
        history: one :class:`RoundNoise` per training round.
    """

    def __init__(self, strategy, weighted_by_key: Optional[str] = None,
                 aggregate_sq_norm: Optional[Callable[[Any, Any], float]] = None):
        self.strategy = strategy
        self.weighted_by_key = weighted_by_key or getattr(strategy, "weighted_by_key", "num-examples")
        self.aggregate_sq_norm = aggregate_sq_norm
        self.history: List[RoundNoise] = []
        self._sent = None  # the global arrays of the latest configure_train

    @property
    def last(self) -> Optional[RoundNoise]:
        return self.history[-1] if self.history else None

    def configure_train(self, server_round, arrays, config, grid):
        self._sent = arrays
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        valid = [m for m in replies if not m.has_error() and m.has_content()]
        taken = [_take(m.content, pop=True) for m in valid]
        weights = [_weight(m.content, self.weighted_by_key) for m in valid]
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        grads = [g for _, g in taken]
        U = None
        if self.aggregate_sq_norm is not None and all(g is None for g in grads) and arrays is not None:
            U = float(self.aggregate_sq_norm(self._sent, arrays))
        ids = tuple(int(m.metadata.src_node_id) for m in valid)
        noise = decompose_metrics([m for m, _ in taken], weights, grads, U, [f"node {i}" for i in ids])
        _warn(noise, f"round {server_round}")
        self.history.append(RoundNoise(int(server_round), noise, ids))
        if metrics is None:
            from flwr.common import MetricRecord

            metrics = MetricRecord()
        for k, v in noise_metrics(noise).items():
            metrics[k] = v
        return arrays, metrics

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()


def _strategy_base() -> type:
    load_flwr()
    from flwr.serverapp.strategy import Strategy

    return Strategy


_LAZY = LazyClass(__name__, "NoiseStrategy", NoiseStrategyHooks, _strategy_base,
                  "A Flower ``Strategy`` wrapping another one and decomposing each round's "
                  "gradient noise into within- and between-client parts.")
__getattr__ = _LAZY.module_getattr
