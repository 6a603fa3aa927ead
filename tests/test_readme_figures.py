"""The README's generated figures against ``scripts/readme_figures.py``: the README must
hold the blocks the script writes, with the same structure as the script's rendering of
a real run — the same verdict tasks, the same (study, task) rows of the table, a run
sentence that names seed, size and torch — digits aside. One tiny run of every study
stands in for the README's four-minute run (its numbers differ, its shape does not)."""
import importlib.util
from pathlib import Path

import pytest

from gradnoise.cli import main as gradnoise_main

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("readme_figures", ROOT / "scripts" / "readme_figures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


rf = _load_script()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The output folder of ``gradnoise study --size tiny`` (every study, the default tasks)."""
    out = tmp_path_factory.mktemp("readme-run")
    assert gradnoise_main(["study", "--size", "tiny", "--quiet", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def rendered(tiny_run):
    return rf.render(tiny_run, "2.99.0+test", 2, 12.3)


def _readme_blocks():
    return rf.read_blocks((ROOT / "README.md").read_text(encoding="utf-8"))


def test_readme_has_each_generated_block_once_and_filled():
    blocks = _readme_blocks()
    assert list(blocks) == list(rf.BLOCKS)
    for name, body in blocks.items():
        assert body.strip() and "(generated)" not in body, name


def test_readme_blocks_have_the_structure_of_a_fresh_rendering(rendered):
    readme, fresh = rf.structure(_readme_blocks()), rf.structure(rendered)
    assert fresh["verdict_fenced"] and fresh["verdict_tasks"] and len(fresh["table_rows"]) > 1
    assert fresh["run_names"] == [True, True, True]
    for key in fresh:
        assert readme[key] == fresh[key], (f"README.md and scripts/readme_figures.py disagree on {key}: rerun "
                                           "`python scripts/readme_figures.py` after a default run")


def test_structure_sees_a_missing_row_and_a_missing_task(rendered):
    base = rf.structure(rendered)
    table = rendered["table"].splitlines()
    assert rf.structure({**rendered, "table": "\n".join(table[:-1])})["table_rows"] != base["table_rows"]
    verdict = [x for x in rendered["verdict"].splitlines() if not x.startswith(f"  {base['verdict_tasks'][-1]}:")]
    assert rf.structure({**rendered, "verdict": "\n".join(verdict)})["verdict_tasks"] != base["verdict_tasks"]


def test_table_rows_are_one_per_study_file_and_escape_pipes(tiny_run, rendered):
    files = rf.study_files(tiny_run)
    rows = rendered["table"].splitlines()[2:]
    assert len(rows) == len(files)
    for row, (header, _, _) in zip(rows, files):
        assert row.startswith(f"| `{header['study']}` | {header['task']} | ") and row.endswith(" |")
        assert row[:-2].replace("\\|", "").count("|") == 3, row


def test_writing_the_blocks_replaces_only_them(rendered):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    written = rf.write_blocks(text, rendered)
    assert rf.read_blocks(written) == {k: v.strip("\n") for k, v in rendered.items()}
    assert rf.write_blocks(written, rendered) == written
    start, _ = rf.markers(rf.BLOCKS[0])
    assert written[:written.index(start)] == text[:text.index(start)]
    _, end = rf.markers(rf.BLOCKS[-1])
    assert written[written.index(end):] == text[text.index(end):]


def test_misplaced_markers_are_refused():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start, _ = rf.markers("table")
    with pytest.raises(ValueError, match="table"):
        rf.read_blocks(text.replace(start, ""))
    with pytest.raises(ValueError, match="table"):
        rf.read_blocks(text + "\n" + start + "\n")


def test_a_tiny_run_may_not_write_the_readme(tiny_run, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text((ROOT / "README.md").read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(SystemExit, match="size tiny"):
        rf.main(["--from", str(tiny_run), "--torch", "2.99.0", "--readme", str(readme)])
