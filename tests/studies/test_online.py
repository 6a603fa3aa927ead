"""The online study: its drifting stream, its update-noise draws (which must leave the run
as it was), its file and summary, and the options it refuses."""
import copy
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gradnoise.formats import read_study
from gradnoise.monitor.window import WindowNoise
from gradnoise.studies import online
from gradnoise.studies.task import Task, builtin

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "report"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("online")
    summary = online.run(builtin("digits-mlp"), out, size="tiny", quiet=True)
    return summary, read_study(out / "online-digits-mlp.jsonl"), out / "online-digits-mlp.jsonl"


def test_tiny_run_writes_valid_lines_and_a_sane_summary(tiny_run):
    summary, (header, lines), _ = tiny_run
    cfg = online.OnlineConfig.for_size("tiny")
    assert header["study"] == "online" and header["config"]["phases"] == cfg.phases
    kinds = [ln["type"] for ln in lines]
    names = online.method_names(cfg.minibatch)
    per_run = cfg.phases * cfg.phase_samples // cfg.eval_every
    assert kinds.count("phase") == cfg.phases and kinds.count("summary") == 1 and kinds[-1] == "summary"
    assert kinds.count("run") == len(names) * cfg.seeds
    assert kinds.count("checkpoint") == len(names) * cfg.seeds * per_run
    for c in (ln for ln in lines if ln["type"] == "checkpoint"):
        assert c["phase"] == (c["position"] - 1) // cfg.phase_samples
        assert c["window"] == cfg.window
        assert all(a is None or 0 <= a <= 1 for a in c["acc_groups"])
        if c["phase"] == 0:
            assert c["acc_earlier"] is None and c["forgetting"] is None
        else:
            assert c["forgetting"] >= 0 and 0 <= c["acc_earlier"] <= 1
        assert c["trace_cov"] > 0 and c["update_noise"] > 0
        if c["method"].startswith("SGD"):
            batch = cfg.minibatch if c["method"] != "SGD B=1" else 1
            lr = online.lr_of("sgdb" if batch > 1 else "sgd1", cfg)
            assert c["update_noise"] == pytest.approx(lr ** 2 * c["trace_cov"] / batch, rel=1e-9)
            assert c["step"] == c["position"] // batch
    assert set(summary["methods"]) == set(names)
    assert summary["stream_samples"] == cfg.phases * cfg.phase_samples and summary["seeds"] == cfg.seeds
    assert sorted(c for g in summary["groups"] for c in g) == list(range(10))
    runs = [ln for ln in lines if ln["type"] == "run"]
    for name, m in summary["methods"].items():
        for key in online.SUMMARY_KEYS:
            part = m[key]
            # a ratio of sums is undefined (None) for a run whose Σ|G|² estimate is ≤ 0
            defined = [r[key] for r in runs if r["method"] == name and r[key] is not None]
            assert part["n"] == len(defined) and (key in ("b_simple", "noise_to_signal") or
                                                  part["n"] == cfg.seeds), (name, key)
            if part["n"] == cfg.seeds:
                low, high = part["interval"]
                assert 0 <= low <= part["mean"] <= high, (name, key)
                assert key not in online.UNIT_KEYS or high <= 1, (name, key)
        assert 0 <= m["acc_current"]["mean"] <= 1 and m["forgetting"]["mean"] >= 0
    m = summary["methods"]
    # plain SGD learns the classes in front of it; the average moves far less per update
    assert m["SGD B=1"]["acc_current"]["mean"] > 0.5
    assert m["averaged SGD"]["mean_update_noise"]["mean"] < m["SGD B=1"]["mean_update_noise"]["mean"]
    # the iterate of averaged SGD is SGD B=1's: the same stream, the same weights
    assert m["averaged SGD"]["mean_trace_cov"]["mean"] == pytest.approx(m["SGD B=1"]["mean_trace_cov"]["mean"])
    line = online.summary_line(summary)
    assert "SGD B=1" in line and "forgetting" in line and "nan" not in line.lower()


def test_the_report_section_of_a_real_run(tiny_run, tmp_path):
    from gradnoise.report import html as h
    from gradnoise.report.files import load
    from gradnoise.report.online_section import online_section, online_verdict_text
    from test_report_build import check_page

    summary, _, path = tiny_run
    sec = online_section([("online-digits-mlp", load(path))])
    index = tmp_path / "index.html"
    index.write_text(h.page("online", "", [sec]), encoding="utf-8")
    page = check_page(index)
    assert len(page.images) == 3
    verdict = online_verdict_text(summary)
    assert verdict and verdict in " ".join(page.visible)


def test_the_same_seed_gives_the_same_numbers(tmp_path, toy64):
    task = toy64()
    cfg = replace(online.OnlineConfig.for_size("tiny"), phases=3, phase_samples=40, eval_every=20, window=8,
                  minibatch=4, seeds=1, methods=["sgd1", "avg"])
    a = online.run(task, tmp_path / "a", config=cfg, quiet=True)
    b = online.run(task, tmp_path / "b", config=cfg, quiet=True)
    for name in a["methods"]:
        for key in ("acc_all", "forgetting", "mean_trace_cov", "noise_to_signal"):
            assert a["methods"][name][key]["mean"] == b["methods"][name][key]["mean"]


def _state(m):
    """Everything of a method's run, as plain tensors."""
    out = [p.detach().clone() for p in m.model.parameters()]
    out += [v.clone() for st in m.opt.state.values() for v in st.values() if torch.is_tensor(v)]
    if m.average is not None:
        out += [p.detach().clone() for p in m.average.parameters()]
    return out, m.steps, m.averaged


@pytest.mark.parametrize("key", ["sgd1", "adam", "avg"])
def test_update_draws_leave_the_run_unchanged(key, toy64):
    task = toy64()
    cfg = online.OnlineConfig()
    order = torch.randint(0, task.size, (60,), generator=torch.Generator().manual_seed(1))
    plain, drawn = online.Method(key, task, cfg), online.Method(key, task, cfg)
    meter = WindowNoise(drawn.model, task.loss_fn, window=8)
    for i in range(60):
        idx = order[i:i + 1]
        plain.update(task, idx)
        drawn.update(task, idx)
        meter.push(task.x[idx], task.y[idx])
        if i % 7 == 6:
            grads = [p.grad for p in drawn.model.parameters()]
            online.update_draws(drawn, task, *meter.samples())
            assert all(p.grad is g for p, g in zip(drawn.model.parameters(), grads))
    (a, sa, na), (b, sb, nb) = _state(plain), _state(drawn)
    assert (sa, na) == (sb, nb) and len(a) == len(b)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_update_draws_from_an_empty_adam_state_leave_no_state_behind(toy64):
    task = toy64()
    m = online.Method("adam", task, online.OnlineConfig())
    online.update_draws(m, task, task.x[:5], task.y[:5])
    assert len(m.opt.state) == 0 and m.steps == 0
    with pytest.raises(ValueError, match="at least 2"):
        online.update_draws(m, task, task.x[:1], task.y[:1])


@pytest.mark.parametrize("key", ["sgd1", "avg"])
def test_update_draws_agree_with_the_window_estimates(key, toy64):
    """SGD's update over a window sample is −lr·g_i, the average's (θ_n − θ̄_n − lr·g_i)/(n+1):
    the draws' noise is lr²·tr(Σ) (over (n+1)² for the average), from the very same samples."""
    task = toy64()
    cfg = online.OnlineConfig()
    m = online.Method(key, task, cfg)
    for i in range(30):
        m.update(task, torch.tensor([i]))
    meter = WindowNoise(m.model, task.loss_fn, window=16)
    meter.push(task.x[30:46], task.y[30:46])
    w = meter.measure()
    noise, signal = online.update_draws(m, task, *meter.samples())
    scale = cfg.sgd_lr ** 2 / ((m.averaged + 1) ** 2 if key == "avg" else 1)
    assert noise == pytest.approx(scale * w.trace_cov, rel=1e-6)
    if key == "sgd1":
        assert signal == pytest.approx(scale * w.grad_sq_norm, rel=1e-6, abs=1e-12)


def test_the_stream_has_the_described_class_proportions(toy64):
    task = toy64(n=300, classes=3)
    classes = [0, 1, 2]
    cfg = replace(online.OnlineConfig(), phases=3, phase_samples=6000, focus=0.7)
    gen = torch.Generator().manual_seed(0)
    train, test = online.split(task.y, classes, 0.3, gen)
    assert set(train.tolist()).isdisjoint(test.tolist()) and len(train) + len(test) == task.size
    for c in classes:  # ~30 % of each class held out
        n = int((task.y == c).sum())
        assert int((task.y[test] == c).sum()) == min(max(1, round(0.3 * n)), n - 1)
    groups = online.groups_of(classes, 3)
    assert groups == [[0], [1], [2]]
    order = online.stream(task.y, train, classes, groups, cfg, torch.Generator().manual_seed(5))
    assert order.shape == (3 * 6000,) and set(order.tolist()) <= set(train.tolist())
    for p, g in enumerate(groups):
        labels = task.y[order[p * 6000:(p + 1) * 6000]]
        for c in classes:
            expected = 0.7 if c in g else 0.15
            share = float((labels == c).double().mean())
            se = math.sqrt(expected * (1 - expected) / 6000)
            assert abs(share - expected) < 4 * se, (p, c, share)


def test_groups_are_consecutive_and_balanced():
    assert online.groups_of(list(range(10)), 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert online.groups_of(list(range(10)), 5) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]


@pytest.mark.parametrize("change, match", [
    (dict(phases=1), "phases"), (dict(phases=4), "phases"), (dict(focus=0.0), "focus"),
    (dict(focus=1.5), "focus"), (dict(test_fraction=1.0), "test_fraction"), (dict(window=1), "window"),
    (dict(eval_every=12), "eval_every"), (dict(eval_every=50), "eval_every"), (dict(methods=["lbfgs"]), "unknown"),
    (dict(methods=[]), "methods"), (dict(methods=["sgd1", "sgd1"]), "methods"), (dict(sgd_lr=0.0), "sgd_lr"),
    (dict(adam_lr=math.nan), "adam_lr"), (dict(minibatch_lr=-1.0), "minibatch_lr"), (dict(seeds=0), "seeds"),
    (dict(phase_samples=60.0), "integer"),
])
def test_bad_configs_raise(tmp_path, change, match, toy64):
    cfg = replace(online.OnlineConfig(), **{**dict(phases=3, phase_samples=40, eval_every=40), **change})
    with pytest.raises(ValueError, match=match):
        online.run(toy64(), tmp_path, config=cfg, quiet=True)
    assert not (tmp_path / "online-toy64.jsonl").exists()


def test_labels_that_are_not_classes_raise(tmp_path, toy64):
    task = toy64()
    soft = Task("soft", task.model, task.x, task.y.double(), task.loss_fn)
    with pytest.raises(ValueError, match="integer class labels"):
        online.run(soft, tmp_path, size="tiny", quiet=True)
    y = task.y.clone()
    y[0] = 7  # a class with a single sample
    lonely = Task("lonely", copy.deepcopy(task.model), task.x, y, task.loss_fn)
    with pytest.raises(ValueError, match="fewer than 2 samples"):
        online.run(lonely, tmp_path, config=replace(online.OnlineConfig(), phases=2, phase_samples=40,
                                                    eval_every=40), quiet=True)
