"""The federated study: its client splits, its decomposition against the float64 oracle,
its file and summary, the options it refuses, and its report section and verdict."""
import math
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import reference as R
from gradnoise.formats import read_study
from gradnoise.report import html as h
from gradnoise.report.build import build_report
from gradnoise.report.federated_section import federated_section, federated_verdict_text
from gradnoise.report.files import load
from gradnoise.studies import federated
from gradnoise.studies.output import StudyWriter
from gradnoise.studies.task import builtin

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "report"))
from test_report_build import check_page  # noqa: E402

INF = math.inf


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("federated")
    summary = federated.run(builtin("digits-mlp"), out, size="tiny", quiet=True)
    return out / "federated-digits-mlp.jsonl", summary, read_study(out / "federated-digits-mlp.jsonl")


def test_tiny_run_writes_valid_lines_and_a_sane_summary(tiny_run):
    _, summary, (header, lines) = tiny_run
    cfg = federated.FederatedConfig.for_size("tiny")
    assert header["study"] == "federated" and header["config"]["clients"] == cfg.clients
    kinds = [ln["type"] for ln in lines]
    runs_n = len(cfg.alphas) * cfg.seeds
    assert kinds.count("split") == kinds.count("run") == runs_n and kinds[-1] == "summary"
    assert kinds.count("round") == runs_n * cfg.rounds and kinds.count("summary") == 1
    m = federated.per_round(cfg)
    for s in (ln for ln in lines if ln["type"] == "split"):
        assert len(s["sizes"]) == cfg.clients and min(s["sizes"]) >= cfg.min_client_size
        assert [sum(c) for c in s["class_counts"]] == s["sizes"]
        assert sum(s["sizes"]) == 1797 - summary["test_size"]
        if s["alpha"] == "inf":
            assert max(s["sizes"]) - min(s["sizes"]) <= 1
    rounds = [ln for ln in lines if ln["type"] == "round"]
    for r in rounds:
        assert r["flag"] is None and r["within"] > 0 and r["grad_sq_norm"] > 0 and math.isfinite(r["dissimilarity_sq"])
        assert r["trace_cov"] == pytest.approx(r["within"] + r["between"], rel=1e-12)
        assert len(r["clients"]) == m and len(set(r["clients"])) == m
        assert r["drift"] >= 0 and r["update_sq_norm"] > 0 and 0 <= r["test_accuracy"] <= 1
    for run in (ln for ln in lines if ln["type"] == "run"):   # ratios of sums over rounds
        mine = [r for r in rounds if r["alpha"] == run["alpha"] and r["seed"] == run["seed"]]
        assert run["between_share"] == pytest.approx(sum(r["between"] for r in mine) /
                                                     sum(r["trace_cov"] for r in mine), rel=1e-9)
        assert run["final_loss"] == mine[-1]["test_loss"]
    assert [p["alpha"] for p in summary["alphas"]] == cfg.alphas
    for p in summary["alphas"]:
        for key in federated.SUMMARY_KEYS:
            part = p[key]
            assert part["n"] == cfg.seeds, (p["alpha"], key)
            low, high = part["interval"]
            assert low <= part["mean"] <= high, (p["alpha"], key)
        assert p["heterogeneity_dominates"] in (True, False, None) and p["round_dominates"] in (True, False, None)
    iid = summary["alphas"][0]
    assert iid["loss_vs_iid"]["mean"] == pytest.approx(1.0) and iid["drift_vs_iid"]["mean"] == pytest.approx(1.0)
    line = federated.summary_line(summary)
    assert "α=∞" in line and "α=0.1" in line and "nan" not in line.lower() and "None" not in line


def test_label_skew_raises_the_between_share_and_the_drift(tiny_run):
    """At every seed the α = 0.1 split has the larger between share (IID's is ≈ 1/N_k ≈ 0.4 %
    of the noise, α = 0.1's was 15–23 % here) and the larger client drift."""
    _, summary, (_, lines) = tiny_run
    runs = {(r["alpha"], r["seed"]): r for r in lines if r["type"] == "run"}
    for seed in (0, 1):
        iid, skew = runs[("inf", seed)], runs[(0.1, seed)]
        assert iid["between_share"] < 0.05 < skew["between_share"]
        assert skew["between_share"] > iid["between_share"] + 0.05
        assert skew["drift"] > 1.5 * iid["drift"]
    assert summary["alphas"][1]["dissimilarity_sq"]["mean"] > summary["alphas"][0]["dissimilarity_sq"]["mean"]


def test_the_decomposition_matches_the_float64_oracle(tmp_path, toy64):
    """A census (every client measures all its samples) at the initial weights: the study's
    within, between, tr Σ, |∇f|² and B² are the exact population values."""
    task = toy64()
    cfg = replace(federated.FederatedConfig.for_size("tiny"), alphas=[1.0], seeds=1, rounds=1, measure_batch=10_000)
    federated.run(task, tmp_path, config=cfg, quiet=True)
    _, lines = read_study(tmp_path / "federated-toy64.jsonl")
    row = next(ln for ln in lines if ln["type"] == "round")
    _, clients = federated.partition(task, cfg, 1.0, seed=0, run_seed=0)
    assert next(ln for ln in lines if ln["type"] == "split")["sizes"] == [len(c) for c in clients]
    grads = []
    for idx in clients:
        g = R.per_sample_grads(task.fresh_model(), task.loss_fn, task.x[idx], task.y[idx])
        grads.append(torch.cat([v.flatten(1) for v in g.values()], dim=1))
    ref = R.client_population_stats(grads)
    assert ref["between"] > 0.05 * ref["total"]   # a real between-client part to check
    for key, ref_key in (("within", "within"), ("between", "between"), ("trace_cov", "total"),
                         ("grad_sq_norm", "grad_sq_norm"), ("dissimilarity_sq", "dissimilarity_sq")):
        assert row[key] == pytest.approx(ref[ref_key], rel=1e-8), key


def test_splits():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 50)
    iid = federated.dirichlet_split(labels, 10, INF, rng, 2)
    skew = federated.dirichlet_split(labels, 10, 0.1, rng, 2)
    for parts in (iid, skew):
        assert sorted(np.concatenate(parts).tolist()) == list(range(500))   # every sample once
    assert {len(p) for p in iid} == {50}

    def classes(parts):
        return np.mean([len(np.unique(labels[p])) for p in parts])
    assert classes(skew) < 5 < classes(iid)
    with pytest.raises(ValueError, match="no Dirichlet"):
        federated.dirichlet_split(labels, 10, 0.01, rng, 45)


@pytest.mark.parametrize("over, match", [
    (dict(alphas=[]), "alphas"), (dict(alphas=[1.0, 0.0]), "alphas"), (dict(alphas=[0.1, 0.1]), "alphas"),
    (dict(clients=1), "≥ 2"), (dict(rounds=0), "rounds"), (dict(local_steps=2.5), "local_steps"),
    (dict(local_lr=-1.0), "local_lr"), (dict(client_fraction=0.0), "client_fraction"), (dict(test_fraction=1.0), "test_fraction"),
    (dict(clients=100, min_client_size=20), "cannot give"),
])
def test_bad_options(tmp_path, over, match, toy64):
    cfg = replace(federated.FederatedConfig.for_size("tiny"), **over)
    with pytest.raises(ValueError, match=match):
        federated.run(toy64(), tmp_path, config=cfg, quiet=True)


def test_labels_that_are_not_classes(tmp_path, toy64):
    task = toy64()
    task.y = task.y.double()
    with pytest.raises(ValueError, match="integer class labels"):
        federated.run(task, tmp_path, size="tiny", quiet=True)


# ----------------------------------------------------------------------- the section
def _page(tmp_path, paths):
    items = [(f"s{i}", load(p)) for i, p in enumerate(paths)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sec = federated_section(items)
    index = tmp_path / "index.html"
    index.write_text(h.page("federated", "", [sec]), encoding="utf-8")
    return sec, check_page(index)


def test_section_of_the_tiny_run(tiny_run, tmp_path):
    path, summary, _ = tiny_run
    sec, page = _page(tmp_path, [path])
    assert sec.anchor == "federated" and len(sec.plots) == 1 and len(page.images) == 1
    visible = " ".join(page.visible)
    for word in ("client heterogeneity against sampling noise", "between share per sample", "Dir(α)",
                 "drift × IID", "FedProx"):
        assert word in visible, word
    # the whole page builds with the section passed in (the report's own table wires it too)
    check_page(build_report([path], tmp_path / "rep", sections={"federated": federated_section}))


def test_section_of_a_file_without_rounds_or_summary(tmp_path):
    with StudyWriter(tmp_path, "federated", "toy", 0, "tiny", {"clients": 5}):
        pass
    sec, page = _page(tmp_path, [tmp_path / "federated-toy.jsonl"])
    assert len(page.images) == 1 and "no rounds yet" in " ".join(page.visible)


def _iv(mean, half):
    return {"mean": mean, "interval": [mean - half, mean + half], "n": 3}


def _alpha(alpha, share, round_share, half=0.02):
    return {"alpha": alpha, "between_share": _iv(share, half), "round_between_share": _iv(round_share, half),
            "heterogeneity_dominates": federated.dominates(_iv(share, half)),
            "round_dominates": federated.dominates(_iv(round_share, half)),
            "drift_vs_iid": _iv(3.0 if alpha != INF else 1.0, 0.5),
            "loss_vs_iid": _iv(2.0 if alpha != INF else 1.0, 0.2)}


def _summary(parts):
    s = {"alphas": parts, "seeds": 3, "local_batch": 16, "clients_per_round": 5, "clients": 10}
    s["dominates_from"] = federated._from(parts, "heterogeneity_dominates")
    s["round_dominates_from"] = federated._from(parts, "round_dominates")
    return s


def test_verdict_text_follows_the_numbers():
    assert federated_verdict_text({}) is None
    text = federated_verdict_text(_summary([_alpha(INF, 0.01, 0.06), _alpha(1.0, 0.04, 0.3),
                                            _alpha(0.3, 0.13, 0.7), _alpha(0.1, 0.27, 0.77)]))
    assert "dominates the gradient noise at α ≤ 0.3" in text and "77 %" in text and "27 % per sample" in text
    assert "will not reduce it" in text and "×3" in text
    text = federated_verdict_text(_summary([_alpha(INF, 0.01, 0.06), _alpha(0.1, 0.6, 0.9)]))
    assert "at α ≤ 0.1" in text and "60 % of the per-sample noise" in text
    text = federated_verdict_text(_summary([_alpha(INF, 0.01, 0.06), _alpha(0.1, 0.05, 0.3)]))
    assert text.startswith("Sampling, not client heterogeneity") and "30 %" in text and "dominates the" in text
    text = federated_verdict_text(_summary([_alpha(INF, 0.01, 0.06), _alpha(0.1, 0.2, 0.5, half=0.3)]))
    assert "not determined from 3 seeds at α = 0.1" in text
