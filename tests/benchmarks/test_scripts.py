"""The benchmark scripts that cannot be run in full here still run: ``gpu.py --dry-run``
(on the CPU) and ``launchbound.py`` / ``compiled.py`` on one model for one round. Their
figures are not checked (no timing assertions); their exactness columns are."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))


def _rows(tmp_path, module, argv):
    out = tmp_path / "out.json"
    assert module.main([*argv, "--json", str(out)]) == 0
    return json.loads(out.read_text())["results"]


def test_gpu_dry_run_measures_eager_compiled_and_bf16(tmp_path):
    pytest.importorskip("transformers")
    import gpu
    rows = _rows(tmp_path, gpu, ["--dry-run", "--models", "gpt2", "--repeats", "1", "--warmup", "0"])
    assert [(r["precision"], r["mode"]) for r in rows] == [("fp32", "eager"), ("fp32", "compiled"),
                                                            ("bf16", "eager"), ("bf16", "compiled")]
    for r in rows:
        assert "failed" not in r, r
        assert r["error"] < (1e-5 if r["precision"] == "fp32" else 1e-2), r
        assert r["peak_ratio"] is None  # no CUDA memory on the CPU


def test_gpu_without_cuda_and_without_dry_run_is_a_usage_error(capsys):
    import gpu
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(SystemExit):
        gpu.main(["--models", "gpt2"])
    assert "--dry-run" in capsys.readouterr().err


def test_launchbound_and_compiled_run(tmp_path):
    import compiled
    import launchbound
    rows = _rows(tmp_path, launchbound, ["--models", "token-mlp", "--repeats", "1", "--warmup", "0"])
    assert rows[0]["kernels"]["capture"] > rows[0]["kernels"]["plain"] > 0
    phases = rows[0]["phases_ms"]
    assert phases["plain"]["open"] < phases["capture"]["open"] and phases["plain"]["forward"] > 0
    rows = _rows(tmp_path, compiled, ["--models", "token-mlp", "--repeats", "1", "--warmup", "0"])
    graphs, breaks = rows[0]["graphs_before"]
    assert graphs >= 1 and rows[0]["graphs_after"][0] == graphs  # measured steps compile nothing new


def test_monitor_overhead_runs_the_adam_case(tmp_path):
    """The AdamW case gives the monitor its optimizer and loss: its measured steps carry the
    update direction's noise (the path whose cost the case times)."""
    import monitor_overhead
    rows = _rows(tmp_path, monitor_overhead, ["--models", "M1", "--cases", "adam10", "--repeats", "2",
                                              "--warmup", "0"])
    assert rows[0]["case"].startswith("per_sample every=10, AdamW") and rows[0]["records"] >= 1
