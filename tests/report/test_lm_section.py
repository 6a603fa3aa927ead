"""The ``lm`` study's report section and its verdict: figures from the study file, the
growth and LayerNorm sentences that agree with the numbers, and a batch-size answer
from the language model's own noise scale."""
import warnings

import pytest

from gradnoise.report import build_report, verdict_lines
from gradnoise.report.lm_section import layernorm_text, lm_next_text, lm_verdict_text
from gradnoise.report.verdict import _lm_batch as lm_batch
from gradnoise.studies import lm
from gradnoise.studies.task import builtin
from test_report_build import check_page

INF = float("inf")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm")
    summary = lm.run(builtin("pydoc-gpt"), out, size="tiny", quiet=True)
    return out / "lm-pydoc-gpt.jsonl", summary


def test_the_section_and_verdict_build_from_a_tiny_run(tiny_lm, tmp_path):
    path, summary = tiny_lm
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        index = build_report([path], tmp_path / "report")
    page = check_page(index)
    assert len(page.images) == 4  # growth, layers, the probes' calibration, warm-up
    visible = " ".join(page.visible)
    assert "Language model: noise scale over a run" in visible and "LayerNorm layers only" in visible
    lines = "\n".join(verdict_lines([path]))
    assert "pydoc-gpt: Batch size" in lines or "No batch-size answer" in lines
    assert "Language model: the noise scale" in lines


def _summary(first=2.5, last=28.0, interval=(24.0, 32.0), ln=(0.4, 0.6), methods=None):
    return {"growth": {"first": {"b_simple": first, "loss": 3.2, "interval": [1.5, 6.0]},
                       "last": {"b_simple": last, "loss": 1.7, "interval": list(interval),
                                "b_simple_tokens": 64 * last}},
            "layernorm": {"points": 20, "median_ratio": sum(ln) / 2, "ratio_range": list(ln), "rho": 0.6},
            "target_loss": 2.4, "base_batch": 8, "methods": methods or {}}


def test_the_verdict_says_grew_only_when_the_interval_shows_it():
    assert "grew from 2.5 to 28" in lm_verdict_text(_summary())
    assert "too small later" in lm_verdict_text(_summary())
    flat = lm_verdict_text(_summary(last=3.0, interval=(1.0, 9.0)))
    assert "grew" not in flat and "not resolved" in flat
    assert lm_verdict_text({"growth": {"points": 0}}) is None


def test_the_warmup_is_compared_with_the_fixed_small_batch():
    methods = {"fixed small": {"steps": {"mean": 480.0}, "tokens": {"mean": 3840.0 * 64}},
               "noise-driven warm-up": {"steps": {"mean": 240.0}, "tokens": {"mean": 7680.0 * 64},
                                        "reached": 2, "runs": 2}}
    text = lm_verdict_text(_summary(methods=methods))
    assert "×0.5 the steps and ×2 the tokens of the fixed batch 8" in text
    missed = {"noise-driven warm-up": {"steps": {"mean": None}, "reached": 0, "runs": 2}}
    assert "reached the target in 0 of 2 seeds" in lm_verdict_text(_summary(methods=missed))


def test_layernorm_sentences():
    assert "within ×2" in lm_next_text(_summary(ln=(0.6, 1.4)))
    assert "measure every layer" in lm_next_text(_summary(ln=(0.3, 0.6)))
    assert "median ratio ×0.5" in layernorm_text(_summary())
    assert layernorm_text({}).startswith("LayerNorm agreement: —")


@pytest.mark.parametrize("interval, want", [((24.0, 32.0), (28.0, False)), ((24.0, INF), (24.0, True)),
                                            ((0.0, 40.0), (None, False))])
def test_the_batch_answer_never_claims_more_than_the_interval(interval, want):
    assert lm_batch(_summary(interval=interval)) == want
