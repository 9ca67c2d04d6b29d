"""Runs that survive: interrupts, exact resume, hard kills, continuation forks, concurrent starts."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

import plot_results
import training
from run_checks import interrupt_at, same_parameters, same_results, without_timing  # noqa: F401 (test_family_runs)
from utils.checkpoints import list_checkpoints, load_checkpoint
from utils.config import RunConfig
from utils.plotting import run_labels
from utils.results import read_results
from utils.runs import load_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["--width", "16", "--num-data", "120", "--batch", "8", "--quiet", "--steps", "40",
        "--checkpoint-every", "6", "--full-loss-every", "3"]
MEASURED = ["--lambdamax", "--batch-sharpness", "--step-sharpness", "--gni", "--measure-every", "5"]


@pytest.mark.parametrize("extra, at_step", [
    (MEASURED, 0), (MEASURED, 11), (MEASURED, 17), (["--momentum", "0.9", "--nesterov"], 23), (["--adam", "--lr", "0.003"], 29),
])
def test_interrupted_and_resumed_run_is_bit_identical(results_env, monkeypatch, capsys, extra, at_step):
    reference, interrupted = results_env / "ref", results_env / "int"
    assert training.main([*BASE, *extra, "--run-dir", str(reference)]) == 0

    with monkeypatch.context() as patch:
        interrupt_at(patch, at_step)
        assert training.main([*BASE, *extra, "--run-dir", str(interrupted)]) == 130
    summary = json.loads((interrupted / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["final_step"] == at_step + 1
    assert list_checkpoints(interrupted)[-1][0] == at_step + 1

    assert training.main(["--resume", str(interrupted), "--quiet"]) == 0
    same_results(reference, interrupted)
    same_parameters(reference, interrupted, 40)
    assert json.loads((interrupted / "summary.json").read_text())["status"] == "finished"


def test_sigterm_exits_143(results_env, monkeypatch):
    interrupt_at(monkeypatch, 4, signal.SIGTERM)
    assert training.main([*BASE, "--run-dir", str(results_env / "t")]) == 143
    assert json.loads((results_env / "t" / "summary.json").read_text())["signal"] == "SIGTERM"


def test_hard_kill_truncated_row_is_dropped_and_rows_replaced(results_env):
    reference, killed = results_env / "ref", results_env / "kill"
    training.main([*BASE, *MEASURED, "--run-dir", str(reference)])
    training.main([*BASE, *MEASURED, "--run-dir", str(killed)])
    # Make the finished run look like one killed during step 27: checkpoints after 24 gone,
    # rows up to 26 written, the row of step 27 cut in half, no summary.
    for step, path in list_checkpoints(killed):
        if step > 24:
            os.unlink(path)
    os.unlink(killed / "summary.json")
    lines = (killed / "results.txt").read_text().splitlines(keepends=True)
    header_at = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    kept = lines[:header_at + 1 + 27] + [lines[header_at + 1 + 27][:9]]
    (killed / "results.txt").write_text("".join(kept))

    assert training.main(["--resume", str(killed), "--quiet"]) == 0
    same_results(reference, killed)
    same_parameters(reference, killed, 40)
    steps = read_results(killed / "results.txt")["step"]
    assert list(steps) == list(range(40))


def test_resume_step_replays_from_that_checkpoint(results_env, monkeypatch):
    reference, again = results_env / "ref", results_env / "again"
    training.main([*BASE, *MEASURED, "--run-dir", str(reference)])
    with monkeypatch.context() as patch:
        interrupt_at(patch, 31)
        assert training.main([*BASE, *MEASURED, "--run-dir", str(again)]) == 130
    assert training.main(["--resume", str(again), "--resume-step", "12", "--quiet", "--cpu"]) == 0
    same_results(reference, again)
    same_parameters(reference, again, 40)


def test_resume_a_finished_run_says_so_and_touches_nothing(results_env, capsys):
    done = results_env / "done"
    training.main([*BASE, "--steps", "5", "--run-dir", str(done)])
    before = {p: p.read_bytes() for p in done.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert training.main(["--resume", str(done)]) == 0
    assert training.main(["--resume", str(done), "--resume-step", "0"]) == 0
    assert "nothing to resume" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in done.rglob("*") if p.is_file()} == before


def test_damaged_run_folders_are_one_line_errors(results_env, capsys):
    run_dir = results_env / "run"
    training.main([*BASE, "--steps", "12", "--run-dir", str(run_dir)])
    (run_dir / "summary.json").write_text("{not json")
    capsys.readouterr()
    assert training.main(["--resume", str(run_dir)]) == 2
    assert "summary.json is damaged" in capsys.readouterr().err
    os.unlink(run_dir / "summary.json")
    kept = read_results(run_dir / "results.txt")
    os.unlink(run_dir / "results.txt")
    # Without results.txt no row is kept: the run is recomputed from its start, never left with a gap.
    assert training.main(["--resume", str(run_dir)]) == 0
    redone = read_results(run_dir / "results.txt")
    pd.testing.assert_frame_equal(without_timing(kept), without_timing(redone))


def test_fork_replaces_epochs_by_steps_and_is_resumable_from_its_first_step(results_env):
    parent, child = results_env / "parent", results_env / "child"
    base = [a for a in BASE if a not in ("--steps", "40")]
    assert training.main([*base, "--epochs", "3", "--run-dir", str(parent)]) == 0
    assert training.main(["--cont-run", str(parent), "--cont-step", "14", "--steps", "30", "--checkpoint-every", "10",
                          "--quiet", "--run-dir", str(child)]) == 0
    config = json.loads((child / "config.json").read_text())["config"]
    assert (config["steps"], config["epochs"]) == (30, None)
    assert [s for s, _ in list_checkpoints(child)] == [12, 20, 30]


def test_fork_continues_step_numbering_and_matches_parent(results_env):
    parent = results_env / "parent"
    training.main([*BASE, *MEASURED, "--run-dir", str(parent)])
    same_fork, faster = results_env / "same", results_env / "faster"
    assert training.main(["--cont-run", str(parent), "--cont-step", "20", "--quiet", "--run-dir", str(same_fork)]) == 0
    record = json.loads((same_fork / "config.json").read_text())
    assert record["parent"]["step"] == 18 and record["parent"]["run_dir"] == str(parent)
    fork_rows = read_results(same_fork / "results.txt")
    parent_rows = read_results(parent / "results.txt")
    assert fork_rows["step"].iloc[0] == 18
    pd.testing.assert_frame_equal(without_timing(fork_rows).reset_index(drop=True),
                                  without_timing(parent_rows[parent_rows["step"] >= 18]).reset_index(drop=True))

    assert training.main(["--cont-run", str(parent), "--cont-step", "20", "--lr", "0.2", "--quiet",
                          "--run-dir", str(faster)]) == 0
    assert json.loads((faster / "config.json").read_text())["config"]["lr"] == 0.2
    state = load_checkpoint(str(faster / "checkpoints" / "step_40.pt"))
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.2
    assert not read_results(faster / "results.txt")["batch_loss"].iloc[1:].equals(
        parent_rows[parent_rows["step"] >= 18]["batch_loss"].iloc[1:].reset_index(drop=True))

    # Parent and fork overlaid: the fork's curves start at its step, labelled by what changed.
    figures = results_env / "figures"
    assert plot_results.main([str(parent), str(faster), "--out", str(figures)]) == 0
    assert sorted(os.listdir(figures)) == ["results_overlay.pdf", "results_overlay.png"]
    assert run_labels([load_run(str(parent)), load_run(str(faster))]) == ["η=0.05", "η=0.2"]


@pytest.mark.parametrize("argv, fragment", [
    (["--resume", "{tmp}/nowhere"], "does not exist"),
    (["--resume", "{run}/results.txt"], "is a file, not a folder"),
    (["--resume", "{tmp}"], "not an EOSS run folder"),
    (["--resume", "{run}", "--lr", "0.1"], "--lr"),
    (["--resume-step", "3"], "--resume"),
    (["--cont-run", "{run}"], "--cont-step"),
    (["--cont-run", "{run}", "--cont-step", "3", "--width", "32"], "--width"),
    (["--cont-run", "{run}", "--cont-step", "3", "--gni-every", "2"], "--gni-every paces --gni, which is off"),
    (["--resume", "{run}", "--resume-step", "7"], "available steps"),
])
def test_continuation_errors(results_env, capsys, argv, fragment):
    run_dir = results_env / "run"
    training.main([*BASE, "--steps", "12", "--run-dir", str(run_dir)])
    os.unlink(run_dir / "summary.json")
    capsys.readouterr()
    argv = [a.format(tmp=results_env, run=run_dir) for a in argv]
    assert training.main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err


def test_corrupt_checkpoint_is_named(results_env, capsys):
    run_dir = results_env / "run"
    training.main([*BASE, "--steps", "12", "--run-dir", str(run_dir)])
    os.unlink(run_dir / "summary.json")
    newest = list_checkpoints(run_dir)[-1][1]
    with open(newest, "r+b") as f:
        f.truncate(100)
    capsys.readouterr()
    assert training.main(["--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert newest in err and "corrupt" in err


def test_config_version_mismatch(results_env, capsys):
    run_dir = results_env / "run"
    training.main([*BASE, "--steps", "3", "--run-dir", str(run_dir)])
    record = json.loads((run_dir / "config.json").read_text())
    record["version"] = 99
    (run_dir / "config.json").write_text(json.dumps(record))
    os.unlink(run_dir / "summary.json")
    assert training.main(["--resume", str(run_dir)]) == 2
    assert "version" in capsys.readouterr().err


def edit_config(run_dir, edit):
    record = json.loads((run_dir / "config.json").read_text())
    edit(record)
    (run_dir / "config.json").write_text(json.dumps(record))


def edit_results(run_dir, old, new):
    text = (run_dir / "results.txt").read_text()
    assert old in text
    (run_dir / "results.txt").write_text(text.replace(old, new, 1))


@pytest.mark.parametrize("damage, fragment", [
    (lambda run: edit_config(run, lambda r: r.pop("config")), 'config.json has no "config" settings'),
    (lambda run: edit_config(run, lambda r: r.update(config=[1])), "config.json: config is a list, not a mapping"),
    (lambda run: edit_config(run, lambda r: r["config"].update(lr="0.1")), "config setting lr = '0.1' is not of type float"),
    (lambda run: edit_config(run, lambda r: r["config"].update(batch=None)), "config setting batch = None is not of type int"),
    (lambda run: edit_config(run, lambda r: r["config"].update(classes=[1, "9"])), "config setting classes = [1, '9']"),
    (lambda run: edit_results(run, "\nepoch,step,", "\nepoch,Step,"), "results.txt has no step column in its header line"),
    (lambda run: edit_results(run, "\n0,2,", "\n0,two,"), "results.txt has a row with step 'two'"),
])
def test_hand_damaged_config_or_results_is_one_line_and_keeps_the_folder(results_env, capsys, damage, fragment):
    run_dir = results_env / "run"
    training.main([*BASE, "--steps", "12", "--run-dir", str(run_dir)])
    os.unlink(run_dir / "summary.json")
    damage(run_dir)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert training.main(["--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err and err.startswith("training.py: error: ")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_stored_run_with_a_cadence_but_no_measurement_resumes_and_forks(results_env):
    """Runs stored before such cadences were refused keep working; a fork answers for its own flags only."""
    run_dir = results_env / "run"
    assert training.main([*BASE, "--steps", "12", "--run-dir", str(run_dir)]) == 0
    os.unlink(run_dir / "summary.json")
    edit_config(run_dir, lambda r: r["config"].update(gni_every=2))
    assert training.main(["--resume", str(run_dir)]) == 0
    assert training.main(["--cont-run", str(run_dir), "--cont-step", "6", "--lr", "0.1",
                          "--run-dir", str(results_env / "fork")]) == 0
    assert json.loads((results_env / "fork" / "config.json").read_text())["config"]["gni_every"] == 2


def test_config_values_of_every_type_are_accepted():
    values = RunConfig(classes=[1, 9], input_shape=[3, 4, 4], stop_loss=1e-3, steps=5, param_file="p.pt").to_dict()
    assert RunConfig.from_dict({**values, "lr": 1}).lr == 1  # JSON may write a float without its point
    assert RunConfig.from_dict(values) == RunConfig(**values)


def test_real_signals_and_concurrent_starts(results_env):
    """Subprocesses: SIGTERM mid-run gives 143 and a resumable run; eight starts never collide."""
    env = {**os.environ, "RESULTS": str(results_env / "results"), "OMP_NUM_THREADS": "1"}
    run_dir = results_env / "signalled"
    proc = subprocess.Popen([sys.executable, "training.py", *BASE, "--steps", "100000", "--checkpoint-every", "50",
                             "--run-dir", str(run_dir)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        results = run_dir / "results.txt"
        if results.exists() and len(results.read_text().splitlines()) > 20:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert list_checkpoints(run_dir)[-1][0] == summary["final_step"]

    procs = [subprocess.Popen([sys.executable, "training.py", *BASE, "--steps", "1"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(8)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outputs]
    folders = {o.strip().splitlines()[-1] for o, _ in outputs}
    assert len(folders) == 8
    assert all(os.path.isfile(os.path.join(f.removeprefix("run folder: "), "summary.json")) for f in folders)


def test_resume_keeps_the_cadences_recorded_when_the_run_started(results_env, monkeypatch):
    """Defaults may change between the start and the resume of a run (a code update): the
    resumed run follows the schedule its config.json recorded."""
    run_dir = results_env / "recorded"
    argv = [a for a in BASE if a not in ("--checkpoint-every", "6", "--full-loss-every", "3")]
    with monkeypatch.context() as patch:
        interrupt_at(patch, 11)
        assert training.main([*argv, "--lambdamax", "--run-dir", str(run_dir)]) == 130
    record = json.loads((run_dir / "config.json").read_text())
    record["resolved"]["schedule"]["lambdamax"] = [[0, 7]]
    record["resolved"]["schedule"]["full_loss"] = [[0, 5]]
    record["resolved"]["checkpoint_every"] = 9
    (run_dir / "config.json").write_text(json.dumps(record))
    assert training.main(["--resume", str(run_dir), "--quiet"]) == 0
    rows = read_results(run_dir / "results.txt")
    later = rows[rows["step"] >= 12]
    assert list(later.dropna(subset=["lambda_max"])["step"]) == [14, 21, 28, 35]
    assert list(later.dropna(subset=["full_loss"])["step"]) == [15, 20, 25, 30, 35]
    assert [s for s, _ in list_checkpoints(run_dir) if s > 12] == [18, 27, 36, 40]


def test_resume_notes_when_the_hessian_products_changed(results_env, monkeypatch, capsys):
    run_dir = results_env / "modes"
    with monkeypatch.context() as patch:
        interrupt_at(patch, 11)
        assert training.main([*BASE, "--lambdamax", "--run-dir", str(run_dir)]) == 130
    capsys.readouterr()
    record = json.loads((run_dir / "config.json").read_text())
    record["resolved"]["hvp_mode"] = "double-backward-batched"  # as if started on a GPU
    (run_dir / "config.json").write_text(json.dumps(record))
    assert training.main(["--resume", str(run_dir), "--quiet"]) == 0
    assert "note: the run started with other Hessian products (hvp_mode double-backward-batched -> " \
           "double-backward)" in capsys.readouterr().err
    fresh = results_env / "same"
    with monkeypatch.context() as patch:
        interrupt_at(patch, 11)
        assert training.main([*BASE, "--lambdamax", "--run-dir", str(fresh)]) == 130
    capsys.readouterr()
    assert training.main(["--resume", str(fresh), "--quiet"]) == 0
    assert "note:" not in capsys.readouterr().err
