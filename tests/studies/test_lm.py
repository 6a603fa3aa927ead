"""Study ``lm``: the tiny run, the LayerNorm-only noise scale against the float64 oracle,
the growth and agreement summaries, the warm-up and bad input."""
import json
import math

import pytest
import torch

import reference as R
from gradnoise.studies import lm
from gradnoise.studies.gpt import TinyGPT, corpus_bytes, token_loss, windows
from gradnoise.studies.progress import bar
from gradnoise.studies.output import StudyWriter
from gradnoise.studies.task import Task, builtin
from gradnoise.studies.training import batches


def small_task(n=48, length=8, dtype=torch.float32) -> Task:
    torch.manual_seed(0)
    x, y = windows(corpus_bytes(), length, limit=n)
    return Task("gpt-small", TinyGPT(length, dim=16, heads=2, layers=1).to(dtype), x, y, token_loss)


def lines(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_tiny_run_writes_the_trajectory_and_the_warmup(tmp_path):
    s = lm.run(builtin("pydoc-gpt"), tmp_path, size="tiny", quiet=True)
    rows = lines(tmp_path / "lm-pydoc-gpt.jsonl")
    kinds = {r["type"] for r in rows}
    assert {"noise", "checkpoint", "run", "summary"} <= kinds
    cfg = lm.LmConfig.for_size("tiny")
    checkpoints = [r for r in rows if r["type"] == "checkpoint"]
    assert [c["step"] for c in checkpoints] == list(range(cfg.eval_every, cfg.steps + 1, cfg.eval_every))
    assert all(c["tokens"] == c["step"] * cfg.batch_size * 64 for c in checkpoints)
    assert {"ln_f", "blocks.0.norm1", "wte"} <= set(checkpoints[-1]["layers"])
    assert s["sequence_length"] == 64 and s["final_loss"] < s["initial_loss"]
    g = s["growth"]
    assert g["last"]["b_simple_tokens"] == pytest.approx(64 * g["last"]["b_simple"])
    assert set(s["methods"]) == set(lm.METHODS)
    runs = [r for r in rows if r["type"] == "run"]
    assert len(runs) == len(lm.METHODS) * cfg.seeds
    for r in runs:
        assert r["tokens"] == r["examples"] * 64 and r["seconds"] > 0
        if r["method"] == "fixed small":
            assert r["examples"] == r["steps"] * cfg.base_batch
    assert lm.summary_line(s).startswith("B_simple")
    # the branch probes: at the checkpoints probe_steps names, each reading beside the proxies
    probed = [c for c in checkpoints if c.get("probe")]
    assert [c["step"] for c in probed] == lm.probe_steps(cfg) == [12, 24]
    cal = s["calibration"]
    assert [p["step"] for p in cal["points"]] == [12, 24] and cal["last"]["step"] == 24
    for p in cal["points"]:
        assert p["branches"] == len(lm.probe_sizes(cfg)) * cfg.probe_seeds and p["seconds"] > 0
        assert p["b_simple"][0] is not None and len(p["b_crit"]) == 3
    assert "branch B_crit" in lm.summary_line(s)


def test_layernorm_scale_equals_the_float64_oracle_over_the_layernorm_parameters(tmp_path):
    """With beta = 0 the smoothed values are the step's own: at step 1 (the initial
    weights) the LayerNorm-only B_simple must equal the oracle's over those parameters."""
    task = small_task(dtype=torch.float64)
    cfg = lm.LmConfig(batch_size=8, steps=1, every=1, beta=0.0, eval_every=1, eval_windows=8, methods=[], probes=0)
    train, test = lm.split(task.size, cfg.eval_windows, 0)
    idx = train[next(batches(len(train), cfg.batch_size, torch.Generator().manual_seed(0)))]
    grads = R.per_sample_grads(task.model, token_loss, task.x[idx], task.y[idx])
    ln = {k: v for k, v in grads.items() if "norm" in k or k.startswith("ln_f")}
    assert len(ln) == 6  # norm1, norm2 and ln_f: weight and bias each
    want, whole = R.noise_stats(ln).total, R.noise_stats(grads).total
    with StudyWriter(tmp_path, "lm", task.name, 0, "test", {}) as w, bar(1, "t", True) as p:
        (point,) = lm.trajectory(task, cfg, train, test, 0, w, p)
    assert point["ln_b_simple"][0] == pytest.approx(want.trace_cov / want.grad_sq_norm, rel=1e-8)
    assert point["b_simple"][0] == pytest.approx(whole.trace_cov / whole.grad_sq_norm, rel=1e-8)


def test_growth_and_agreement_summaries():
    pts = [{"step": s, "tokens": 10 * s, "loss": 5.0 - s, "b_simple": [b, b / 2, b * 2],
            "ln_b_simple": [b / 2, None, None]} for s, b in ((1, 1.0), (2, 4.0), (3, 8.0), (4, 16.0))]
    pts.insert(0, {"step": 0, "tokens": 0, "loss": 6.0, "b_simple": [None, None, None],
                   "ln_b_simple": [None, None, None]})
    g = lm.growth(pts, 64)
    assert g["points"] == 4 and g["first"]["step"] == 1 and g["last"]["b_simple_tokens"] == 16 * 64
    assert g["growth"] == 16.0 and g["rho_loss"] == pytest.approx(-1.0)
    a = lm.layernorm_agreement(pts)
    assert a["median_ratio"] == 0.5 and a["ratio_range"] == [0.5, 0.5] and a["rho"] == pytest.approx(1.0)
    none = lm.layernorm_agreement(pts[:1])
    assert none["median_ratio"] is None and none["rho"] is None
    assert lm.growth(pts[:2], 64)["rho_loss"] is None  # one point: no correlation


def test_held_out_loss_is_the_token_mean(tmp_path):
    task = small_task()
    test = torch.arange(5)
    with torch.no_grad():
        want = float(token_loss(task.model(task.x[:5]), task.y[:5]))
    assert lm.held_out_loss(task.model, task, test, chunk=2) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("change, match", [
    ({"methods": ["nope"]}, "unknown method"),
    ({"batch_size": 0}, "batch_size must be"),
    ({"large_batch": 64}, "at most half"),
    ({"base_batch": 8, "large_batch": 4}, "base_batch ≤ large_batch"),
    ({"every": 4, "eval_every": 2}, "every"),
    ({"max_examples": 0}, "max_examples must be"),
    ({"adjust_every": 2.5}, "adjust_every must be"),
    ({"adam_lr": float("nan")}, "adam_lr must be"),
    ({"target_loss": -1.0}, "target_loss must be"),
    ({"beta": 1.0}, "beta must be"),
    ({"eval_windows": 47}, "leaves 1 of the 48"),
    ({"probes": -1}, "probes must be"),
    ({"probes": 1, "probe_factors": [1, 2, 100]}, "cannot fill"),
    ({"probes": 1, "probe_seeds": 1}, "seeds"),
])
def test_bad_options_are_refused(tmp_path, change, match):
    base = dict(batch_size=4, steps=2, eval_every=2, eval_windows=8, base_batch=2, large_batch=4, max_batch=8, probes=0)
    cfg = lm.LmConfig(**{**base, **change})
    with pytest.raises(ValueError, match=match):
        lm.run(small_task(), tmp_path, config=cfg, quiet=True)
    assert not (tmp_path / "lm-gpt-small.jsonl").exists()


def test_a_classification_task_or_a_reached_target_is_refused(tmp_path, toy):
    with pytest.raises(ValueError, match="token ids"):
        lm.run(toy, tmp_path, size="tiny", quiet=True)
    cfg = lm.LmConfig(batch_size=4, steps=2, eval_every=2, eval_windows=8, base_batch=2, large_batch=4,
                      max_batch=8, target_loss=100.0, probes=0)
    with pytest.raises(ValueError, match="already at or below the target"):
        lm.run(small_task(), tmp_path, config=cfg, quiet=True)


def test_a_missed_target_is_counted_not_averaged(tmp_path):
    cfg = lm.LmConfig(batch_size=4, steps=2, eval_every=2, eval_windows=8, base_batch=2, large_batch=4,
                      max_batch=8, target_loss=0.01, max_examples=16, eval_every_examples=8, adjust_every=2, probes=0)
    s = lm.run(small_task(), tmp_path, config=cfg, quiet=True)
    for m in s["methods"].values():
        assert m["reached"] == 0 and m["runs"] == cfg.seeds and m["steps"]["mean"] is None
    assert "target missed" in lm.summary_line(s)


def test_an_unbounded_interval_stays_one_sided_in_the_file_and_on_the_page(tmp_path):
    """Early on the smoothed B_simple's interval has no upper end: the file must say
    "inf" (not null, which would read as undefined), the page "≥ low"."""
    from types import SimpleNamespace

    from gradnoise.formats import read_study
    from gradnoise.report.lm_section import _growth_table

    point = {"step": 2, "tokens": 64, "loss": 3.0,
             "b_simple": lm._b(SimpleNamespace(b_simple=5.0), (2.0, math.inf)), "ln_b_simple": [None] * 3}
    assert point["b_simple"] == [5.0, 2.0, math.inf]
    with StudyWriter(tmp_path, "lm", "t", 0, "test", {}) as w:
        w.write("summary", growth=lm.growth([point], 64))
    _, rows = read_study(w.path)
    summary = rows[-1]
    assert summary["growth"]["last"]["interval"] == [2.0, "inf"]
    assert "5 (95 % interval ≥ 2)" in _growth_table(summary)
    assert lm._b(SimpleNamespace(b_simple=math.nan), (math.nan, math.nan))[0] is None
