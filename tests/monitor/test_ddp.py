"""NoiseMonitor under DistributedDataParallel, with real processes (gloo, CPU).

One set of 4 processes is spawned for the module: they first form a world of 4, then
ranks 0 and 1 a fresh world of 2, and run every scenario of that world in turn (a fresh
model, DDP wrapper and monitor per scenario), writing each step's
``rec.raw`` (total and ``by_param``) and the weights it was measured at to JSON files.
The parent checks them against the float64 oracle of ``tests/reference.py``, computed
from per-sample gradients of the global batch at weights the parent derives itself
(SGD with DDP's equal-weight average of the ranks' gradients):

* ``source="ddp"``, equal counts: ``group_noise_stats`` with the ranks as groups, and a
  single-process ``source="microbatch"`` run whose micro-batches are the rank slices;
* the same with gradient accumulation (``no_sync`` on all but the last micro-batch);
* uneven counts: ``weighted_group_noise_stats`` with ``w_r = 1/R``;
* ``source="per_sample"``: ``noise_stats`` of the global batch (equal counts) and
  ``weighted_group_noise_stats`` with groups of one sample and ``w_i = 1/(R·b_r)``;
* ``source="per_sample"`` with ``reduction="sum"`` (each rank's loss a sum over its
  samples), uneven counts: DDP's average is ``(1/R) Σ_i g_i``, every sample weighs
  ``1/B``, so ``noise_stats`` of the global batch and no combination factor;
* every scenario runs two SGD steps, and both are checked.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import traceback
from typing import Dict, List

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import reference as R
from workers import wait_for_workers

IN, HIDDEN, OUT = 4, 6, 3
MODEL_SEED = 1234
LR = 0.1
STEPS = 2
RTOL = 1e-9
JOIN_TIMEOUT_S = 180.0  # all worlds together; ~15 s on 2 idle cores
COLLECTIVE_TIMEOUT_S = 60.0
FIELDS = ("trace_cov", "grad_sq_norm", "b_simple", "mean_sq_norm", "group_sq_norm")


# ------------------------------------------------------------------------- scenarios
def _sc(name: str, source: str, sizes: List[int], micro: int = 1, seed: int = 0, reduction: str = "mean",
        compiled: bool = False) -> dict:
    return {"name": name, "source": source, "sizes": sizes, "micro": micro, "seed": seed, "reduction": reduction,
            "compiled": compiled}


SCENARIOS: Dict[int, List[dict]] = {
    2: [
        _sc("ddp_equal", "ddp", [8, 8], seed=11),
        _sc("ddp_accum", "ddp", [8, 8], micro=2, seed=12),
        _sc("ddp_uneven", "ddp", [3, 5], seed=13),
        _sc("ddp_uneven_accum", "ddp", [3, 5], micro=2, seed=14),
        _sc("ps_equal", "per_sample", [8, 8], seed=15),
        _sc("ps_uneven", "per_sample", [3, 5], seed=16),
        _sc("ps_uneven_sum", "per_sample", [3, 5], seed=17, reduction="sum"),
        _sc("ddp_compiled", "ddp", [3, 5], micro=2, seed=18, compiled=True),  # torch.compile(DDP(model))
        _sc("ps_compiled", "per_sample", [3, 5], seed=19, compiled=True),
    ],
    4: [
        _sc("ddp_equal", "ddp", [4, 4, 4, 4], seed=21),
        _sc("ddp_accum", "ddp", [4, 4, 4, 4], micro=2, seed=22),
        _sc("ddp_uneven", "ddp", [2, 3, 5, 6], seed=23),
    ],
}


def make_model() -> nn.Module:
    """Identical float64 weights wherever it is called."""
    torch.manual_seed(MODEL_SEED)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT)).double()


def make_batch(sc: dict):
    """The scenario's global batch, the same on every rank. About 70% of the targets
    are class 0, so that the mean gradient stands out of the noise and the totals have
    ``grad_sq_norm > 0`` (``b_simple`` defined); some parameter blocks stay flagged."""
    gen = torch.Generator().manual_seed(sc["seed"])
    B = sum(sc["sizes"])
    x = torch.randn(B, IN, generator=gen, dtype=torch.float64)
    y = torch.randint(0, OUT, (B,), generator=gen)
    y = torch.where(torch.rand(B, generator=gen) < 0.7, torch.zeros_like(y), y)
    return x, y


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over the samples of per-sample cross-entropies."""
    return F.cross_entropy(out, y)


def rank_slice(sizes: List[int], r: int) -> slice:
    lo = sum(sizes[:r])
    return slice(lo, lo + sizes[r])


def micro_sizes(b: int, micro: int) -> List[int]:
    """``b`` samples split into ``micro`` consecutive micro-batches."""
    base = [b // micro] * micro
    for i in range(b % micro):
        base[i] += 1
    assert all(s > 0 for s in base), (b, micro)
    return base


def raw_to_dict(raw) -> dict:
    """``rec.raw`` as plain JSON data (floats round-trip exactly through ``repr``)."""
    out = {f.name: getattr(raw, f.name) for f in dataclasses.fields(raw) if f.name != "by_param"}
    out["by_param"] = {n: raw_to_dict(s) for n, s in raw.by_param.items()}
    return out


def strip_module(name: str) -> str:
    return name[len("module."):] if name.startswith("module.") else name


# --------------------------------------------------------------------------- workers
def _run_scenario(sc: dict, rank: int, world: int) -> dict:
    import gradnoise

    sizes = sc["sizes"]
    ddp = nn.parallel.DistributedDataParallel(make_model())
    if sc["compiled"]:
        ddp = torch.compile(ddp)
    summed = sc["reduction"] == "sum"
    monitor = gradnoise.NoiseMonitor(ddp, source=sc["source"], reduction=sc["reduction"])
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    x, y = make_batch(sc)
    x, y = x[rank_slice(sizes, rank)], y[rank_slice(sizes, rank)]
    b = sizes[rank]
    steps = []
    try:
        for _ in range(STEPS):
            weights = {strip_module(n.replace("_orig_mod.", "")): p.detach().flatten().tolist()
                       for n, p in ddp.named_parameters()}
            split = micro_sizes(b, sc["micro"])
            chunks = list(zip(x.split(split), y.split(split)))
            for j, (xm, ym) in enumerate(chunks):
                sync = j == len(chunks) - 1
                with contextlib.nullcontext() if sync else ddp.no_sync():
                    if summed:  # a plain sum over the rank's samples
                        loss = F.cross_entropy(ddp(xm), ym, reduction="sum")
                    else:
                        loss = loss_fn(ddp(xm), ym) * (xm.shape[0] / b)
                    loss.backward()
            rec = monitor.step()
            steps.append({"weights": weights, "raw": None if rec is None else raw_to_dict(rec.raw)})
            opt.step()
            opt.zero_grad()
    finally:
        monitor.close()
    return {"steps": steps}


def ddp_worker(rank: int, init_dir: str, out_dir: str, plan: List[tuple]) -> None:
    """Spawned once per rank of the largest world. For each ``(world, scenarios)`` of
    ``plan``, ranks below ``world`` form a fresh default process group of that size and
    run every scenario, one JSON file per scenario and rank; the others are done."""
    torch.set_num_threads(1)
    for world, scenarios in plan:
        if rank >= world:
            return
        dist.init_process_group(
            "gloo",
            init_method=f"file://{os.path.join(init_dir, f'init{world}')}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        try:
            assert dist.get_world_size() == world
            for sc in scenarios:
                try:
                    result = _run_scenario(sc, rank, world)
                except Exception:  # reported by the test of this scenario
                    result = {"error": traceback.format_exc()}
                with open(os.path.join(out_dir, f"w{world}.{sc['name']}.rank{rank}.json"), "w") as fh:
                    json.dump(result, fh)
                dist.barrier()
        finally:
            dist.destroy_process_group()


def spawn_worlds(tmp_dir: str) -> Dict[int, Dict[str, List[dict]]]:
    """Runs every world of ``SCENARIOS`` (largest first) on one set of processes, so
    that torch is imported once per process; world -> name -> per-rank results."""
    plan = sorted(SCENARIOS.items(), reverse=True)
    ctx = mp.start_processes(
        ddp_worker,
        args=(tmp_dir, tmp_dir, plan),
        nprocs=plan[0][0],
        join=False,
        start_method="spawn",
    )
    expected = [os.path.join(tmp_dir, f"w{world}.{sc['name']}.rank{r}.json")
                for world, scenarios in plan for sc in scenarios for r in range(world)]
    wait_for_workers(ctx, JOIN_TIMEOUT_S, "DDP", expected)
    results: Dict[int, Dict[str, List[dict]]] = {}
    for world, scenarios in plan:
        results[world] = {}
        for sc in scenarios:
            ranks = []
            for r in range(world):
                with open(os.path.join(tmp_dir, f"w{world}.{sc['name']}.rank{r}.json")) as fh:
                    ranks.append(json.load(fh))
            results[world][sc["name"]] = ranks
    return results


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """``spawned(world)``: the results of that world size (all worlds spawn on first use)."""
    cache: Dict[int, Dict[str, List[dict]]] = {}
    failed: List[str] = []

    def get(world: int) -> Dict[str, List[dict]]:
        if failed:  # spawn once: a hang must not cost its timeout in every test
            pytest.fail(failed[0])
        if not cache:
            try:
                cache.update(spawn_worlds(str(tmp_path_factory.mktemp("ddp"))))
            except Exception:
                failed.append(f"the DDP workers failed:\n{traceback.format_exc()}")
                raise
        return cache[world]

    return get


def scenario(world: int, name: str) -> dict:
    return next(sc for sc in SCENARIOS[world] if sc["name"] == name)


def ranks_of(spawned, world: int, name: str) -> List[dict]:
    ranks = spawned(world)[name]
    for r, res in enumerate(ranks):
        if "error" in res:
            pytest.fail(f"rank {r} of scenario {name} (world {world}) raised:\n{res['error']}")
    return ranks


# ---------------------------------------------------------------------------- oracle
def oracle_trajectory(sc: dict, world: int):
    """Per step: (weights, per-sample grads of the global batch), with SGD on DDP's
    update ``(1/R) Σ_r g_r`` (``g_r`` the mean gradient of rank r's samples; with
    ``reduction="sum"`` the sum, so the update is ``(1/R) Σ_i g_i``)."""
    model = make_model()
    x, y = make_batch(sc)
    sizes = sc["sizes"]
    out = []
    for _ in range(STEPS):
        weights = {n: p.detach().flatten().tolist() for n, p in model.named_parameters()}
        grads = R.per_sample_grads(model, loss_fn, x, y)
        out.append((weights, grads))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if sc["reduction"] == "sum":
                    update = grads[n].sum(0) / world
                else:
                    update = sum(grads[n][rank_slice(sizes, r)].mean(0) for r in range(world)) / world
                p -= LR * update
    return out


def expected(sc: dict, world: int, grads) -> R.RefNoise:
    sizes = sc["sizes"]
    equal = len(set(sizes)) == 1
    if sc["source"] == "ddp":
        if equal:
            return R.group_noise_stats(grads, sizes)
        return R.weighted_group_noise_stats(grads, sizes, [1.0 / world] * world)
    if equal or sc["reduction"] == "sum":  # every sample weighs 1/B
        return R.noise_stats(grads)
    per_sample_w = [1.0 / (world * b) for b in sizes for _ in range(b)]
    return R.weighted_group_noise_stats(grads, [1] * sum(sizes), per_sample_w)


def close(a: float, b: float, scale: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=RTOL, abs_tol=RTOL * 1e-3 * scale)


def assert_stats(got: dict, ref, where: str, scale: float) -> None:
    assert got["batch_size"] == ref.batch_size, where
    assert got["n_groups"] == ref.n_groups, where
    assert got["flag"] == ref.flag, where
    for f in FIELDS:
        assert close(got[f], getattr(ref, f), scale), f"{where}.{f}: got {got[f]!r}, oracle {getattr(ref, f)!r}"


def assert_matches_oracle(got: dict, ref: R.RefNoise, where: str) -> None:
    scale = abs(ref.total.group_sq_norm)
    assert_stats(got, ref.total, f"{where} total", scale)
    by_param = {strip_module(n): s for n, s in got["by_param"].items()}
    assert set(by_param) == set(ref.by_param), where
    for n, s in by_param.items():
        assert_stats(s, ref.by_param[n], f"{where} {n}", scale)


def assert_same_raw(a: dict, b: dict, where: str) -> None:
    scale = abs(a["group_sq_norm"])
    for key in ("batch_size", "n_groups", "flag"):
        assert a[key] == b[key], f"{where}: {key} {a[key]!r} != {b[key]!r}"
    for f in FIELDS:
        assert close(a[f], b[f], scale), f"{where}.{f}: {a[f]!r} != {b[f]!r}"
    pa = {strip_module(n): s for n, s in a["by_param"].items()}
    pb = {strip_module(n): s for n, s in b["by_param"].items()}
    assert set(pa) == set(pb), where
    for n in pa:
        for f in FIELDS:
            assert close(pa[n][f], pb[n][f], scale), f"{where} {n}.{f}: {pa[n][f]!r} != {pb[n][f]!r}"


def check_against_oracle(spawned, world: int, name: str) -> None:
    sc = scenario(world, name)
    ranks = ranks_of(spawned, world, name)
    traj = oracle_trajectory(sc, world)
    for step, (weights, grads) in enumerate(traj):
        ref = expected(sc, world, grads)
        # the data are chosen so that b_simple is defined and compared
        assert ref.total.flag is None, f"{name} world={world} step={step}: pick other data"
        for r, res in enumerate(ranks):
            got = res["steps"][step]
            where = f"{name} world={world} step={step} rank={r}"
            for n, w in weights.items():  # the weights the step was measured at
                torch.testing.assert_close(torch.tensor(got["weights"][n]), torch.tensor(w),
                                           rtol=1e-12, atol=1e-13, msg=where)
            assert got["raw"] is not None, where
            assert_matches_oracle(got["raw"], ref, where)
            # C combines the ranks with weights 1/R: f = (1/R²) Σ_r 1/b_r (None allowed
            # where that is the default 1/B, i.e. equal counts); a sum loss weighs every
            # sample 1/B: the plain per-sample factor, None
            f, combo = sum(1.0 / b for b in sc["sizes"]) / world**2, got["raw"]["combo_factor"]
            if sc["reduction"] == "sum":
                assert combo is None, (where, combo)
            elif combo is not None or len(set(sc["sizes"])) > 1:
                assert combo is not None and math.isclose(combo, f, rel_tol=1e-12), (where, combo, f)
        # every rank reports the same numbers
        for r in range(1, world):
            assert_same_raw(ranks[r]["steps"][step]["raw"], ranks[0]["steps"][step]["raw"],
                            f"{name} world={world} step={step} rank {r} vs 0")


# ----------------------------------------------------- single-process micro-batch run
def microbatch_run(sc: dict) -> List[dict]:
    """``source="microbatch"`` in one process, the micro-batches being the rank slices,
    each loss scaled by its share ``b_r/B``; SGD on the global mean gradient."""
    import gradnoise

    model = make_model()
    monitor = gradnoise.NoiseMonitor(model, source="microbatch", reduction="mean")
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = make_batch(sc)
    B = x.shape[0]
    raws = []
    try:
        for _ in range(STEPS):
            for xm, ym in zip(x.split(sc["sizes"]), y.split(sc["sizes"])):
                (loss_fn(model(xm), ym) * (xm.shape[0] / B)).backward()
            raws.append(raw_to_dict(monitor.step().raw))
            opt.step()
            opt.zero_grad()
    finally:
        monitor.close()
    return raws


def check_against_microbatch(spawned, world: int, name: str) -> None:
    sc = scenario(world, name)
    assert len(set(sc["sizes"])) == 1, "equal counts only: DDP's update differs otherwise"
    ranks = ranks_of(spawned, world, name)
    for step, raw in enumerate(microbatch_run(sc)):
        assert_same_raw(ranks[0]["steps"][step]["raw"], raw, f"{name} world={world} step={step} vs microbatch")


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("world", [2, 4])
def test_ddp_equal_counts_matches_oracle(spawned, world):
    check_against_oracle(spawned, world, "ddp_equal")


@pytest.mark.parametrize("world", [2, 4])
def test_ddp_equal_counts_matches_microbatch_source(spawned, world):
    check_against_microbatch(spawned, world, "ddp_equal")


@pytest.mark.parametrize("world", [2, 4])
def test_ddp_accumulation_matches_oracle(spawned, world):
    check_against_oracle(spawned, world, "ddp_accum")


@pytest.mark.parametrize("world", [2, 4])
def test_ddp_accumulation_matches_microbatch_source(spawned, world):
    check_against_microbatch(spawned, world, "ddp_accum")


@pytest.mark.parametrize("world", [2, 4])
def test_ddp_uneven_counts_matches_weighted_oracle(spawned, world):
    check_against_oracle(spawned, world, "ddp_uneven")


def test_ddp_uneven_counts_with_accumulation(spawned):
    check_against_oracle(spawned, 2, "ddp_uneven_accum")


@pytest.mark.parametrize("name", ["ddp_compiled", "ps_compiled"])
def test_compiled_ddp_matches_oracle(spawned, name):
    """``torch.compile(DDP(model))``: the ddp source on compiled steps, the per-sample
    source on eager ones (measured steps run the compiled model eagerly)."""
    check_against_oracle(spawned, 2, name)


def test_per_sample_under_ddp_equal_counts(spawned):
    check_against_oracle(spawned, 2, "ps_equal")


def test_per_sample_under_ddp_uneven_counts(spawned):
    check_against_oracle(spawned, 2, "ps_uneven")


def test_per_sample_under_ddp_uneven_counts_sum_reduction(spawned):
    check_against_oracle(spawned, 2, "ps_uneven_sum")


def test_second_step_is_a_new_measurement(spawned):
    """Step 2 runs at other weights: its numbers differ from step 1's (both are checked
    against the oracle above), so nothing is carried over between steps."""
    for world in (2, 4):
        for sc in SCENARIOS[world]:
            ranks = ranks_of(spawned, world, sc["name"])
            s0, s1 = (ranks[0]["steps"][i]["raw"] for i in range(STEPS))
            assert s0["mean_sq_norm"] != s1["mean_sq_norm"], sc["name"]


# ------------------------------------------------------- the weighted oracle itself
def test_weighted_oracle_equals_group_oracle_for_count_weights():
    torch.manual_seed(0)
    grads = {"w": torch.randn(10, 3, 2, dtype=torch.float64), "b": torch.randn(10, 2, dtype=torch.float64)}
    sizes = [1, 4, 2, 3]
    got = R.weighted_group_noise_stats(grads, sizes, [b / 10 for b in sizes])
    ref = R.group_noise_stats(grads, sizes)
    for g, e in [(got.total, ref.total)] + [(got.by_param[n], ref.by_param[n]) for n in grads]:
        assert (g.batch_size, g.n_groups, g.flag) == (e.batch_size, e.n_groups, e.flag)
        for f in FIELDS:
            assert close(getattr(g, f), getattr(e, f), abs(e.group_sq_norm)), f


def test_weighted_oracle_is_unbiased():
    """Gaussian per-sample gradients with known mean and covariance, groups of 2, 3, 5, 6
    averaged with equal weights: the estimates average to the truth (4 standard errors)."""
    gen = torch.Generator().manual_seed(7)
    D, sizes, draws = 5, [2, 3, 5, 6], 2000
    G = torch.randn(D, generator=gen, dtype=torch.float64)
    L = torch.randn(D, D, generator=gen, dtype=torch.float64) * 0.7
    true_tr, true_g2 = float((L @ L.T).trace()), float(G.pow(2).sum())
    weights = [0.25] * 4
    tr, g2 = [], []
    for _ in range(draws):
        z = torch.randn(sum(sizes), D, generator=gen, dtype=torch.float64)
        s = R.weighted_group_noise_stats({"g": G + z @ L.T}, sizes, weights).total
        tr.append(s.trace_cov)
        g2.append(s.grad_sq_norm)
    for values, truth in ((tr, true_tr), (g2, true_g2)):
        t = torch.tensor(values)
        se = float(t.std() / math.sqrt(draws))
        assert abs(float(t.mean()) - truth) < 4 * se, (float(t.mean()), truth, se)
