"""Another tool's JSON Lines file given to the report: the error says what writes the
files gradnoise reads (issue 19)."""
import pytest

from gradnoise.report.files import load


@pytest.mark.parametrize("first", [
    '{"step": 1, "loss": 2.3}',                                   # a metrics logger's lines
    '{"type": "header", "format": "wandb-history", "version": 1}',  # a header of another format
    '[1, 2, 3]',
])
def test_another_tools_jsonl_names_what_writes_a_gradnoise_run_file(tmp_path, first):
    path = tmp_path / "metrics.jsonl"
    path.write_text(first + "\n" + '{"step": 2, "loss": 2.1}\n')
    with pytest.raises(ValueError) as e:
        load(path)
    text = str(e.value)
    assert "metrics.jsonl" in text and "\n" not in text
    assert "NoiseMonitor" in text and "JSONL sink" in text and "gradnoise study" in text


@pytest.mark.parametrize("text, needle", [
    ('{"type": "header", "format": "gradnoise-run", "version": 99}\n', "upgrade"),
    ("", "empty"),
])
def test_a_gradnoise_file_with_another_fault_keeps_its_own_message(tmp_path, text, needle):
    path = tmp_path / "run.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=needle) as e:
        load(path)
    assert "NoiseMonitor" not in str(e.value)
