"""``gradnoise probe --task``: the command end to end on digits-mlp with a tiny budget, a
checkpoint written by ``save_checkpoint`` read back exactly, and every bad input one
error line with exit 2 before any training step or branch runs."""
import math

import pytest
import torch

import gradnoise
import gradnoise.control.probe as control_probe
from gradnoise.cli import main
from gradnoise.control.branch import held_out_loss
from gradnoise.formats import read_probe
from gradnoise.studies import probe_task
from gradnoise.studies.task import load

TINY = ["--batch-sizes", "8,16,32", "--base-batch", "16", "--seeds", "2", "--budget", "64"]


def _run(tmp_path, *extra):
    return main(["probe", "--task", "digits-mlp", *TINY, "--out", str(tmp_path / "out"), *extra])


def test_the_command_writes_a_probe_file_a_page_and_a_summary(tmp_path, capsys):
    assert _run(tmp_path, "--train-steps", "5") == 0
    text = capsys.readouterr().out
    doc = read_probe(tmp_path / "out" / "probe-digits-mlp.json")
    assert doc["task"] == "digits-mlp" and doc["checkpoint"]["step"] == 5
    assert doc["batch_sizes"] == [8, 16, 32] and doc["seeds"] == 2 and doc["budget"] == 64
    assert doc["optimizer"]["class"] == "SGD" and doc["lr"] == pytest.approx(0.1) and doc["lr_rule"] == "linear"
    assert len(doc["branches"]) == 3 * 2
    page = (tmp_path / "out" / "index.html").read_text()
    assert "branch" in page.lower()
    for needle in ("branch B_crit (McCandlish's B_noise)", "Merrill's B_crit", "B_simple, raw",
                   "B_simple, preconditioned", "branch B_crit / raw B_simple", "wall time", "report: "):
        assert needle in text, (needle, text)


def test_the_probe_does_not_run_at_initialisation(tmp_path, monkeypatch):
    """Without a checkpoint, TRAIN_STEPS steps at the base batch run first."""
    seen = []
    real = probe_task.train
    monkeypatch.setattr(probe_task, "train", lambda *a: seen.append(a[4:6]) or real(*a))
    assert _run(tmp_path, "--quiet") == 0
    assert seen == [(16, probe_task.TRAIN_STEPS)]


def _trained(optimizer: str = "adamw", steps: int = 3):
    task = load("digits-mlp", 0)
    model = task.fresh_model()
    opt = probe_task.make_optimizer(optimizer, model, None)
    tr, _ = probe_task.split(task.size, 0)
    probe_task.train(model, opt, (task.x[tr], task.y[tr]), task.loss_fn, 16, steps, 1)
    return task, model, opt


def test_a_checkpoint_round_trips(tmp_path, capsys):
    task, model, opt = _trained("adamw")
    path = gradnoise.save_checkpoint(tmp_path / "ck.pt", model, opt, 7)
    cfg = probe_task.Config("digits-mlp", checkpoint=path, optimizer="adamw", base_batch=16,
                            batch_sizes=(8, 16, 32), seeds=2, budget=64)
    p = probe_task.prepare(cfg)
    assert p.step == 7 and p.train_steps == 0
    for k, v in model.state_dict().items():
        assert torch.equal(p.model.state_dict()[k], v), k
    saved, loaded = opt.state_dict()["state"], p.optimizer.state_dict()["state"]
    assert saved.keys() == loaded.keys()
    for i in saved:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(saved[i][key], loaded[i][key]), (i, key)

    assert main(["probe", "--task", "digits-mlp", *TINY, "--checkpoint", path, "--optimizer", "adamw",
                 "--out", str(tmp_path / "out"), "--quiet"]) == 0
    doc = read_probe(tmp_path / "out" / "probe-digits-mlp.json")
    _, te = probe_task.split(task.size, 0)
    assert doc["checkpoint"]["step"] == 7 and doc["lr_rule"] == "sqrt"
    assert doc["checkpoint"]["loss"] == pytest.approx(held_out_loss(model, (task.x[te], task.y[te]), task.loss_fn))
    assert doc["proxy"]["preconditioned"] is not None or doc["proxy"].get("preconditioned_reason")
    # --lr overrides the checkpoint's learning rate; more steps continue from its step
    assert main(["probe", "--task", "digits-mlp", *TINY, "--checkpoint", path, "--optimizer", "adamw",
                 "--lr", "0.002", "--train-steps", "2", "--out", str(tmp_path / "out2"), "--quiet"]) == 0
    doc = read_probe(tmp_path / "out2" / "probe-digits-mlp.json")
    assert doc["checkpoint"]["step"] == 9 and doc["lr"] == pytest.approx(0.002)


def _state(**change):
    """The digits-mlp model's state dict with ``change`` (``None`` removes a key)."""
    state = dict(load("digits-mlp", 0).model.state_dict())
    for k, v in change.items():
        k = k.replace("__", ".")
        if v is None:
            del state[k]
        else:
            state[k] = v
    return state


def _checkpoint(tmp_path, model_state=None, optimizer="sgd", optimizer_state=None, step=3, raw=None):
    path = tmp_path / "ck.pt"
    if raw is not None:
        torch.save(raw, path) if not isinstance(raw, str) else path.write_text(raw)
        return str(path)
    _, model, opt = _trained(optimizer, 1)
    torch.save({"model": model_state if model_state is not None else model.state_dict(),
                "optimizer": optimizer_state if optimizer_state is not None else opt.state_dict(), "step": step}, path)
    return str(path)


def _adamw_state_with_a_wrong_shape():
    _, _, opt = _trained("adamw", 1)
    state = opt.state_dict()
    state["state"][2]["exp_avg"] = torch.zeros(3, 3)
    return state


def _part_of_the_parameters():
    model = load("digits-mlp", 0).fresh_model()
    return torch.optim.SGD(list(model.parameters())[:2], lr=0.1).state_dict()


BAD = {
    "missing key": (lambda t: ["--checkpoint", _checkpoint(t, _state(fc2__bias=None))], "'fc2.bias' is missing"),
    "unexpected key": (lambda t: ["--checkpoint", _checkpoint(t, _state(extra__weight=torch.zeros(2)))],
                       "'extra.weight'"),
    "shape": (lambda t: ["--checkpoint", _checkpoint(t, _state(head__weight=torch.zeros(5, 64)))],
              "'head.weight' has shape [5, 64]"),
    "other optimizer": (lambda t: ["--checkpoint", _checkpoint(t, optimizer="adamw")], "--optimizer adamw?"),
    "optimizer shape": (lambda t: ["--checkpoint", _checkpoint(t, optimizer_state=_adamw_state_with_a_wrong_shape()),
                                   "--optimizer", "adamw"], "'exp_avg' of 'fc2.weight'"),
    "optimizer groups": (lambda t: ["--checkpoint", _checkpoint(t, optimizer_state=_part_of_the_parameters())],
                         "parameter groups of [2] tensors"),
    "no file": (lambda t: ["--checkpoint", str(t / "nope.pt")], "no such file"),
    "not a checkpoint": (lambda t: ["--checkpoint", _checkpoint(t, raw=[1, 2])], "not a dict with 'model'"),
    "not torch": (lambda t: ["--checkpoint", _checkpoint(t, raw="hello")], "cannot be read by torch.load"),
    "bad step": (lambda t: ["--checkpoint", _checkpoint(t, step=-1)], "'step' must be"),
    "batch the data cannot fill": (lambda t: ["--batch-sizes", "16,32,5000"], "cannot fill"),
    "budget too small": (lambda t: ["--budget", "100"], "smaller than the largest batch 512"),
    "unknown task": (lambda t: ["--task", "nope"], "unknown task"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_before_any_training(tmp_path, capsys, monkeypatch, case):
    make, needle = BAD[case]
    extra = make(tmp_path)

    def forbidden(*a, **k):
        raise AssertionError("trained before the input was checked")
    monkeypatch.setattr(probe_task, "train", forbidden)
    monkeypatch.setattr(control_probe, "run_branch", forbidden)
    out = tmp_path / "out"
    argv = ["probe", "--task", "digits-mlp", "--out", str(out)] + extra
    if "--checkpoint" in extra:
        argv += ["--batch-sizes", "8,16,32", "--budget", "64", "--base-batch", "16"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gradnoise: error: ") and needle in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("argv, needle", [
    (["--batch-sizes", "16,x"], "--batch-sizes"),
    (["--batch-sizes", "1,16"], "--batch-sizes"),
    (["--seeds", "1"], "--seeds"),
    (["--budget", "0"], "--budget"),
    (["--base-batch", "2.5"], "--base-batch"),
    (["--optimizer", "adam"], "--optimizer"),
    (["--lr", "0"], "--lr"),
    (["--lr-grid", "1,-1"], "--lr-grid"),
    (["--train-steps", "-1"], "--train-steps"),
])
def test_bad_option_syntax_fails_when_parsed(tmp_path, capsys, argv, needle):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        main(["probe", "--task", "digits-mlp", "--out", str(out)] + argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage:") and "error: argument" in err[-1] and needle in err[-1], err
    assert not out.exists()


def test_the_task_is_required(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["probe"])
    assert stop.value.code == 2 and "--task" in capsys.readouterr().err


def test_save_checkpoint_refuses_a_bad_step(tmp_path):
    _, model, opt = _trained("sgd", 1)
    with pytest.raises(ValueError, match="step"):
        gradnoise.save_checkpoint(tmp_path / "ck.pt", model, opt, -2)


def test_the_split_is_seeded_and_disjoint():
    tr, te = probe_task.split(60, 3)
    assert len(te) == 10 and set(tr.tolist()).isdisjoint(te.tolist()) and len(tr) + len(te) == 60
    assert torch.equal(probe_task.split(60, 3)[1], te) and not torch.equal(probe_task.split(60, 4)[1], te)
    assert math.isclose(len(probe_task.split(1797, 0)[1]), 1797 // 6)
