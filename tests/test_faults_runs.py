"""Runs under faults: cut results, stale final files, folders stopped before their first
checkpoint, several processes on one folder, memory and disk that run out, damaged bytes.

Each test reproduces one case of the fault campaign (a kill, a full disk, a race, a hand-cut
file) and checks that nothing is lost, nothing stale is reported and the user gets one line.
"""

import errno
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest

import compute_final_fullbs
import compute_final_gHg
import plot_results
import sharpness_gap
import training
import utils.checkpoints
import utils.launch
import utils.monitor
import utils.training
from run_checks import interrupt_at, same_results
from utils import run_lock
from utils.checkpoints import list_checkpoints
from utils.config import RunConfig
from utils.resources import OutOfSpace
from utils.results import ResultsWriter, read_results
from utils.runs import load_run
from utils.sweep import point_command, point_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["--width", "16", "--num-data", "120", "--batch", "8", "--quiet", "--steps", "30",
        "--checkpoint-every", "5", "--lambdamax", "--batch-sharpness", "--measure-every", "10"]


def one_error_line(capsys, fragment):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert fragment in err, err
    return err


@pytest.fixture
def reference(results_env):
    run_dir = results_env / "reference"
    assert training.main([*BASE, "--run-dir", str(run_dir)]) == 0
    return run_dir


def cut_results(run_dir, keep_fraction):
    lines = (run_dir / "results.txt").read_text().splitlines(keepends=True)
    (run_dir / "results.txt").write_text("".join(lines[:int(len(lines) * keep_fraction)]))


# ----------------------------------------------------------------------------- 1. rows lost on resume

def test_resume_recomputes_the_rows_cut_from_results(results_env, reference, capsys):
    damaged = results_env / "damaged"
    shutil.copytree(reference, damaged)
    os.unlink(damaged / "summary.json")
    cut_results(damaged, 2 / 3)
    assert read_results(damaged / "results.txt")["step"].max() < list_checkpoints(damaged)[-1][0] - 1
    assert training.main(["--resume", str(damaged)]) == 0
    same_results(reference, damaged)


def cut_results_after(run_dir, step):
    """Keep results.txt up to the row of ``step``, cut at a line boundary."""
    lines = (run_dir / "results.txt").read_text().splitlines(keepends=True)
    header = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    step_at = lines[header].rstrip("\n").split(",").index("step")
    kept = [line for line in lines[header + 1:] if int(line.split(",")[step_at]) <= step]
    (run_dir / "results.txt").write_text("".join(lines[:header + 1] + kept))


@pytest.mark.parametrize("lose", ["old_checkpoints", "checkpoints_folder"])
def test_resume_without_a_checkpoint_the_rows_reach_restarts_from_the_first_step(results_env, reference, capsys, lose):
    """Only checkpoints after the last row are left (--keep-checkpoints 2, or none at all):
    the run restarts from its first step, reproducing every row, never from fresh weights at
    the row's step."""
    damaged = results_env / "damaged"
    assert training.main([*BASE, "--keep-checkpoints", "2", "--run-dir", str(damaged)]) == 0
    assert [step for step, _ in list_checkpoints(damaged)] == [25, 30]
    os.unlink(damaged / "summary.json")
    cut_results_after(damaged, 16)
    if lose == "checkpoints_folder":
        shutil.rmtree(damaged / "checkpoints")
    capsys.readouterr()
    assert training.main(["--resume", str(damaged)]) == 0
    err = capsys.readouterr().err
    assert "no checkpoint at or before step 17" in err and "restarts from step 0" in err
    same_results(reference, damaged)


def test_a_fork_without_a_checkpoint_the_rows_reach_restarts_from_its_parents(results_env, reference, capsys):
    fork = results_env / "fork"
    assert training.main(["--cont-run", str(reference), "--cont-step", "12", "--lr", "0.1", "--run-dir", str(fork)]) == 0
    complete = results_env / "complete"
    shutil.copytree(fork, complete)
    shutil.rmtree(fork / "checkpoints")
    os.unlink(fork / "summary.json")
    cut_results_after(fork, 20)
    capsys.readouterr()
    assert training.main(["--resume", str(fork)]) == 0
    assert "restarts from step 10" in capsys.readouterr().err
    same_results(complete, fork)


def test_a_finished_run_whose_results_were_cut_is_completed_again(results_env, reference):
    damaged = results_env / "damaged"
    shutil.copytree(reference, damaged)
    cut_results(damaged, 1 / 2)
    assert training.main(["--resume", str(damaged)]) == 0
    same_results(reference, damaged)
    assert json.loads((damaged / "summary.json").read_text())["status"] == "finished"


def test_resume_step_that_would_leave_a_gap_is_refused(results_env, reference, capsys):
    damaged = results_env / "damaged"
    shutil.copytree(reference, damaged)
    os.unlink(damaged / "summary.json")
    cut_results(damaged, 1 / 2)
    last = int(read_results(damaged / "results.txt")["step"].max())
    capsys.readouterr()
    assert training.main(["--resume", str(damaged), "--resume-step", "30"]) == 2
    one_error_line(capsys, f"rows up to step {last} only")


def test_resume_point_skips_steps_that_log_no_row(results_env):
    """With --log-every 4 a run interrupted after step 13 logged row 12 last; its checkpoint 14
    is still usable, as steps 13 is not due to be logged."""
    run_dir = results_env / "sparse"
    os.makedirs(run_dir / "checkpoints")
    for step in (0, 7, 14, 21):
        (run_dir / "checkpoints" / f"step_{step}.pt").write_bytes(b"")

    def every_fourth(step):
        return step % 4 == 0

    assert utils.launch.resume_point(str(run_dir), None, 13, every_fourth)[0] == 14
    assert utils.launch.resume_point(str(run_dir), None, 12, every_fourth)[0] == 7
    assert utils.launch.resume_point(str(run_dir), None, 0, every_fourth) == (0, str(run_dir / "checkpoints" / "step_0.pt"))
    # Only checkpoints past a due row: the state at step 13 is saved nowhere, so the run starts over.
    for step in (0, 7, 14):
        os.unlink(run_dir / "checkpoints" / f"step_{step}.pt")
    assert utils.launch.resume_point(str(run_dir), None, 13, every_fourth, first_step=3) == (3, None)


# ----------------------------------------------------------------------------- 2. stale final files

def test_a_final_file_of_an_earlier_step_is_ignored_as_stale(results_env, capsys):
    run_dir = results_env / "run"
    with pytest.MonkeyPatch.context() as patch:
        interrupt_at(patch, 11, signal.SIGTERM)
        assert training.main([*BASE, "--run-dir", str(run_dir)]) == 143
    assert compute_final_fullbs.main([str(run_dir), "--quiet"]) == 0
    assert compute_final_gHg.main([str(run_dir), "--quiet", "--batch-sizes", "8", "--max-samples", "30"]) == 0
    assert json.loads((run_dir / "final_fullbs.json").read_text())["step"] == 12
    assert training.main(["--resume", str(run_dir)]) == 0
    capsys.readouterr()
    assert sharpness_gap.main([str(run_dir), "--tail", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "final_fullbs.json measured step 12" in err and "final_ghg.json measured step 12" in err
    row = pd.read_csv(run_dir / "sharpness_gap.csv").iloc[0]
    assert row["lambda_max_source"] == "results.txt" and row["batch_sharpness_source"] == "results.txt"
    frame = read_results(run_dir / "results.txt")
    assert row["lambda_max"] == frame.loc[frame["step"] >= 15, "lambda_max"].median()

    assert compute_final_fullbs.main([str(run_dir), "--quiet"]) == 0
    assert sharpness_gap.main([str(run_dir), "--tail", "0.5"]) == 0
    assert pd.read_csv(run_dir / "sharpness_gap.csv").iloc[0]["lambda_max_source"] == "final_fullbs.json"


def test_the_density_figure_names_the_step_its_density_measured(results_env, capsys):
    """density.csv of step 12 stays when a later compute_final_fullbs.py without --density
    measures step 30: the figure says step 12, with a note that it is not the final state."""
    run_dir = results_env / "run"
    with pytest.MonkeyPatch.context() as patch:
        interrupt_at(patch, 11, signal.SIGTERM)
        assert training.main([*BASE, "--run-dir", str(run_dir)]) == 143
    assert compute_final_fullbs.main([str(run_dir), "--quiet", "--density"]) == 0
    assert training.main(["--resume", str(run_dir)]) == 0
    assert compute_final_fullbs.main([str(run_dir), "--quiet"]) == 0
    assert json.loads((run_dir / "final_fullbs.json").read_text())["step"] == 30
    capsys.readouterr()
    [(title, *_)] = plot_results.density_panels([load_run(str(run_dir))])
    assert title.endswith(", step 12")
    assert "density.csv measured step 12, but the run's final step is 30" in capsys.readouterr().err
    assert plot_results.main([str(run_dir), "--density", "--out", str(results_env / "figures")]) == 0
    # A step column edited into something that is not a step number: a note, never a traceback.
    table = (run_dir / "density.csv").read_text().splitlines()
    step_column = table[0].split(",").index("step")
    edited = [table[0]] + [",".join("twelve" if i == step_column else cell for i, cell in enumerate(row.split(",")))
                           for row in table[1:]]
    (run_dir / "density.csv").write_text("\n".join(edited) + "\n")
    [(title, *_)] = plot_results.density_panels([load_run(str(run_dir))])
    assert "step" not in title.split(",")[-1]
    assert "density.csv does not say which step it measured" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 3. analysis of damaged or unfinished runs

@pytest.mark.parametrize("script", [compute_final_fullbs, compute_final_gHg])
def test_final_scripts_refuse_a_cut_results_file(results_env, reference, capsys, script):
    cut_results(reference, 1 / 2)
    with open(reference / "results.txt", "a") as f:
        f.write("1,2,0.5")  # a row cut by a hard kill
    capsys.readouterr()
    assert script.main([str(reference), "--quiet"]) == 2
    one_error_line(capsys, "cut-off row")
    assert not (reference / "final_fullbs.json").exists() and not (reference / "final_ghg.json").exists()


@pytest.mark.parametrize("last_row", [16, -1], ids=["line_boundary", "header_only"])
def test_analysis_refuses_an_ended_run_whose_results_were_cut_at_a_line_boundary(results_env, reference, capsys, last_row):
    """The file parses cleanly, but summary.json says the run ended at step 30: the rows stop short."""
    cut_results_after(reference, last_row)
    before = sorted(os.listdir(reference))
    for script, extra in ((compute_final_fullbs, []), (compute_final_gHg, ["--max-samples", "25"]),
                          (sharpness_gap, []), (plot_results, [])):
        capsys.readouterr()
        assert script.main([str(reference), "--quiet", *extra]) == 2, script.__name__
        err = one_error_line(capsys, "although the run finished (summary.json: its last row is step 29)")
        assert ("has no rows" if last_row < 0 else "stops at step 16") in err
        assert f"training.py --resume {reference}" in err
    assert sorted(os.listdir(reference)) == before


def test_a_summary_whose_final_step_is_not_a_number_is_one_line(reference, capsys):
    summary = json.loads((reference / "summary.json").read_text())
    (reference / "summary.json").write_text(json.dumps({**summary, "final_step": "30"}))
    for script, argv in ((sharpness_gap, [str(reference), "--quiet"]), (training, ["--resume", str(reference)])):
        capsys.readouterr()
        assert script.main(argv) == 2, script.__name__
        one_error_line(capsys, "summary.json: final_step '30' is not a step number; delete it")


@pytest.mark.parametrize("script, output", [(compute_final_fullbs, "final_fullbs.json"), (compute_final_gHg, "final_ghg.json")])
def test_final_scripts_say_when_the_run_has_not_finished(results_env, capsys, script, output):
    run_dir = results_env / "run"
    with pytest.MonkeyPatch.context() as patch:
        interrupt_at(patch, 8, signal.SIGTERM)
        assert training.main([*BASE, "--run-dir", str(run_dir)]) == 143
    capsys.readouterr()
    assert script.main([str(run_dir), "--quiet", *(["--max-samples", "25"] if script is compute_final_gHg else [])]) == 0
    out = capsys.readouterr().out
    assert "not finished" in out and "step 9" in out
    record = json.loads((run_dir / output).read_text())
    assert record["step"] == 9 and record["final"] is False and record["run_status"] == "interrupted"


# ----------------------------------------------------------------------------- 4. folders stopped before their first checkpoint

def test_a_folder_with_only_config_json_resumes_from_step_0(results_env, reference):
    stopped = results_env / "stopped"
    os.makedirs(stopped)
    shutil.copy(reference / "config.json", stopped / "config.json")
    (stopped / "results.txt").write_text("# EOSS results\nepoch,step\n")  # a header-only file from another writer
    assert training.main(["--resume", str(stopped)]) == 0
    same_results(reference, stopped)


def test_a_fork_stopped_before_its_first_checkpoint_resumes_from_its_parents(results_env, reference):
    fork = results_env / "fork"
    assert training.main(["--cont-run", str(reference), "--cont-step", "12", "--lr", "0.1", "--run-dir", str(fork)]) == 0
    complete = results_env / "complete"
    shutil.copytree(fork, complete)
    shutil.rmtree(fork / "checkpoints")
    for name in ("results.txt", "summary.json"):
        os.unlink(fork / name)
    assert training.main(["--resume", str(fork)]) == 0
    same_results(complete, fork)
    assert "continued from" in (fork / "results.txt").read_text()


def test_sigterm_while_the_run_is_set_up_exits_143_and_leaves_a_resumable_folder(results_env, reference, monkeypatch, capsys):
    run_dir = results_env / "early"
    original = utils.launch.atomic_write_json

    def signal_once_config_exists(path, data):
        original(path, data)
        if path.endswith("config.json"):
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(utils.launch, "atomic_write_json", signal_once_config_exists)
    assert training.main([*BASE, "--run-dir", str(run_dir)]) == 143
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["final_step"] == 0
    monkeypatch.undo()
    assert training.main(["--resume", str(run_dir)]) == 0
    same_results(reference, run_dir)


def test_sigterm_before_the_folder_exists_writes_nothing(results_env, monkeypatch, capsys):
    original = utils.launch.build

    def build_then_signal(cfg):
        setup = original(cfg)
        os.kill(os.getpid(), signal.SIGTERM)
        return setup

    monkeypatch.setattr(utils.launch, "build", build_then_signal)
    assert training.main([*BASE, "--run-dir", str(results_env / "never")]) == 143
    assert "before the run started" in capsys.readouterr().err
    assert not (results_env / "never").exists()


def test_sweep_resumes_a_point_folder_that_holds_only_config_json(results_env, reference):
    sweep_dir = results_env / "sweep"
    point = {"name": "p", "argv": ["--lr", "0.05"]}
    run_dir = sweep_dir / "runs" / "p"
    os.makedirs(run_dir)
    shutil.copy(reference / "config.json", run_dir / "config.json")
    command = point_command(str(sweep_dir), {"shared": ["--quiet"]}, point, clear=True)
    assert command[2:4] == ["--resume", str(run_dir)] and (run_dir / "config.json").exists()


def test_sweep_completes_a_finished_point_whose_results_were_cut(results_env, reference):
    """As training.py --resume does: summary.json says finished, but the rows stop at step 16."""
    sweep_dir = results_env / "sweep"
    point = {"name": "p", "argv": ["--lr", "0.05"], "settings": {"lr": 0.05}}
    run_dir = sweep_dir / "runs" / "p"
    shutil.copytree(reference, run_dir)
    assert point_command(str(sweep_dir), {"shared": ["--quiet"]}, point) is None
    assert point_state(str(sweep_dir), point)["status"] == "finished"
    cut_results_after(run_dir, 16)
    command = point_command(str(sweep_dir), {"shared": ["--quiet"]}, point)
    assert command is not None and command[2:4] == ["--resume", str(run_dir)]
    assert point_state(str(sweep_dir), point)["status"] == "interrupted"
    assert point_state(str(sweep_dir), point)["step"] == 17


# ----------------------------------------------------------------------------- 5. one folder, several processes

def _claim_and_record(run_dir, queue):
    cfg = RunConfig(run_dir=run_dir)
    try:
        folder, lock, _ = utils.launch.create_run_dir(cfg)
    except Exception as exc:  # the one-line UserError of a loser
        queue.put(("lost", str(exc)))
        return
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"pid": os.getpid()}, f)
    time.sleep(0.5)  # hold the lock while the others try
    lock.release()
    queue.put(("won", os.getpid()))


def test_one_run_dir_claimed_by_eight_processes_at_once_has_one_owner(results_env):
    context = multiprocessing.get_context("fork")
    for trial in range(3):
        run_dir = str(results_env / f"contested{trial}")
        queue = context.Queue()
        processes = [context.Process(target=_claim_and_record, args=(run_dir, queue)) for _ in range(8)]
        for p in processes:
            p.start()
        for p in processes:
            p.join(timeout=60)
        outcomes = [queue.get(timeout=10) for _ in processes]
        winners = [value for kind, value in outcomes if kind == "won"]
        assert len(winners) == 1, outcomes
        assert all("is being claimed by another process" in value or "already exists" in value
                   for kind, value in outcomes if kind == "lost"), outcomes
        with open(os.path.join(run_dir, "config.json")) as f:
            assert json.load(f)["pid"] == winners[0]


def write_lock(run_dir, **owner):
    record = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": None, "slurm_job": None,
              "purpose": "training", "token": "t", "since": "now", **owner}
    with open(os.path.join(run_dir, run_lock.LOCK_FILE), "w") as f:
        json.dump(record, f)


def test_resume_of_a_run_that_is_still_training_is_refused(results_env, reference, capsys, monkeypatch):
    os.unlink(reference / "summary.json")
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        write_lock(reference, pid=sleeper.pid)
        capsys.readouterr()
        assert training.main(["--resume", str(reference)]) == 2
        one_error_line(capsys, f"in use by process {sleeper.pid} on {socket.gethostname()}")
    finally:
        sleeper.kill()
        sleeper.wait()
    # Its owner died as after SIGKILL: the lock no longer blocks.
    assert training.main(["--resume", str(reference)]) == 0
    assert not (reference / run_lock.LOCK_FILE).exists()


def test_a_lock_from_another_host_blocks_while_its_heartbeat_is_fresh(results_env, reference, capsys, monkeypatch):
    os.unlink(reference / "summary.json")
    write_lock(reference, host="elsewhere", pid=1)
    capsys.readouterr()
    assert training.main(["--resume", str(reference)]) == 2
    one_error_line(capsys, "on elsewhere, heartbeat")
    old = time.time() - run_lock.STALE_AFTER_SECONDS - 5
    os.utime(reference / run_lock.LOCK_FILE, (old, old))
    assert training.main(["--resume", str(reference)]) == 0


def test_a_requeued_slurm_job_takes_over_its_own_lock_at_once(results_env, reference, monkeypatch):
    os.unlink(reference / "summary.json")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    write_lock(reference, host="node-that-died", pid=1, slurm_job="4242")
    assert training.main(["--resume", str(reference)]) == 0


def test_the_lock_heartbeat_refreshes_the_file(results_env, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_SECONDS", 0.05)
    os.makedirs(results_env / "beat")
    lock = run_lock.claim(str(results_env / "beat"), "training")
    try:
        old = time.time() - 1000
        os.utime(lock.path, (old, old))
        time.sleep(0.3)
        assert time.time() - os.stat(lock.path).st_mtime < 5
    finally:
        lock.release()
    assert not os.path.exists(lock.path)


# ----------------------------------------------------------------------------- 6. memory

def test_a_model_too_large_for_memory_is_one_line_before_any_folder(results_env, capsys):
    assert training.main([*BASE, "--width", "10000000", "--run-dir", str(results_env / "huge")]) == 2
    err = one_error_line(capsys, "the model mlp (100,000,")
    assert "TB of memory" in err and "--width" in err
    assert not (results_env / "huge").exists()


def test_a_model_over_the_address_space_limit_is_one_line(results_env):
    """`ulimit -v 4000000` and --width 40000: the limit is read before the model is built."""
    command = (f"ulimit -v 4000000 && exec {sys.executable} training.py --width 40000 --num-data 120 --steps 2 "
               f"--quiet --cpu --run-dir {results_env / 'limited'}")
    done = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "GB of memory" in done.stderr and "--width" in done.stderr, done.stderr
    assert not (results_env / "limited").exists()


def test_running_out_of_memory_in_a_measurement_names_it_and_the_fix(results_env, monkeypatch, capsys):
    def refuse(self, step, xb, yb):
        if step == 10:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 123456789 bytes. Error code 12 (Cannot allocate memory)")
        return {}

    monkeypatch.setattr(utils.monitor.Monitor, "measure", refuse)
    assert training.main([*BASE, "--run-dir", str(results_env / "oom")]) == 2
    err = one_error_line(capsys, "the measurements at step 10 could not allocate 123 MB")
    assert "--hvp-chunk" in err
    assert not (results_env / "oom" / run_lock.LOCK_FILE).exists()


@pytest.mark.parametrize("script, measurement", [(compute_final_fullbs, "full_batch_sharpness"),
                                                  (compute_final_gHg, "ghg_family")])
def test_running_out_of_memory_in_an_end_of_run_measurement_is_one_line(results_env, reference, monkeypatch, capsys,
                                                                        script, measurement):
    def refuse(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 123456789 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(script, measurement, refuse)
    before = sorted(os.listdir(reference))
    capsys.readouterr()
    assert script.main([str(reference), "--quiet", "--cpu"]) == 2
    err = one_error_line(capsys, f"out of memory: measuring {reference} at checkpoint step_30.pt could not allocate 123 MB")
    assert "--hvp-chunk" in err
    assert sorted(os.listdir(reference)) == before


# ----------------------------------------------------------------------------- 7. a full disk

def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_during_training_stops_with_one_line_and_resumes(results_env, reference, monkeypatch, capsys):
    run_dir = results_env / "full"
    original = utils.checkpoints.torch.save

    def save(state, f):
        if state["step"] == 15:
            no_space()
        original(state, f)

    monkeypatch.setattr(utils.checkpoints.torch, "save", save)
    assert training.main([*BASE, "--run-dir", str(run_dir)]) == 2
    err = one_error_line(capsys, f"no space left on the disk of {run_dir / 'checkpoints'}: writing step_15.pt needs")
    assert "newest good checkpoint: step 10" in err and f"--resume {run_dir}" in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["final_step"] == 10
    assert not [name for name in os.listdir(run_dir / "checkpoints") if name.startswith(".tmp")]
    monkeypatch.undo()
    assert training.main(["--resume", str(run_dir)]) == 0
    same_results(reference, run_dir)


def test_a_full_disk_at_the_start_leaves_no_folder_or_a_resumable_one(results_env, reference, monkeypatch, capsys):
    original = utils.launch.atomic_write_json

    def config_fails(path, data):
        if path.endswith("config.json"):
            raise OutOfSpace(path, 3000)
        original(path, data)

    monkeypatch.setattr(utils.launch, "atomic_write_json", config_fails)
    assert training.main([*BASE, "--run-dir", str(results_env / "none")]) == 2
    one_error_line(capsys, "writing config.json needs 3 kB")
    assert not (results_env / "none").exists()
    monkeypatch.undo()

    original_save = utils.checkpoints.torch.save
    monkeypatch.setattr(utils.checkpoints.torch, "save", no_space)
    assert training.main([*BASE, "--run-dir", str(results_env / "first")]) == 2
    one_error_line(capsys, "writing step_0.pt needs")
    monkeypatch.setattr(utils.checkpoints.torch, "save", original_save)
    assert training.main(["--resume", str(results_env / "first")]) == 0
    same_results(reference, results_env / "first")


def test_results_rows_that_do_not_fit_are_one_error_naming_the_file(tmp_path):
    writer = ResultsWriter("/dev/full", ["step", "loss"], append=True)
    with pytest.raises(OutOfSpace, match="writing full needs 6 bytes"):
        writer.write_row({"step": 1, "loss": 0.5})
    writer.close()


# ----------------------------------------------------------------------------- 8, 11. damaged bytes, an empty --run-dir

def test_resume_names_the_line_with_bytes_that_are_not_utf8(results_env, reference, capsys):
    os.unlink(reference / "summary.json")
    data = (reference / "results.txt").read_bytes().split(b"\n")
    data[5] = data[5][:10] + b"\xff\xfe" + data[5][10:]
    (reference / "results.txt").write_bytes(b"\n".join(data))
    capsys.readouterr()
    assert training.main(["--resume", str(reference)]) == 2
    one_error_line(capsys, "results.txt line 6 is not UTF-8 text")


def test_an_empty_run_dir_is_refused(results_env, capsys):
    assert training.main([*BASE, "--run-dir", ""]) == 2
    one_error_line(capsys, "--run-dir needs a folder path")
    assert not (results_env / "results").exists()


def test_a_final_file_with_a_value_that_is_not_a_number_is_one_line(results_env, reference, capsys):
    assert compute_final_fullbs.main([str(reference), "--quiet"]) == 0
    record = json.loads((reference / "final_fullbs.json").read_text())
    (reference / "final_fullbs.json").write_text(json.dumps({**record, "lambda_max": "x"}))
    capsys.readouterr()
    assert sharpness_gap.main([str(reference)]) == 2
    one_error_line(capsys, "final_fullbs.json has lambda_max = 'x', not a number")
    (reference / "summary.json").write_text("[1, 2]")
    assert sharpness_gap.main([str(reference)]) == 2
    one_error_line(capsys, "summary.json does not hold a JSON object; delete it, then training.py --resume")


def reorder_columns(path, order):
    frame = pd.read_csv(path, comment="#")
    comments = [line for line in open(path).read().splitlines(keepends=True) if line.startswith("#")]
    with open(path, "w") as f:
        f.write("".join(comments))
        frame[order].to_csv(f, index=False, na_rep="nan")


def test_resume_appends_by_column_name_and_refuses_other_columns(results_env, reference, capsys):
    damaged = results_env / "damaged"
    shutil.copytree(reference, damaged)
    os.unlink(damaged / "summary.json")
    cut_results(damaged, 1 / 2)
    columns = list(pd.read_csv(damaged / "results.txt", comment="#").columns)
    swapped = [columns[1], columns[0], *columns[2:][::-1]]
    reorder_columns(damaged / "results.txt", swapped)
    assert training.main(["--resume", str(damaged)]) == 0
    resumed = read_results(damaged / "results.txt")
    assert list(resumed.columns) == swapped
    kept = [c for c in columns if c != "wall_time" and not c.endswith("_seconds")]
    pd.testing.assert_frame_equal(read_results(reference / "results.txt")[kept], resumed[kept])

    other = results_env / "other"
    shutil.copytree(reference, other)
    os.unlink(other / "summary.json")
    cut_results(other, 1 / 2)
    # A results.txt started before a measurement gained a column: the resumed run leaves it out.
    older = [c for c in columns if c != "batch_sharpness_n"]
    reorder_columns(other / "results.txt", older)
    capsys.readouterr()
    assert training.main(["--resume", str(other)]) == 0
    assert "started without the columns batch_sharpness_n" in capsys.readouterr().err
    kept = [c for c in older if c != "wall_time" and not c.endswith("_seconds")]
    pd.testing.assert_frame_equal(read_results(reference / "results.txt")[kept], read_results(other / "results.txt")[kept])

    # A column this run does not write: the file belongs to other settings, and nothing is touched.
    foreign = results_env / "foreign"
    shutil.copytree(reference, foreign)
    os.unlink(foreign / "summary.json")
    cut_results(foreign, 1 / 2)
    frame = pd.read_csv(foreign / "results.txt", comment="#").assign(gni=1.0)
    frame.to_csv(foreign / "results.txt", index=False, na_rep="nan")
    before = (foreign / "results.txt").read_text()
    assert training.main(["--resume", str(foreign)]) == 2
    one_error_line(capsys, "does not have the columns of this run (unexpected ['gni'])")
    assert (foreign / "results.txt").read_text() == before
