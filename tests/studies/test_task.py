"""Loading tasks: built-in names, a module, a file path, and every way a user's task
can be wrong (each a one-line ValueError)."""
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gradnoise.studies.task import load

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "my_task.py"


def test_builtin_tasks():
    t = load("digits-mlp")
    assert t.size == 1797 and t.x.shape == (1797, 1, 8, 8)
    assert t.fresh_model() is not t.model
    assert load("digits-cnn").name == "digits-cnn"


def test_the_example_task_loads_from_its_file():
    t = load(f"{EXAMPLE}:task")
    assert t.name == "my_task" and t.size == 569 and t.y.dtype == torch.int64
    loss = t.loss_fn(t.model(t.x[:8]), t.y[:8])
    assert loss.dim() == 0


def _module(tmp_path, monkeypatch, body: str, name: str = "usertask_mod"):
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)
    return name


def test_a_module_on_the_path_with_a_dataset_of_pairs(tmp_path, monkeypatch):
    mod = _module(tmp_path, monkeypatch, """
        import torch
        from torch.utils.data import TensorDataset
        def regression():
            x = torch.randn(20, 3)
            return torch.nn.Linear(3, 1), TensorDataset(x, x.sum(1, keepdim=True)), torch.nn.functional.mse_loss
    """)
    t = load(f"{mod}:regression")
    assert t.name == "regression" and t.x.shape == (20, 3) and t.y.shape == (20, 1)


@pytest.mark.parametrize("spec, body, message", [
    ("nonsense", None, "unknown task"),
    ("no_such_module_xyz:task", None, "cannot import"),
    ("{mod}:missing", "def task(): pass", "has no function"),
    ("{mod}:task", "def task(): raise RuntimeError('boom')", "failed: RuntimeError: boom"),
    ("{mod}:task", "def task(): return 1", "must return"),
    ("{mod}:task", "def task(): return 'm', 'd', 'l'", "nn.Module"),
    ("{mod}:task", "import torch\ndef task(): return torch.nn.Linear(2, 1), [1, 2, 3], len", "dataset"),
    ("{mod}:task", "import torch\ndef task(): return torch.nn.Linear(2, 1), (torch.ones(5, 2), torch.ones(4)), len",
     "differ in length"),
    ("{mod}:task", "import syntax error here", "cannot import"),
])
def test_bad_tasks_are_one_line_errors(tmp_path, monkeypatch, spec, body, message):
    if body is not None:
        spec = spec.format(mod=_module(tmp_path, monkeypatch, body))
    with pytest.raises(ValueError, match=message) as e:
        load(spec)
    assert "\n" not in str(e.value)


def test_the_report_reads_only_study_files(tmp_path):
    from gradnoise.studies.runner import study_files

    for name in ("law-a.jsonl", "trajectory-a.jsonl", "trajectory-a.run.jsonl", "notes.jsonl", "mine-run.jsonl",
                 "lr-batch-a.jsonl", "lawyer.jsonl"):
        (tmp_path / name).write_text("")
    assert [p.name for p in study_files(tmp_path)] == ["law-a.jsonl", "lr-batch-a.jsonl", "trajectory-a.jsonl"]
