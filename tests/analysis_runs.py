"""Shared inputs of the analysis tests: two short digits runs and ways to damage a copy of one."""

import json
import os
import shutil

import pytest
import torch

import training
from utils.runs import load_run, load_weights, rebuild

SMALL = ["--width", "16", "--num-data", "120", "--steps", "30", "--lambdamax", "--batch-sharpness",
         "--measure-every", "10", "--checkpoint-every", "10", "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two short runs under $RESULTS/digits_mlp: a (lr 0.05, batch 8) and b (lr 0.1, batch 16, --final)."""
    root = tmp_path_factory.mktemp("analysis")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RESULTS", str(root / "results"))
        patch.setenv("DATASETS", str(root / "datasets"))
        folders = {"a": root / "results" / "digits_mlp" / "a", "b": root / "results" / "digits_mlp" / "b"}
        assert training.main([*SMALL, "--batch", "8", "--run-dir", str(folders["a"])]) == 0
        assert training.main([*SMALL, "--batch", "16", "--lr", "0.1", "--final", "--run-dir", str(folders["b"])]) == 0
        yield folders


def copy_run(run_dir, tmp_path, name="copy"):
    target = tmp_path / name
    shutil.copytree(run_dir, target)
    return target


def final_model(run_dir, dtype=torch.float32):
    run = load_run(str(run_dir))
    setup = rebuild(run, cpu=True, dtype=dtype)
    step = load_weights(setup, os.path.join(run_dir, "checkpoints", "step_30.pt"))
    return run, setup, step


def missing_folder(run_dir):
    shutil.rmtree(run_dir)
    return "does not exist"


def no_checkpoints(run_dir):
    shutil.rmtree(run_dir / "checkpoints")
    return "has no checkpoints"


def truncated_results(run_dir):
    text = (run_dir / "results.txt").read_text()
    (run_dir / "results.txt").write_text(text[:-25])
    return "cut-off row"


def unknown_version(run_dir):
    record = json.loads((run_dir / "config.json").read_text())
    record["version"] = 99
    (run_dir / "config.json").write_text(json.dumps(record))
    return "config format version 99"


def mistyped_config(run_dir):
    record = json.loads((run_dir / "config.json").read_text())
    record["config"]["lr"] = "0.05"
    (run_dir / "config.json").write_text(json.dumps(record))
    return "config setting lr = '0.05' is not of type float"


def renamed_step_column(run_dir):
    text = (run_dir / "results.txt").read_text()
    (run_dir / "results.txt").write_text(text.replace("\nepoch,step,", "\nepoch,Step,", 1))
    return "has no step column"


def garbled_value(run_dir):
    lines = (run_dir / "results.txt").read_text().split("\n")
    header_at = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    fields = lines[header_at + 3].split(",")
    fields[2] = "x0.5"  # batch_loss of the third row
    lines[header_at + 3] = ",".join(fields)
    (run_dir / "results.txt").write_text("\n".join(lines))
    return "not numbers in column batch_loss"


def check_bad_input(script, extra_args, damage, runs, tmp_path, capsys):
    """A damaged run next to a good one: exit code 2, one line on stderr, no file written anywhere."""
    good = copy_run(runs["b"], tmp_path, "good")
    bad = copy_run(runs["a"], tmp_path, "bad")
    message = damage(bad)
    before = sorted(p.name for p in good.iterdir())
    out = tmp_path / "out"
    assert script.main([str(good), str(bad), "--out", str(out), *extra_args]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and message in captured.err
    assert captured.err.startswith(f"{script.PROG}: error: ")
    assert "wrote" not in captured.out
    assert not out.exists() and sorted(p.name for p in good.iterdir()) == before
