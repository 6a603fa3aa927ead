"""NoiseMonitor on a model sharded with FSDP2's ``fully_shard``, with real processes
(2 ranks, gloo, CPU, float64).

One pair of processes is spawned for the module; it runs every scenario in turn (a fresh
model, ``fully_shard`` on sub-modules and the root, a monitor and SGD), writing each
step's ``rec.raw`` and the full weights it was measured at to JSON. The parent checks
them against the float64 oracle of ``tests/reference.py`` on the global batch, at
weights it derives itself (SGD on FSDP2's reduced gradient ``Σ_r g_r / f``, ``f = R``
unless ``set_gradient_divide_factor`` says otherwise):

* ``"ddp"``: the ranks are groups, weighted ``1/R`` (``b_r/B`` for ``reduction="sum"``);
* ``"microbatch"``: every backward pass of every rank is a group, weighted
  ``b_rj/(R b_r)``, with and without gradient sync between the passes;
* ``"per_sample"``: groups of one sample, weighted ``1/(R b_r)``;
* an MLP and a sequence model with Embedding and LayerNorm; equal and uneven counts;
* bad use (HSDP's 2-D mesh, a reduce-scatter per pass for ``"ddp"``) errors clearly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import traceback
from typing import List

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import reference as R
from workers import wait_for_workers

WORLD = 2
IN, HIDDEN, OUT, VOCAB, T = 4, 6, 3, 7, 3
LR = 0.1
STEPS = 2
RTOL = 1e-9
JOIN_TIMEOUT_S = 120.0  # ~15 s on 2 idle cores
COLLECTIVE_TIMEOUT_S = 60.0
FIELDS = ("trace_cov", "grad_sq_norm", "b_simple", "mean_sq_norm", "group_sq_norm")

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _sc(name, source, sizes, micro=1, sync=False, model="mlp", reduction="mean", divide=None, seed=0):
    """``sync``: gradient sync on every backward pass (else only on the step's last)."""
    return {"name": name, "source": source, "sizes": sizes, "micro": micro, "sync": sync, "model": model,
            "reduction": reduction, "divide": divide, "seed": seed}


SCENARIOS = [
    _sc("ddp_equal", "ddp", [8, 8], seed=11),
    _sc("ddp_uneven_accum", "ddp", [3, 5], micro=2, seed=12),
    _sc("ddp_sum_divide", "ddp", [3, 5], reduction="sum", divide=1.0, seed=13),
    _sc("mb_sync", "microbatch", [8, 8], micro=2, sync=True, seed=14),
    _sc("mb_uneven_nosync", "microbatch", [3, 5], micro=2, seed=15),
    _sc("mb_lm_sum", "microbatch", [4, 6], micro=2, model="lm", reduction="sum", seed=16),
    _sc("ps_equal", "per_sample", [8, 8], seed=17),
    _sc("ps_uneven_accum", "per_sample", [3, 5], micro=2, sync=True, seed=18),
    _sc("ps_sum_uneven", "per_sample", [3, 5], reduction="sum", seed=19),
    _sc("ps_lm", "per_sample", [4, 4], model="lm", seed=20),
    _sc("ddp_lm", "ddp", [4, 4], model="lm", seed=21),
]
ERRORS = ["hsdp", "ddp_sync_every_pass"]


def make_model(kind: str) -> nn.Module:
    """Identical float64 weights wherever it is called (before any sharding)."""
    torch.manual_seed(1234)
    if kind == "lm":
        return nn.Sequential(nn.Embedding(VOCAB, IN), nn.LayerNorm(IN), nn.Linear(IN, OUT)).double()
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT)).double()


def make_batch(sc: dict):
    """The global batch; ~70% of the targets are class 0, so that ``b_simple`` is defined."""
    gen = torch.Generator().manual_seed(sc["seed"])
    B = sum(sc["sizes"])
    shape = (B, T) if sc["model"] == "lm" else (B,)
    if sc["model"] == "lm":
        x = torch.randint(0, VOCAB, shape, generator=gen)
    else:
        x = torch.randn(B, IN, generator=gen, dtype=torch.float64)
    y = torch.randint(0, OUT, shape, generator=gen)
    return x, torch.where(torch.rand(shape, generator=gen) < 0.7, torch.zeros_like(y), y)


def make_loss(reduction: str):
    def loss_fn(out, y):
        """Per-sample losses (a sequence's mean over its tokens), meaned or summed."""
        per = F.cross_entropy(out.reshape(-1, OUT), y.reshape(-1), reduction="none").reshape(y.shape[0], -1).mean(1)
        return per.mean() if reduction == "mean" else per.sum()

    return loss_fn


def rank_slice(sizes: List[int], r: int) -> slice:
    lo = sum(sizes[:r])
    return slice(lo, lo + sizes[r])


def micro_sizes(b: int, micro: int) -> List[int]:
    return [b // micro + (1 if i < b % micro else 0) for i in range(micro)]


def raw_to_dict(raw) -> dict:
    out = {f.name: getattr(raw, f.name) for f in dataclasses.fields(raw) if f.name != "by_param"}
    out["by_param"] = {n: raw_to_dict(s) for n, s in raw.by_param.items()}
    return out


# --------------------------------------------------------------------------- workers
def _shard(model: nn.Module, mesh=None) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    fully_shard(model[0], mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _run_scenario(sc: dict, rank: int) -> dict:
    import gradnoise

    model = _shard(make_model(sc["model"]))
    if sc["divide"] is not None:  # the root's own parameters only, not model[0]'s
        model.set_gradient_divide_factor(sc["divide"])
    monitor = gradnoise.NoiseMonitor(model, source=sc["source"], reduction=sc["reduction"])
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss_fn = make_loss(sc["reduction"])
    x, y = make_batch(sc)
    x, y = x[rank_slice(sc["sizes"], rank)], y[rank_slice(sc["sizes"], rank)]
    b, steps = x.shape[0], []
    try:
        for _ in range(STEPS):
            weights = {n: p.detach().full_tensor().flatten().tolist() for n, p in model.named_parameters()}
            split = micro_sizes(b, sc["micro"])
            for j, (xm, ym) in enumerate(zip(x.split(split), y.split(split))):
                model.set_requires_gradient_sync(sc["sync"] or j == len(split) - 1)
                share = xm.shape[0] / b if sc["reduction"] == "mean" else 1.0
                (loss_fn(model(xm), ym) * share).backward()
            rec = monitor.step()
            steps.append({"weights": weights, "raw": None if rec is None else raw_to_dict(rec.raw)})
            opt.step()
            opt.zero_grad()
    finally:
        monitor.close()
    return {"steps": steps}


def _run_error(name: str, rank: int) -> dict:
    """The one-line message a bad use gets (or ``"no error"``)."""
    import gradnoise
    from torch.distributed.device_mesh import init_device_mesh

    try:
        if name == "hsdp":
            mesh = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("replicate", "shard"))
            gradnoise.NoiseMonitor(_shard(make_model("mlp"), mesh), source="per_sample").close()
        else:  # a reduce-scatter after each of two backward passes
            model = _shard(make_model("mlp"))
            with contextlib.closing(gradnoise.NoiseMonitor(model, source="ddp")) as monitor:
                x = torch.randn(4, IN, dtype=torch.float64)
                for xm in x.split(2):
                    (model(xm).pow(2).mean() / 2).backward()
                monitor.step()
    except gradnoise.GradNoiseError as e:
        return {"error": str(e)}
    return {"error": "no error"}


def fsdp_worker(rank: int, init_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(init_dir, 'init')}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        jobs = [(sc["name"], lambda sc=sc: _run_scenario(sc, rank)) for sc in SCENARIOS]
        jobs += [(name, lambda name=name: _run_error(name, rank)) for name in ERRORS]
        for name, job in jobs:
            try:
                result = job()
            except Exception:  # reported by the test of this scenario
                result = {"crash": traceback.format_exc()}
            with open(os.path.join(out_dir, f"{name}.rank{rank}.json"), "w") as fh:
                json.dump(result, fh)
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """name -> per-rank results of every scenario (spawned once for the module)."""
    tmp = str(tmp_path_factory.mktemp("fsdp"))
    ctx = mp.start_processes(fsdp_worker, args=(tmp, tmp), nprocs=WORLD, join=False, start_method="spawn")
    names = [sc["name"] for sc in SCENARIOS] + ERRORS
    wait_for_workers(ctx, JOIN_TIMEOUT_S, "FSDP", [os.path.join(tmp, f"{n}.rank{r}.json") for n in names for r in range(WORLD)])
    out = {}
    for name in names:
        out[name] = []
        for r in range(WORLD):
            with open(os.path.join(tmp, f"{name}.rank{r}.json")) as fh:
                out[name].append(json.load(fh))
    return out


# ---------------------------------------------------------------------------- oracle
def oracle_trajectory(sc: dict):
    """Per step: (weights, per-sample grads of the global batch); SGD on FSDP2's
    reduced gradient ``Σ_r L_r / f`` (``L_r`` rank r's local gradient, ``f`` = R or the
    divide factor set on the root, which holds for the root's own parameters only)."""
    model, loss_fn = make_model(sc["model"]), make_loss("mean")
    x, y = make_batch(sc)
    sizes = sc["sizes"]
    out = []
    for _ in range(STEPS):
        weights = {n: p.detach().flatten().tolist() for n, p in model.named_parameters()}
        grads = R.per_sample_grads(model, loss_fn, x, y)
        out.append((weights, grads))
        with torch.no_grad():
            for n, p in model.named_parameters():
                local = [grads[n][rank_slice(sizes, r)] for r in range(WORLD)]
                local = [g.mean(0) if sc["reduction"] == "mean" else g.sum(0) for g in local]
                divide = WORLD if n.startswith("0.") or sc["divide"] is None else sc["divide"]
                p -= LR * sum(local) / divide
    return out


def expected(sc: dict, grads) -> R.RefNoise:
    sizes, mean = sc["sizes"], sc["reduction"] == "mean"
    if sc["source"] == "ddp":
        groups, weights = sizes, [1.0 / WORLD] * WORLD
    elif sc["source"] == "microbatch":
        groups = [m for b in sizes for m in micro_sizes(b, sc["micro"])]
        weights = [m / (WORLD * b) for b in sizes for m in micro_sizes(b, sc["micro"])]
    else:
        groups, weights = [1] * sum(sizes), [1.0 / (WORLD * b) for b in sizes for _ in range(b)]
    if not mean:  # a sum of sums: count weights
        weights = [g / sum(sizes) for g in groups]
    return R.weighted_group_noise_stats(grads, groups, weights)


def close(a: float, b: float, scale: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=RTOL, abs_tol=RTOL * 1e-3 * scale)


def assert_stats(got: dict, ref, where: str, scale: float) -> None:
    assert (got["batch_size"], got["n_groups"], got["flag"]) == (ref.batch_size, ref.n_groups, ref.flag), where
    for f in FIELDS:
        assert close(got[f], getattr(ref, f), scale), f"{where}.{f}: got {got[f]!r}, oracle {getattr(ref, f)!r}"


def ranks_of(spawned, name: str) -> List[dict]:
    for r, res in enumerate(spawned[name]):
        if "crash" in res:
            pytest.fail(f"rank {r} of scenario {name} raised:\n{res['crash']}")
    return spawned[name]


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("sc", SCENARIOS, ids=[sc["name"] for sc in SCENARIOS])
def test_fsdp_source_matches_oracle(spawned, sc):
    ranks = ranks_of(spawned, sc["name"])
    for step, (weights, grads) in enumerate(oracle_trajectory(sc)):
        ref = expected(sc, grads)
        assert ref.total.flag is None, f"{sc['name']} step={step}: pick other data"
        scale = abs(ref.total.group_sq_norm)
        for r, res in enumerate(ranks):
            got, where = res["steps"][step], f"{sc['name']} step={step} rank={r}"
            for n, w in weights.items():  # the weights the step was measured at
                torch.testing.assert_close(torch.tensor(got["weights"][n]), torch.tensor(w),
                                           rtol=1e-12, atol=1e-13, msg=where)
            assert got["raw"] is not None, where
            assert_stats(got["raw"], ref.total, f"{where} total", scale)
            assert set(got["raw"]["by_param"]) == set(ref.by_param), where  # the user's names
            for n, s in got["raw"]["by_param"].items():
                assert_stats(s, ref.by_param[n], f"{where} {n}", scale)
    s0, s1 = (ranks[0]["steps"][i]["raw"] for i in range(STEPS))
    assert s0["mean_sq_norm"] != s1["mean_sq_norm"], "step 2 is a new measurement"


@pytest.mark.parametrize("name, message", [
    ("hsdp", r"is a DTensor on a 2-D mesh .*not HSDP"),
    ("ddp_sync_every_pass", r"reduce-scattered twice in one step.*set_requires_gradient_sync\(False\)"),
])
def test_unsupported_use_errors_clearly(spawned, name, message):
    import re

    for res in ranks_of(spawned, name):
        assert re.search(message, res["error"]), res["error"]
        assert "\n" not in res["error"]
