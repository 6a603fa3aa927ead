"""Study ``federated``: when client heterogeneity, not sampling, makes the gradient noise.

Data. A stratified ``test_fraction`` of the task's samples is held out (the same for every
run of one ``seed``); the rest is split over ``K = clients`` clients, for each ``α`` of
``alphas``:

* ``α = ∞`` — IID: a random permutation cut into ``K`` parts of equal size (± 1);
* finite ``α`` — Dirichlet label skew (Hsu et al. 2019): for every class ``c`` the
  client shares ``p_c ~ Dir(α·1_K)``, and the class's samples (shuffled) are cut at
  ``cumsum(p_c)``. A split with a client under ``min_client_size`` samples is drawn
  again (rejection sampling, seeded numpy), so small ``α`` gives few classes per client.

Client ``k`` holds ``N_k`` samples and weighs ``w_k = N_k/ΣN``. Each round, at the global
weights ``θ``:

* measurement — every client draws ``n_k = min(measure_batch, N_k)`` of its samples
  without replacement and reports only :func:`gradnoise.stats.clients.client_moments`
  (``n_k``, ``Σ_i ||g_i||²`` from :mod:`gradnoise.capture`'s exact per-sample norms,
  ``ḡ_k``, population ``N_k``); the server's :func:`~gradnoise.stats.clients.decompose`
  gives unbiased ``within = Σ w_k tr Σ_k``, ``between = Σ w_k ||∇F_k − ∇f||²``, their
  sum ``tr Σ`` (the pooled per-sample covariance), ``||∇f||²`` and FedProx's
  ``B² = Σ w_k ||∇F_k||²/||∇f||²``;
* FedAvg (McMahan et al. 2017) — ``m = max(1, round(client_fraction·K))`` clients drawn
  without replacement each take ``local_steps`` SGD steps (rate ``local_lr``, batches of
  ``min(local_batch, N_k)`` drawn without replacement) from ``θ``; with their updates
  ``Δ_k = θ_k − θ`` and ``w̃_k = N_k / Σ_{j∈S} N_j`` the server steps
  ``θ ← θ + Δ̄``, ``Δ̄ = Σ w̃_k Δ_k``. Client drift is the spread of the updates,
  ``drift = Σ w̃_k ||Δ_k − Δ̄||²``, beside ``||Δ̄||²``;
* test loss and accuracy of the new global weights on the held-out data.

Per run (α, seed) ratios are ratios of sums over rounds (DESIGN.md §1), never means of
noisy ratios: ``between_share = Σ between / Σ tr Σ``, ``between_to_within``,
``dissimilarity_sq = Σ (between + ||∇f||²) / Σ ||∇f||²``, ``drift_ratio = Σ drift /
Σ ||Δ̄||²``. ``loss_vs_iid`` and ``drift_vs_iid`` divide by the IID run of the same seed
(the same test split, model initialisation and client-sampling stream). Over ``seeds``
runs each is a mean with a 95 % t-interval (:func:`gradnoise.stats.intervals.mean_interval`).
``heterogeneity_dominates`` is True when the interval of ``between_share`` lies above
1/2 (between > within, per sample), False when below, None when it straddles 1/2 or is
undefined.

Per sample is not what one FedAvg round sees. The first local step's gradients of ``m``
of the ``K`` clients, drawn without replacement, each from a batch of ``b =
local_batch``, average to an estimate of ``∇f`` with noise (equal client weights; a
skewed split's unequal weights and the finite-client correction of the batches make it an
approximation)::

    between · (K − m)/((K − 1) m)  +  within / (m b)

so ``round_between_share = Σ c·between / Σ (c·between + within/b)``, ``c = (K − m)/(K − 1)``,
is heterogeneity's share of the round's gradient noise: a larger client batch shrinks
only the second term, more clients per round the first (to 0 when all take part: then
heterogeneity acts through the drift alone). ``round_dominates`` judges it as above.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from ..capture import capture
from ..numbers import fmt_num, fmt_with_interval
from ..stats.clients import ClientMoments, ClientNoise, client_moments, decompose
from ..stats.intervals import mean_interval
from .online import split
from .output import StudyWriter, num
from .progress import bar
from .task import Task
from .training import flat_grad

SPLIT_TRIES = 200


@dataclass
class FederatedConfig:
    clients: int = 10
    alphas: List[float] = field(default_factory=lambda: [math.inf, 1.0, 0.3, 0.1])  # ∞: IID
    rounds: int = 40
    local_steps: int = 5
    local_batch: int = 16
    local_lr: float = 0.2         # the clients' SGD rate (not --lr: that is the digits SGD of law and trajectory)
    client_fraction: float = 0.5     # clients drawn per FedAvg round
    measure_batch: int = 64          # samples per client for the noise decomposition
    min_client_size: int = 8
    test_fraction: float = 0.3
    seeds: int = 3

    @classmethod
    def for_size(cls, size: str) -> "FederatedConfig":
        if size == "tiny":
            return cls(clients=5, alphas=[math.inf, 0.1], rounds=4, local_steps=3, measure_batch=32, seeds=2)
        return cls()


# ------------------------------------------------------------------------------ data
def _check_config(cfg: FederatedConfig) -> None:
    """ValueError on options the study cannot use, whatever the task."""
    for name in ("clients", "rounds", "local_steps", "local_batch", "measure_batch", "min_client_size", "seeds"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    alphas = list(cfg.alphas)
    if not alphas or len(set(alphas)) != len(alphas) or \
            any(isinstance(a, bool) or not isinstance(a, (int, float)) or not a > 0 for a in alphas):
        raise ValueError(f"alphas must be a non-empty list of distinct numbers > 0 (inf: IID), got {cfg.alphas}")
    if cfg.clients < 2 or cfg.measure_batch < 2 or cfg.min_client_size < 2:
        raise ValueError(f"clients, measure_batch and min_client_size must be ≥ 2 (a between-client part and "
                         f"tr Σ_k need two of each), got {cfg.clients}, {cfg.measure_batch}, {cfg.min_client_size}")
    lr = cfg.local_lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"local_lr must be a finite number > 0, got {cfg.local_lr!r}")
    if not 0.0 < cfg.client_fraction <= 1.0 or not 0.0 < cfg.test_fraction < 1.0:
        raise ValueError(f"client_fraction must be in (0, 1] and test_fraction in (0, 1), got "
                         f"{cfg.client_fraction}, {cfg.test_fraction}")


def _class_counts(task: Task) -> Optional[Dict[int, int]]:
    """Samples per class label (sorted), or None when ``y`` is not integer labels ``[N]``."""
    y = task.y
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
        return None
    labels, counts = torch.unique(y, return_counts=True)
    return {int(c): int(n) for c, n in zip(labels, counts)}


def _train_counts(counts: Dict[int, int], cfg: FederatedConfig) -> List[int]:
    """Each class's training samples: what :func:`gradnoise.studies.online.split` leaves."""
    return [n - min(max(1, round(cfg.test_fraction * n)), n - 1) for n in counts.values()]


def _misfit(task: Task, cfg: FederatedConfig) -> Optional[str]:
    """Why the task's labels or sizes cannot carry the study's clients (None: they can)."""
    counts = _class_counts(task)
    if counts is None:
        return (f"the federated study needs integer class labels y of shape [N]; task {task.name!r} has "
                f"y of dtype {task.y.dtype} and shape {list(task.y.shape)}")
    small = [c for c, n in counts.items() if n < 2]
    if small:
        return f"class(es) {small} have fewer than 2 samples: none is left for the clients or the test"
    train = sum(_train_counts(counts, cfg))
    if train < cfg.clients * cfg.min_client_size:
        return f"{train} training samples cannot give {cfg.clients} clients {cfg.min_client_size} each"
    return None


def fits(task: Task, cfg: FederatedConfig, seed: int = 0) -> Optional[str]:
    """Why the study cannot run on ``task`` (None: it can), from the task's class sizes
    alone and before anything runs: labels that are not classes, too few samples for the
    clients, or a Dirichlet α at which no split of :data:`SPLIT_TRIES` gives every client
    ``min_client_size`` samples. The splits are those :func:`run` would draw (a split's
    client sizes depend only on the class sizes and the seed), so the study fails on
    none when this returns None."""
    why = _misfit(task, cfg)
    if why is not None:
        return why
    train = _train_counts(_class_counts(task), cfg)
    labels = np.repeat(np.arange(len(train)), train)
    for r in range(cfg.seeds):
        for alpha in cfg.alphas:
            rng = np.random.default_rng([seed + r, _alpha_key(alpha)])
            if _draw(labels, cfg.clients, alpha, rng, cfg.min_client_size) is None:
                return (f"no Dirichlet(α={alpha:g}) split of its {len(labels)} training samples ({len(train)} classes) "
                        f"gives each of {cfg.clients} clients {cfg.min_client_size} samples in {SPLIT_TRIES} draws")
    return None


def _check(task: Task, cfg: FederatedConfig) -> List[int]:
    """The sorted class labels; ValueError on a task or config the study cannot use."""
    _check_config(cfg)
    why = _misfit(task, cfg)
    if why is not None:
        raise ValueError(why)
    return sorted(_class_counts(task))


def _draw(labels: np.ndarray, clients: int, alpha: float, rng: np.random.Generator,
          min_size: int) -> Optional[List[np.ndarray]]:
    """:func:`dirichlet_split`, or None where no draw met ``min_size``."""
    if math.isinf(alpha):
        return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), clients)]
    classes = np.unique(labels)
    for _ in range(SPLIT_TRIES):
        parts: List[List[np.ndarray]] = [[] for _ in range(clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha)))[:-1] * len(idx)).astype(int)
            for k, piece in enumerate(np.split(idx, cuts)):
                parts[k].append(piece)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    return None


def dirichlet_split(labels: np.ndarray, clients: int, alpha: float, rng: np.random.Generator,
                    min_size: int) -> List[np.ndarray]:
    """``clients`` arrays of positions into ``labels`` ``[N]`` (module docstring): IID for
    ``alpha = inf``, else Dirichlet(α) label skew, redrawn until every client has
    ``min_size`` samples.

    Raises:
        ValueError: no draw in :data:`SPLIT_TRIES` met ``min_size``.
    """
    parts = _draw(labels, clients, alpha, rng, min_size)
    if parts is None:
        raise ValueError(f"no Dirichlet(α={alpha:g}) split of {len(labels)} samples over {clients} clients gave "
                         f"every client {min_size} samples in {SPLIT_TRIES} draws: raise α, use fewer clients or a "
                         "smaller min_client_size")
    return parts


def _alpha_key(alpha: float) -> int:
    return 0 if math.isinf(alpha) else int(round(alpha * 1e6)) + 1


def partition(task: Task, cfg: FederatedConfig, alpha: float, seed: int, run_seed: int
              ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """``(test, clients)``: the held-out sample indices of study seed ``seed`` and each
    client's task indices for run seed ``run_seed`` at ``alpha`` (what :func:`run` uses)."""
    classes = _check(task, cfg)
    train, test = split(task.y, classes, cfg.test_fraction, torch.Generator().manual_seed(seed))
    rng = np.random.default_rng([run_seed, _alpha_key(alpha)])
    parts = dirichlet_split(task.y[train].numpy(), cfg.clients, alpha, rng, cfg.min_client_size)
    return test, [train[torch.from_numpy(p)] for p in parts]


# -------------------------------------------------------------------------- a round
def client_record(model, task: Task, idx: torch.Tensor, population: int) -> ClientMoments:
    """One client's :class:`~gradnoise.stats.ClientMoments` at ``model``'s weights from
    its samples ``idx`` ``[n]``: ``Σ_i ||g_i||²`` from a capture of the mean loss (per-sample
    norms are unscaled), ``ḡ`` the gradient of that mean. Leaves ``.grad`` set."""
    model.zero_grad(set_to_none=True)
    with capture(model, reduction="mean") as cap:
        task.loss_fn(model(task.x[idx]), task.y[idx]).backward()
    S = math.fsum(cap.sq_norm_sums.values())
    return client_moments(S, flat_grad(model), len(idx), population)


def measure(model, task: Task, clients: Sequence[torch.Tensor], n: int, gen: torch.Generator) -> ClientNoise:
    """The within/between decomposition at ``model``'s weights, every client reporting
    moments of ``min(n, N_k)`` of its samples (without replacement; weights ``N_k/ΣN``)."""
    records = []
    for idx in clients:
        pick = idx[torch.randperm(len(idx), generator=gen)[:min(n, len(idx))]]
        records.append(client_record(model, task, pick, len(idx)))
    model.zero_grad(set_to_none=True)
    return decompose(records)


def fedavg_round(model, local, task: Task, clients: Sequence[torch.Tensor], chosen: Sequence[int],
                 cfg: FederatedConfig, gen: torch.Generator) -> Tuple[float, float]:
    """One FedAvg round on the clients ``chosen`` (module docstring); updates ``model``
    in place; ``local`` is a scratch copy. Returns ``(drift, ||Δ̄||²)``."""
    theta = parameters_to_vector(model.parameters()).detach()
    params = [p for p in local.parameters() if p.requires_grad]
    deltas, sizes = [], []
    for k in chosen:
        idx = clients[k]
        with torch.no_grad():
            vector_to_parameters(theta.clone(), local.parameters())  # it adopts the vector's storage
        b = min(cfg.local_batch, len(idx))
        for _ in range(cfg.local_steps):
            batch = idx[torch.randperm(len(idx), generator=gen)[:b]]
            grads = torch.autograd.grad(task.loss_fn(local(task.x[batch]), task.y[batch]), params)
            with torch.no_grad():
                torch._foreach_add_(params, grads, alpha=-cfg.local_lr)   # plain SGD, θ ← θ − lr·g
        deltas.append(parameters_to_vector(local.parameters()).detach().double() - theta.double())
        sizes.append(len(idx))
    w = torch.tensor(sizes, dtype=torch.float64) / sum(sizes)
    D = torch.stack(deltas)                       # [m, P]
    mean = w @ D                                  # Δ̄ = Σ w̃_k Δ_k
    drift = float(w @ (D - mean).pow(2).sum(1))   # Σ w̃_k ||Δ_k − Δ̄||²
    with torch.no_grad():
        vector_to_parameters((theta.double() + mean).to(theta.dtype), model.parameters())
    return drift, float(mean.pow(2).sum())


@torch.no_grad()
def evaluate(model, task: Task, test: torch.Tensor) -> Tuple[float, float]:
    """``(loss, accuracy)`` on the samples ``test``, the model in eval mode (then put back)."""
    was = model.training
    model.eval()
    try:
        out = model(task.x[test])
        return float(task.loss_fn(out, task.y[test])), float((out.argmax(1) == task.y[test]).double().mean())
    finally:
        model.train(was)


# ----------------------------------------------------------------------------- a run
def _ratio(a: Sequence[Optional[float]], b: Sequence[Optional[float]]) -> Optional[float]:
    """``Σ a / Σ b`` over the rounds where both are defined (None when ``Σ b ≤ 0``)."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    d = math.fsum(y for _, y in pairs)
    return math.fsum(x for x, _ in pairs) / d if pairs and d > 0 else None


def _run_one(task: Task, cfg: FederatedConfig, alpha: float, test, clients, run_seed: int, w: StudyWriter,
             progress) -> Dict[str, Any]:
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(10_000 + run_seed)   # batches and measurement draws
    pick = torch.Generator().manual_seed(20_000 + run_seed)  # the clients drawn: the same for every α of a seed
    model, local = task.fresh_model(), task.fresh_model()
    m, b = per_round(cfg), cfg.local_batch
    c = (cfg.clients - m) / (cfg.clients - 1)
    rows = []
    for r in range(cfg.rounds):
        noise = measure(model, task, clients, cfg.measure_batch, gen)
        chosen = sorted(torch.randperm(cfg.clients, generator=pick)[:m].tolist())
        drift, upd = fedavg_round(model, local, task, clients, chosen, cfg, gen)
        loss, acc = evaluate(model, task, test)
        total = noise.trace_cov_total
        row = {"alpha": alpha, "seed": run_seed, "round": r, "within": num(noise.within),
               "between": num(noise.between), "trace_cov": num(total), "grad_sq_norm": num(noise.grad_sq_norm),
               "dissimilarity_sq": num(noise.dissimilarity_sq),
               "between_share": num(noise.between / total) if total > 0 else None,
               "round_between": num(c * noise.between), "round_noise": num(c * noise.between + noise.within / b),
               "flag": noise.flag,
               "clients": chosen, "drift": num(drift), "update_sq_norm": num(upd),
               "test_loss": num(loss), "test_accuracy": num(acc)}
        w.write("round", **row)
        rows.append(row)
        progress.update(1)
    col = {k: [r[k] for r in rows] for k in rows[0]}
    g2_plus_between = [None if x is None or y is None else x + y for x, y in zip(col["between"], col["grad_sq_norm"])]
    run = {"alpha": alpha, "seed": run_seed, "seconds": time.perf_counter() - t0,
           "between_share": _ratio(col["between"], col["trace_cov"]),
           "between_to_within": _ratio(col["between"], col["within"]),
           "round_between_share": _ratio(col["round_between"], col["round_noise"]),
           "dissimilarity_sq": _ratio(g2_plus_between, col["grad_sq_norm"]),
           "within": _mean(col["within"]), "between": _mean(col["between"]),
           "trace_cov": _mean(col["trace_cov"]), "drift": _mean(col["drift"]),
           "drift_ratio": _ratio(col["drift"], col["update_sq_norm"]),
           "final_loss": rows[-1]["test_loss"], "final_accuracy": rows[-1]["test_accuracy"],
           "flagged_rounds": sum(r["flag"] is not None for r in rows)}
    return run


def per_round(cfg: FederatedConfig) -> int:
    """``m = max(1, round(client_fraction·K))``, the clients drawn per round."""
    return max(1, round(cfg.client_fraction * cfg.clients))


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


# ----------------------------------------------------------------------------- study
def run(task: Task, out, seed: int = 0, size: str = "default", quiet: bool = False,
        config: FederatedConfig = None) -> dict:
    """Run the study; writes ``federated-<task>.jsonl``; returns the summary.

    Lines: ``split`` (per α and run seed: client sizes, the classes and per-client class
    counts ``[K][C]``),
    ``round`` (per α, seed and round: ``within``, ``between``, ``trace_cov``,
    ``grad_sq_norm``, ``dissimilarity_sq``, ``between_share``, ``flag`` of the
    decomposition at the round's starting weights; ``clients`` drawn, ``drift``,
    ``update_sq_norm``; ``test_loss``, ``test_accuracy`` after the round), ``run`` (per α
    and seed, the ratios of sums of the module docstring, means over rounds, final test
    loss and accuracy, ``loss_vs_iid``, ``drift_vs_iid``) and ``summary``.

    Summary keys:
        ``clients``, ``rounds``, ``local_steps``, ``local_batch``, ``lr``,
        ``clients_per_round``, ``measure_batch``, ``test_size``, ``seeds``, ``alphas``: a
        list (in the config's order) of {``alpha``, ``between_share``,
        ``between_to_within``, ``dissimilarity_sq``, ``within``, ``between``,
        ``trace_cov``, ``drift``, ``drift_ratio``, ``drift_vs_iid``, ``final_loss``,
        ``loss_vs_iid``, ``final_accuracy``, ``round_between_share``, ``seconds``: each
        ``{"mean", "interval", "n"}`` over seeds; ``heterogeneity_dominates`` and
        ``round_dominates`` (True / False / None), ``client_sizes`` ``[min, max]`` over
        seeds}; ``dominates_from`` / ``round_dominates_from``: the largest α from which down
        every α's between-client noise dominates per sample / in a round (None: at none);
        ``round_weights`` ``{"between": c, "within": 1/b}``; ``iid``: whether ∞ was run.

    Raises:
        ValueError: labels that are not integer classes ``[N]``, or options the data
            cannot meet (see :func:`_check`, :func:`dirichlet_split`).
    """
    cfg = config or FederatedConfig.for_size(size)
    classes = _check(task, cfg)
    runs: Dict[float, List[Dict[str, Any]]] = {a: [] for a in cfg.alphas}
    sizes: Dict[float, List[int]] = {a: [] for a in cfg.alphas}
    test = None
    with StudyWriter(out, "federated", task.name, seed, size, asdict(cfg)) as w, \
            bar(len(cfg.alphas) * cfg.seeds * cfg.rounds, f"federated {task.name}", quiet) as progress:
        for r in range(cfg.seeds):
            for alpha in cfg.alphas:
                test, clients = partition(task, cfg, alpha, seed, seed + r)
                counts = [[int((task.y[c] == k).sum()) for k in classes] for c in clients]
                w.write("split", alpha=alpha, seed=seed + r, sizes=[len(c) for c in clients], classes=classes,
                        class_counts=counts)
                sizes[alpha] += [len(c) for c in clients]
                runs[alpha].append(_run_one(task, cfg, alpha, test, clients, seed + r, w, progress))
            _versus_iid([runs[a][-1] for a in cfg.alphas])
            for a in cfg.alphas:
                w.write("run", **runs[a][-1])
        summary = _summary(runs, sizes, cfg, len(test))
        w.write("summary", **summary)
    return summary


def _versus_iid(rows: List[Dict[str, Any]]) -> None:
    """Add ``loss_vs_iid`` and ``drift_vs_iid`` to one seed's runs (None without an IID run)."""
    iid = next((r for r in rows if math.isinf(r["alpha"])), None)
    for r in rows:
        for key, base in (("loss_vs_iid", "final_loss"), ("drift_vs_iid", "drift")):
            d = iid[base] if iid is not None else None
            r[key] = r[base] / d if d and r[base] is not None else None


SUMMARY_KEYS = ("between_share", "between_to_within", "round_between_share", "dissimilarity_sq", "within", "between",
                "trace_cov", "drift", "drift_ratio", "drift_vs_iid", "final_loss", "loss_vs_iid", "final_accuracy", "seconds")
NONNEGATIVE = ("dissimilarity_sq", "within", "trace_cov", "drift", "drift_ratio", "drift_vs_iid", "final_loss",
               "loss_vs_iid", "final_accuracy", "seconds")


def dominates(share: Dict[str, Any]) -> Optional[bool]:
    """True when the 95 % interval of the between share lies above 1/2, False below, else None."""
    low, high = share.get("interval") or (math.nan, math.nan)
    if share.get("mean") is None or not (math.isfinite(low) and math.isfinite(high)):
        return None
    return True if low > 0.5 else False if high < 0.5 else None


def _from(per_alpha: List[Dict[str, Any]], key: str) -> Optional[float]:
    """The largest α such that ``key`` is True at it and at every smaller α (None: not
    even at the smallest)."""
    found = None
    for part in sorted(per_alpha, key=lambda p: p["alpha"]):   # from the smallest α up
        if part[key] is not True:
            break
        found = part["alpha"]
    return found


def _summary(runs, sizes, cfg: FederatedConfig, test_size: int) -> dict:
    per_alpha = []
    for a, rows in runs.items():
        part: Dict[str, Any] = {"alpha": a}
        for k in SUMMARY_KEYS:
            part[k] = mean_interval([r[k] for r in rows], lower=0.0 if k in NONNEGATIVE else None)
        part["heterogeneity_dominates"] = dominates(part["between_share"])
        part["round_dominates"] = dominates(part["round_between_share"])
        part["client_sizes"] = [min(sizes[a]), max(sizes[a])]
        per_alpha.append(part)
    m = per_round(cfg)
    return {"clients": cfg.clients, "rounds": cfg.rounds, "local_steps": cfg.local_steps,
            "local_batch": cfg.local_batch, "lr": cfg.local_lr,
            "clients_per_round": m, "round_weights": {"between": (cfg.clients - m) / (cfg.clients - 1),
                                                      "within": 1.0 / cfg.local_batch},
            "measure_batch": cfg.measure_batch, "test_size": test_size, "seeds": cfg.seeds,
            "alphas": per_alpha, "dominates_from": _from(per_alpha, "heterogeneity_dominates"),
            "round_dominates_from": _from(per_alpha, "round_dominates"),
            "iid": any(math.isinf(a) for a in cfg.alphas)}


def summary_line(s: dict) -> str:
    """One line for the end of ``gradnoise study``: per α the between-client share of the
    noise, B², the client drift against IID and the final test loss."""
    parts = []
    for p in s.get("alphas") or []:
        share = p.get("between_share") or {}
        pct = fmt_with_interval(share.get("mean"), share.get("interval"), digits=2)
        rnd = p.get("round_between_share") or {}
        parts.append(f"α={fmt_num(p.get('alpha'), 3)}: between share {pct} per sample, "
                     f"{fmt_num(rnd.get('mean'), 2)} of a round's noise, "
                     f"B² {fmt_num((p.get('dissimilarity_sq') or {}).get('mean'), 3)}, "
                     f"drift ×{fmt_num((p.get('drift_vs_iid') or {}).get('mean'), 3)} IID, "
                     f"loss {fmt_num((p.get('final_loss') or {}).get('mean'), 3)}")
    return f"{s.get('clients')} clients, {s.get('local_steps')} local steps: " + "; ".join(parts)
