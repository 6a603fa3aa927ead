"""The adaptive study: each method's run to the target, its accounting and its section."""
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from gradnoise.studies import adaptive
from gradnoise.studies.task import builtin

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "report"))


def test_every_method_to_the_target_and_its_section(tmp_path):
    from gradnoise.report import build_report, verdict_lines
    from test_report_build import check_page

    cfg = adaptive.AdaptiveConfig.for_size("tiny")
    summary = adaptive.run(builtin("digits-mlp"), tmp_path, size="tiny", quiet=True)
    runs = [json.loads(ln) for ln in (tmp_path / "adaptive-digits-mlp.jsonl").read_text().splitlines()]
    runs = [r for r in runs if r["type"] == "run"]
    assert len(runs) == len(adaptive.METHODS) * cfg.seeds
    for r in runs:
        assert r["reached"] == (r["final_loss"] is not None and r["final_loss"] <= cfg.target_loss)
        fixed = {"fixed small": cfg.base_batch}.get(r["method"], cfg.large_batch)
        if r["method"] != "adaptive batch":
            assert r["examples"] == r["steps"] * fixed  # a fixed batch: examples = steps × B
        else:
            assert r["final_batch"] >= cfg.base_batch and r["examples"] >= r["steps"] * cfg.base_batch
    m = summary["methods"]
    assert m["fixed small"]["steps_vs_small"] == pytest.approx(1.0)
    assert all(s["steps"]["interval"][0] >= 0 for s in m.values() if s["reached"] > 1)
    page = check_page(build_report([tmp_path / "adaptive-digits-mlp.jsonl"], tmp_path / "rep"))
    visible = " ".join(page.visible)
    assert "Adaptive: acting on the noise" in visible and "steps vs fixed small" in visible
    assert "To the loss" in visible  # its finding, in its own section
    assert verdict_lines([tmp_path / "adaptive-digits-mlp.jsonl"]) == []


def test_adascale_takes_fewer_steps_than_the_same_large_batch_without_it(tmp_path):
    """The gain r ≥ 1 raises SGD's rate at the large batch, so it needs fewer steps."""
    cfg = replace(adaptive.AdaptiveConfig.for_size("tiny"), methods=["fixed large", "AdaScale"], seeds=1)
    summary = adaptive.run(builtin("digits-mlp"), tmp_path, config=cfg, quiet=True)
    steps = {k: v["steps"]["mean"] for k, v in summary["methods"].items()}
    assert steps["AdaScale"] < steps["fixed large"]


def test_bad_options(tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        adaptive.run(builtin("digits-mlp"), tmp_path, config=replace(adaptive.AdaptiveConfig(), methods=["LARS"]))
    with pytest.raises(ValueError, match="already at or below the target"):
        adaptive.run(builtin("digits-mlp"), tmp_path, config=replace(adaptive.AdaptiveConfig(), target_loss=50.0))
