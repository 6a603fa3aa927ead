"""Public names never shadow subpackages, and imports point one way (DESIGN.md §3): the
report reads files (stats, formats, numbers; never studies, control, capture, monitor or
torch), the studies never import the report, and the report path loads no torch."""
import ast
import importlib
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import gradnoise


def test_capture_is_the_subpackage_and_opens_a_capture():
    assert isinstance(gradnoise.capture, types.ModuleType)
    linear = importlib.import_module("gradnoise.capture.linear")
    assert gradnoise.capture.linear is linear
    model = nn.Linear(3, 2)
    with gradnoise.capture(model, reduction="sum") as cap:
        model(torch.randn(4, 3)).sum().backward()
    assert isinstance(cap, gradnoise.Capture) and cap.batch_size == 4


def test_control_recommend_is_a_module():
    rec = importlib.import_module("gradnoise.control.recommend")
    assert gradnoise.control.recommend is rec
    assert gradnoise.control.advise is rec.advise


# ------------------------------------------------- imports point one way (DESIGN.md §3)
SRC = Path(gradnoise.__file__).resolve().parent
# the report reads files, not objects; from the (light, see below) package root only its version
REPORT_MAY_IMPORT = {"report", "stats", "formats", "numbers", "errors", "__version__"}
STUDIES_MAY_NOT_IMPORT = {"report"}


def _imported(path: Path, root: Path = SRC):
    """The ``gradnoise`` modules a file under ``root`` imports (top level or inside
    functions), as dotted names relative to the package (``report.fmt``, ``stats.rules``,
    ``""`` for the package root), and ``"torch"`` for torch."""
    package = path.relative_to(root.parent).parts[:-1]  # ("gradnoise", "report")
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                parts = list(base) + (node.module.split(".") if node.module else [])
                names = [".".join(parts)] if node.module else [".".join(parts + [a.name]) for a in node.names]
            else:
                names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name == "gradnoise" or name.startswith("gradnoise."):
                yield name[len("gradnoise."):] if name != "gradnoise" else ""
            elif name.split(".")[0] == "torch":
                yield "torch"


def _files(sub: str):
    return sorted((SRC / sub).rglob("*.py"))


def test_report_imports_only_stats_formats_and_itself():
    bad = {(str(f.relative_to(SRC)), m) for f in _files("report") for m in _imported(f)
           if m.split(".")[0] not in REPORT_MAY_IMPORT}
    assert not bad, f"report must not import studies, control, capture, monitor, torch or the package root: {bad}"


def test_studies_never_import_the_report():
    bad = {(str(f.relative_to(SRC)), m) for f in _files("studies") for m in _imported(f)
           if m.split(".")[0] in STUDIES_MAY_NOT_IMPORT}
    assert not bad, f"studies must not import the report: {bad}"


def test_the_import_checker_sees_relative_and_lazy_imports(tmp_path):
    path = tmp_path / "gradnoise" / "report" / "x.py"
    path.parent.mkdir(parents=True)
    path.write_text("from ..studies import registry\nfrom .fmt import slug\nfrom .. import numbers\n"
                    "def f():\n    from ..control import advise\n    import torch.nn\n")
    assert set(_imported(path, tmp_path / "gradnoise")) == {"studies", "report.fmt", "numbers", "control", "torch"}


def _fresh(code: str) -> str:
    """Run ``code`` in a fresh interpreter; its stdout."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_import_gradnoise_report_loads_no_torch():
    assert _fresh("import sys, gradnoise.report; print('torch' in sys.modules)") == "False"
    assert _fresh("import sys, gradnoise; print('torch' in sys.modules)") == "False"


def test_gradnoise_report_command_loads_no_torch(tmp_path):
    from gradnoise.formats import run_header

    run = tmp_path / "run.jsonl"
    steps = [{"type": "step", "step": i, "source": "per_sample", "skipped": False, "flag": None, "batch_size": 32,
              "raw": {"trace_cov": 40.0, "grad_sq_norm": 2.0, "b_simple": 20.0, "flag": None},
              "smoothed": {"trace_cov": 40.0, "grad_sq_norm": 2.0, "b_simple": 20.0},
              "b_simple_interval": [15.0, 26.0], "loss": 2.0 - 0.01 * i} for i in range(20)]
    run.write_text("\n".join(json.dumps(x) for x in [run_header("per_sample", 1, 0.9, ["w"])] + steps) + "\n")
    code = (f"import sys; from gradnoise.cli import main; rc = main(['report', {str(run)!r}, '--out', "
            f"{str(tmp_path / 'rep')!r}, '--quiet']); print(rc, 'torch' in sys.modules)")
    assert _fresh(code).splitlines()[-1] == "0 False"
    assert (tmp_path / "rep" / "index.html").is_file()


def test_lazy_names_of_the_package_still_work():
    assert gradnoise.NoiseMonitor is importlib.import_module("gradnoise.monitor").NoiseMonitor
    assert gradnoise.read_run is importlib.import_module("gradnoise.formats").read_run
    assert gradnoise.NoiseStats is gradnoise.stats.NoiseStats
    assert gradnoise.stats.decompose_clients is importlib.import_module("gradnoise.stats.clients").decompose
    assert isinstance(gradnoise.optim, types.ModuleType)
    for name in gradnoise.__all__:
        assert getattr(gradnoise, name) is not None
    with pytest.raises(AttributeError):
        gradnoise.no_such_name


def test_the_report_table_and_the_command_line_know_every_study():
    from gradnoise.report.section_table import SECTIONS
    from gradnoise.studies import models, names, registry

    assert tuple(SECTIONS) == registry.NAMES == names.STUDY_NAMES
    assert models.MODELS == names.MODEL_NAMES


OPTIONAL = ("lightning", "pytorch_lightning", "flwr", "selenium", "transformers", "timm", "tensorboard")


def test_the_main_job_needs_no_optional_package():
    """Issue 19, finding 7: the README's first command installs only the base dependencies,
    so ``gradnoise study`` must import none of the extras, and pyproject must not list them."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    code = ("import sys, json; from gradnoise import cli; from gradnoise.studies import runner, registry; "
            "[registry.get(n) for n in registry.NAMES]; "
            f"print(json.dumps(sorted(m for m in {OPTIONAL!r} if m in sys.modules)))")
    assert json.loads(_fresh(code).strip().splitlines()[-1]) == []
    base = tomllib.loads((SRC.parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [d for d in base if d.split(">")[0].split("=")[0].strip() in OPTIONAL]
