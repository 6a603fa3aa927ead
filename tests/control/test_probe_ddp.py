"""The branch probe under ``torch.distributed`` (issue 20), with real processes (gloo, CPU):
2 ranks split the branches and give the same result as one process.

One pair of ranks is spawned for the module; each builds the same small model, AdamW state
and data (seeded) and runs ``gradnoise.probe`` with the default process group in three
scenarios, writing one JSON file per scenario and rank:

* ``same``: every rank's global generator seeded alike (as the single process is); each
  rank counts the branches it ran itself (``run_branch`` wrapped). Both ranks get the same
  document, equal to the one a single process gets (every branch's curve, the McCandlish
  and Merrill readings and the proxy, exactly; ``created`` and ``seconds`` aside), and
  every branch ran on exactly one rank, half of them each.
* ``own_seed``: every rank's global generator seeded apart (as training scripts do under
  ``torchrun``). The branches seed themselves, so their curves and readings still match
  the single process; the proxy (dropout at the checkpoint) should too.
* ``failing``: a branch raises on rank 1 only; both ranks fail promptly (none waits at
  the gather for the collective's timeout), rank 0 naming rank 1.

The workers are waited for as in ``tests/monitor/test_ddp.py`` (``tests/workers.py``): a
missing result fails, an abort at exit after every result was written only warns.
"""
from __future__ import annotations

import datetime
import json
import os
import traceback
from typing import List

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from workers import wait_for_workers

WORLD = 2
JOIN_TIMEOUT_S = 150.0       # ~15 s on 2 idle cores (a failing gather would wait COLLECTIVE_TIMEOUT_S)
COLLECTIVE_TIMEOUT_S = 60.0
# the base batch's branches (2 seeds) split 1 + 1, the 10 others 5 + 5
PROBE = dict(base_batch=8, batch_sizes=(4, 8, 16), budget=64, seeds=2, lr_grid=(0.5, 1.0), proxy_batches=4,
             seed=3, quiet=True)
VOLATILE = ("created", "seconds")
GLOBAL_SEED = 1234
SCENARIOS = ("same", "own_seed", "failing")


def setup():
    """Identical model (with dropout: the branches' own random numbers matter), AdamW state
    and data wherever it is called; the caller's random generator left alone."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.1), nn.Tanh(), nn.Linear(8, 3))
        x = torch.randn(400, 4)
        y = (x @ torch.randn(4, 3)).argmax(1)
        train, held = (x[:300], y[:300]), (x[300:], y[300:])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for i in range(3):  # some optimizer state for the branches to copy
            opt.zero_grad()
            nn.functional.cross_entropy(model(train[0][16 * i:16 * i + 16]), train[1][16 * i:16 * i + 16]).backward()
            opt.step()
    return model, opt, train, held


def run_probe() -> dict:
    import gradnoise

    model, opt, train, held = setup()
    return gradnoise.probe(model, opt, train, nn.functional.cross_entropy, held_out=held, **PROBE)


def canonical(doc: dict) -> str:
    """The document less its volatile fields, as JSON (floats exactly; NaN as ``NaN``)."""
    return json.dumps({k: v for k, v in doc.items() if k not in VOLATILE}, sort_keys=True)


def scenario(name: str, rank: int, P) -> dict:
    """Runs one scenario on this rank: its document, the branches it ran, or its error."""
    ran: List[list] = []
    real = P.run_branch

    def counted(spec, *args, **kwargs):
        ran.append([spec.batch_size, spec.seed, spec.multiplier])
        if name == "failing" and rank == 1 and len(ran) == 2:  # rank 1's first branch after the base batch's
            raise RuntimeError("simulated out of memory\nsecond line")
        return real(spec, *args, **kwargs)

    P.run_branch = counted
    try:
        torch.manual_seed(GLOBAL_SEED + (rank if name == "own_seed" else 0))
        return {"doc": json.loads(json.dumps(run_probe())), "ran": ran}
    except Exception as e:  # reported by the tests
        return {"error": traceback.format_exc(), "message": f"{type(e).__name__}: {e}", "ran": ran}
    finally:
        P.run_branch = real


def probe_worker(rank: int, init_dir: str, out_dir: str) -> None:
    """One rank: every scenario with the default process group, one JSON file each."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(init_dir, 'init')}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        from gradnoise.control import probe as P

        for name in SCENARIOS:
            result = scenario(name, rank, P)
            path = os.path.join(out_dir, f"{name}.rank{rank}.json")
            with open(path + ".part", "w") as fh:
                json.dump(result, fh)
            os.replace(path + ".part", path)  # a result is there whole or not at all
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """``scenario name -> [rank 0's result, rank 1's]``, the workers spawned once."""
    tmp = tmp_path_factory.mktemp("probe_ddp")
    ctx = mp.start_processes(probe_worker, args=(str(tmp), str(tmp)), nprocs=WORLD, join=False,
                             start_method="spawn")
    expected = [str(tmp / f"{name}.rank{r}.json") for name in SCENARIOS for r in range(WORLD)]
    wait_for_workers(ctx, JOIN_TIMEOUT_S, "probe", expected)
    out = {}
    for name in SCENARIOS:
        out[name] = []
        for r in range(WORLD):
            with open(tmp / f"{name}.rank{r}.json") as fh:
                out[name].append(json.load(fh))
    return out


@pytest.fixture(scope="module")
def single() -> dict:
    """The same probe in this one process: the global generator seeded as the ranks' of
    ``same``, one thread as theirs (the caller's generator and threads restored)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(GLOBAL_SEED)
            doc = json.loads(json.dumps(run_probe()))
    finally:
        torch.set_num_threads(threads)
    assert len(doc["branches"]) == 3 * 2 * 2 and doc["mccandlish"]["b_noise"] is not None  # readings to compare
    assert doc["merrill"]["b_crit"] is not None
    assert doc["proxy"]["b_simple"] is not None and doc["proxy"]["preconditioned"] is not None
    return doc


def docs(spawned, name: str) -> List[dict]:
    for r, res in enumerate(spawned[name]):
        if "error" in res:
            pytest.fail(f"rank {r} of scenario {name} raised:\n{res['error']}")
    return [res["doc"] for res in spawned[name]]


def same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_two_gloo_ranks_split_the_branches_and_match_one_process(spawned, single):
    for r, doc in enumerate(docs(spawned, "same")):  # every rank holds the whole document, one process's
        assert [b["curve"] for b in doc["branches"]] == [b["curve"] for b in single["branches"]], f"rank {r}"
        for key in ("target_loss", "mccandlish", "merrill", "proxy"):
            assert same(doc[key], single[key]), (r, key, doc[key], single[key])
        assert canonical(doc) == canonical(single), f"rank {r}"
    # each rank ran its own share: every branch once, half each
    runs = [[tuple(k) for k in res["ran"]] for res in spawned["same"]]
    everything = sorted((b["batch_size"], b["seed"], b["lr_multiplier"]) for b in single["branches"])
    assert sorted(runs[0] + runs[1]) == everything
    assert not set(runs[0]) & set(runs[1])
    assert [len(k) for k in runs] == [len(everything) // 2] * 2, [len(k) for k in runs]


def test_ranks_seeded_apart_run_the_same_branches(spawned, single):
    for r, doc in enumerate(docs(spawned, "own_seed")):
        assert [b["curve"] for b in doc["branches"]] == [b["curve"] for b in single["branches"]], f"rank {r}"
        for key in ("target_loss", "mccandlish", "merrill"):
            assert same(doc[key], single[key]), (r, key)


def test_ranks_seeded_apart_measure_the_same_proxy(spawned, single):
    a, b = docs(spawned, "own_seed")
    assert same(a["proxy"], b["proxy"]) and same(a["proxy"], single["proxy"])


def test_a_branch_failing_on_one_rank_fails_every_rank_at_once(spawned):
    r0, r1 = spawned["failing"]
    assert "error" in r0 and "error" in r1, (r0.get("message"), r1.get("message"))
    assert r1["message"] == "RuntimeError: simulated out of memory\nsecond line"  # its own error, re-raised
    assert r0["message"] == "RuntimeError: a probe branch failed on rank 1 (RuntimeError: simulated out of memory)"
    assert len(r0["ran"]) == 6  # rank 0 finished its share, then learnt of rank 1's failure at the gather
