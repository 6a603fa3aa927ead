"""The probe file (``gradnoise-probe``, version 1): written atomically and read back as
written; every malformed file is a one-line ValueError naming the file and the fault."""
import json
import math

import numpy as np
import pytest

from gradnoise.formats import (FORMATS, PROBE_FORMAT, PROBE_VERSION, read_probe, run_header, sniff,
                               write_probe)
from probe_synth import probe_object


def _fails(path, *needles):
    with pytest.raises(ValueError) as info:
        read_probe(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def test_the_format_is_in_the_table():
    assert PROBE_FORMAT == "gradnoise-probe" and PROBE_VERSION == 1
    assert FORMATS[PROBE_FORMAT] == (1,)


def test_round_trip(tmp_path):
    obj = probe_object()
    path = tmp_path / "probe-digits-mlp.json"
    assert write_probe(path, obj) == str(path)
    assert read_probe(path) == obj
    assert sniff(path) == PROBE_FORMAT
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n") and isinstance(json.loads(text), dict)  # one JSON object
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_numbers_are_encoded_as_the_format_says(tmp_path):
    obj = probe_object(seconds=np.float32(1.5), base_batch=np.int64(32))
    obj["mccandlish"].update(b_noise=math.nan, interval=[10.0, math.inf])
    obj["proxy"]["ratio"] = np.float64("nan")
    path = tmp_path / "p.json"
    write_probe(path, obj)
    back = read_probe(path)
    assert back["seconds"] == 1.5 and back["base_batch"] == 32 and isinstance(back["base_batch"], int)
    assert back["mccandlish"]["b_noise"] is None and back["mccandlish"]["interval"] == [10.0, "inf"]
    assert back["proxy"]["ratio"] is None
    assert "NaN" not in path.read_text()


def test_write_fills_in_the_header_and_replaces_an_old_file(tmp_path):
    obj = probe_object()
    for key in ("format", "version", "created"):
        del obj[key]
    path = tmp_path / "p.json"
    path.write_text("old")
    write_probe(path, obj)
    back = read_probe(path)
    assert back["format"] == PROBE_FORMAT and back["version"] == 1 and back["created"].endswith("+00:00")
    assert list(back)[:3] == ["format", "version", "created"]


def test_write_refuses_an_invalid_object_and_leaves_the_old_file(tmp_path):
    path = tmp_path / "p.json"
    write_probe(path, probe_object(task="old"))
    bad = probe_object()
    del bad["merrill"]["b_crit"]
    with pytest.raises(ValueError, match=r"p\.json: the required key 'merrill\.b_crit' is missing"):
        write_probe(path, bad)
    with pytest.raises(ValueError, match="cannot be written as JSON"):
        write_probe(path, probe_object(task=object()))
    assert read_probe(path)["task"] == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]


def test_a_pretty_printed_file_is_read(tmp_path):
    path = tmp_path / "pretty.json"
    path.write_text(json.dumps(probe_object(), indent=2))
    assert sniff(path) == PROBE_FORMAT
    assert read_probe(path)["merrill"]["b_crit"] == 128


def _without(part, key):
    obj = probe_object()
    del (obj if part is None else obj[part] if part != "branch" else obj["branches"][1])[key]
    return obj


def _with(**changes):
    obj = probe_object()
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        target = obj
        for p in parents:
            target = target[int(p)] if p.isdigit() else target[p]
        target[key] = value
    return obj


BAD = {
    "other-version": (_with(version=2), ["version 2 of gradnoise-probe is not supported", "upgrade"]),
    "no-version": (_with(version=None), ["version None of gradnoise-probe"]),
    "run-header": (run_header("per_sample", 1, 0.9, ["w"]), ["this is a gradnoise-run file, not a gradnoise-probe"]),
    "unknown-format": (_with(format="wandb"), ["unknown format 'wandb'; expected gradnoise-probe"]),
    "no-format": ({"task": "x"}, ["no format field; expected gradnoise-probe"]),
    "a-list": ([1, 2], ["not a gradnoise-probe file (the file is not a JSON object)"]),
    "missing-top": (_without(None, "budget"), ["the required key 'budget' is missing"]),
    "missing-nested": (_without("mccandlish", "b_noise"), ["the required key 'mccandlish.b_noise' is missing"]),
    "missing-proxy": (_without("proxy", "preconditioned_ratio"), ["'proxy.preconditioned_ratio' is missing"]),
    "missing-branch": (_without("branch", "curve"), ["the required key 'branches[1].curve' is missing"]),
    "sizes-not-ints": (_with(batch_sizes=["16"]), ["batch_sizes must be a non-empty list of positive integers"]),
    "bool-number": (_with(target_loss=True), ["target_loss must be a number or null, not true"]),
    "nan-number": (_with(seconds=math.nan), ["seconds must be a number or null, not NaN"]),
    "task-null": (_with(task=None), ["task must be a string, not null"]),
    "bad-interval": (_with(merrill__interval=[1, 2, 3]), ["merrill.interval must be [low, high] or null"]),
    "bad-curve": (_with(branches__0__curve=[[0, 0]]), ["branches[0].curve must be a list of [samples, steps"]),
    "bad-diverged": (_with(branches__2__diverged="no"), ["branches[2].diverged must be true or false"]),
    "bad-losses": (_with(merrill__losses=[[16, 0.3]]), ["merrill.losses must be a list of [batch_size"]),
    "branch-not-object": (_with(branches=[1]), ["branches must be a list of objects"]),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_objects_are_named(tmp_path, name):
    obj, needles = BAD[name]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(obj))  # as another writer might: NaN written as NaN
    _fails(path, *needles)


@pytest.mark.parametrize("text, needle", [
    ("", "the file is empty"),
    ("  \n", "the file is empty"),
    (json.dumps(probe_object())[:200], "corrupt, not one JSON object"),
    ('{"format": "gradnoise-probe"}\n{"format": "gradnoise-probe"}\n', "corrupt, not one JSON object"),
])
def test_corrupt_files_are_named(tmp_path, text, needle):
    path = tmp_path / "probe.json"
    path.write_text(text)
    _fails(path, needle)


def test_a_missing_file(tmp_path):
    _fails(tmp_path / "absent.json", "no such file")


def test_sniff_names_the_fault_of_a_probe_file(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(probe_object(version=7), indent=1))
    with pytest.raises(ValueError, match="version 7 of gradnoise-probe is not supported"):
        sniff(path)
    path.write_text("{\n not json")
    with pytest.raises(ValueError, match=r"p\.json, line 1: not JSON"):
        sniff(path)
