"""Sweeps: grids run end to end (local executor and submitit's local executor), skipped and
resumed on re-runs, a pre-emption through submitit's checkpoint hook, the status table, and
one-line errors of the grid parser."""

import json
import os
import shlex
import signal
import socket
import sys
import threading
import time

import pytest

import sweep
import training
import utils.sweep
import utils.sweep_slurm
from run_checks import same_parameters, same_results
from utils.checkpoints import list_checkpoints
from utils.runs import select_runs
from utils.sweep import TRAINING_SCRIPT, local_threads, prepare_sweep, sweep_folder, sweep_run_dirs, training_env
from utils.sweep_grid import define_sweep, load_grid_file, parse_grid_tokens

BASE = ["--width", "16", "--num-data", "120", "--steps", "20", "--quiet"]
GRID = ["--lr", "0.05", "0.1", "--batch", "8", "16"]
POINTS = ["lr0.05_batch8", "lr0.05_batch16", "lr0.1_batch8", "lr0.1_batch16"]


def table(sweep_dir):
    with open(os.path.join(sweep_dir, "sweep.json")) as f:
        return {r["name"]: r for r in json.load(f)["runs"]}


def states(sweep_dir):
    return {name: (r["status"], r["step"], r["total_steps"]) for name, r in table(sweep_dir).items()}


def reference_run(tmp, *flags):
    run_dir = os.path.join(str(tmp), "reference_" + "_".join(f.strip("-") for f in flags))
    assert training.main([*flags, "--run-dir", run_dir]) == 0
    return run_dir


def test_local_sweep_runs_skips_and_resumes(results_env, capsys):
    assert sweep.main(["--name", "grid", *GRID, "--jobs", "2", "--", *BASE]) == 0
    sweep_dir = sweep_folder("grid")
    assert states(sweep_dir) == {name: ("finished", 20, 20) for name in POINTS}
    assert table(sweep_dir)["lr0.1_batch16"]["settings"] == {"lr": "0.1", "batch": "16"}
    run_dirs = sweep_run_dirs(sweep_dir)
    assert run_dirs == [os.path.join(sweep_dir, "runs", name) for name in POINTS]
    for run_dir, (lr, batch) in zip(run_dirs, [(0.05, 8), (0.05, 16), (0.1, 8), (0.1, 16)]):
        with open(os.path.join(run_dir, "config.json")) as f:
            config = json.load(f)["config"]
        assert (config["lr"], config["batch"], config["width"], config["run_dir"]) == (lr, batch, 16, run_dir)
    reference = reference_run(results_env, *BASE, "--lr", "0.1", "--batch", "8")
    same_results(reference, run_dirs[2])

    # Make lr0.1_batch8 look killed during step 11: checkpoints after 10 gone, half a row
    # written, no summary.
    killed = run_dirs[2]
    for step, path in list_checkpoints(killed):
        if step > 10:
            os.unlink(path)
    os.unlink(os.path.join(killed, "summary.json"))
    with open(os.path.join(killed, "results.txt")) as f:
        lines = f.read().splitlines(keepends=True)
    header = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    with open(os.path.join(killed, "results.txt"), "w") as f:
        f.write("".join(lines[:header + 1 + 11]) + lines[header + 1 + 11][:7])
    capsys.readouterr()
    assert sweep.main(["status", "--name", "grid"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"sweep grid ({sweep_dir}): 4 runs, 3 finished, 1 interrupted"
    assert out[2:] == ["lr0.05_batch8   finished         20/20", "lr0.05_batch16  finished         20/20",
                       "lr0.1_batch8    interrupted      11/20", "lr0.1_batch16   finished         20/20"]
    assert states(sweep_dir)["lr0.1_batch8"] == ("interrupted", 11, 20)
    assert sweep.main(["status", sweep_dir]) == 0

    # A live process holding the point's marker makes it "running", and a re-run leaves it alone.
    marker = os.path.join(sweep_dir, "running", "lr0.1_batch8.json")
    with open(marker, "w") as f:
        json.dump({"host": socket.gethostname(), "pids": [os.getpid()]}, f)
    capsys.readouterr()
    assert sweep.main(["--name", "grid", *GRID, "--jobs", "2", "--", *BASE]) == 1
    out = capsys.readouterr().out
    assert f"lr0.1_batch8: running on {socket.gethostname()} (processes [{os.getpid()}]), skipped" in out
    assert states(sweep_dir)["lr0.1_batch8"] == ("running", 11, 20)

    # The re-run resumes the killed run and skips the others.
    os.unlink(marker)
    assert sweep.main(["--name", "grid", *GRID, "--jobs", "2", "--", *BASE]) == 0
    out = capsys.readouterr().out
    threads = local_threads(2)  # the machine's CPUs split between two runs, or OMP_NUM_THREADS
    assert [line for line in out.splitlines() if line.startswith("lr")][:5] == [
        "lr0.05_batch8: finished, skipped", "lr0.05_batch16: finished, skipped",
        f"lr0.1_batch8: resumed (log logs/lr0.1_batch8.log, {threads} CPU thread{'s' if threads > 1 else ''})",
        "lr0.1_batch16: finished, skipped", "lr0.1_batch8: finished (steps 20/20)"]
    with open(os.path.join(sweep_dir, "logs", "lr0.1_batch8.log")) as f:
        assert f"{TRAINING_SCRIPT} --resume {killed} --quiet" in f.read()
    same_results(reference, killed)
    same_parameters(reference, killed, 20)
    assert states(sweep_dir) == {name: ("finished", 20, 20) for name in POINTS}
    assert os.listdir(os.path.join(sweep_dir, "running")) == []
    # The analysis scripts' run selection takes the sweep folder as a folder of runs.
    assert sorted(run.run_dir for run in select_runs([sweep_dir])) == sorted(run_dirs)


def wait_for_rows(run_dir, rows):
    path = os.path.join(run_dir, "results.txt")
    deadline = time.time() + 120
    while time.time() < deadline:
        if os.path.exists(path) and len(open(path).read().splitlines()) > rows + 2:
            return
        time.sleep(0.01)
    raise AssertionError(f"{path} did not reach {rows} rows")


def test_ctrl_c_stops_the_local_sweep_with_checkpoints(results_env, capsys):
    flags = ["--width", "16", "--num-data", "120", "--batch", "8", "--steps", "1000", "--log-every", "10", "--quiet"]
    sweep_dir = sweep_folder("stopped")
    run_dir = os.path.join(sweep_dir, "runs", "lr0.05")
    interrupter = threading.Thread(target=lambda: (wait_for_rows(run_dir, 3), os.kill(os.getpid(), signal.SIGINT)))
    interrupter.start()
    assert sweep.main(["--name", "stopped", "--lr", "0.05", "--", *flags]) == 130
    interrupter.join()
    status, step, total = states(sweep_dir)["lr0.05"]
    assert status == "interrupted" and 0 < step < total == 1000
    with open(os.path.join(run_dir, "summary.json")) as f:
        assert json.load(f)["final_step"] == step == list_checkpoints(run_dir)[-1][0]
    assert os.listdir(os.path.join(sweep_dir, "running")) == []


def test_submitit_local_executor_runs_the_grid(results_env, monkeypatch, capsys):
    monkeypatch.setattr(utils.sweep_slurm, "CLUSTER", "local")
    argv = ["--name", "array", *GRID, "--executor", "slurm", "--gpus-per-run", "0", "--cpus-per-run", "1",
            "--time-min", "10", "--wait", "--", *BASE]
    assert sweep.main(argv) == 0
    assert "submitted 4 runs as jobs" in capsys.readouterr().out
    sweep_dir = sweep_folder("array")
    assert states(sweep_dir) == {name: ("finished", 20, 20) for name in POINTS}
    reference = reference_run(results_env, *BASE, "--lr", "0.05", "--batch", "16")
    same_results(reference, sweep_run_dirs(sweep_dir)[1])

    results = sorted(name for name in os.listdir(os.path.join(sweep_dir, "submitit")) if name.endswith("_result.pkl"))
    assert len(results) == 4
    assert sweep.main(argv) == 0  # nothing left to submit
    assert "4 finished" in capsys.readouterr().out
    assert sorted(name for name in os.listdir(os.path.join(sweep_dir, "submitit")) if name.endswith("_result.pkl")) == results


def test_slurm_flags_reach_the_job_array(results_env, monkeypatch, capsys):
    """Against stand-ins for srun and sbatch: the submission script submitit writes."""
    bin_dir = results_env / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\n")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {results_env}/sbatch.sh\n'
                                    f'echo "$PYTHONPATH" > {results_env}/pythonpath\necho "Submitted batch job 4242"\n')
    for name in ("srun", "sbatch"):
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert sweep.main(["--name", "cluster", *GRID, "--executor", "slurm", "--partition", "gpu", "--time-min", "30",
                       "--cpus-per-run", "2", "--mem-gb", "3", "--array-parallelism", "2", "--", *BASE]) == 0
    assert capsys.readouterr().out.startswith("submitted 4 runs as jobs 4242_0 .. 4242_3")
    script = (results_env / "sbatch.sh").read_text().splitlines()
    for line in ["#SBATCH --array=0-3%2", "#SBATCH --partition=gpu", "#SBATCH --time=30", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --cpus-per-task=2", "#SBATCH --mem=3GB", "#SBATCH --job-name=sweep-cluster",
                 "#SBATCH --signal=USR2@90"]:
        assert line in script
    assert (results_env / "pythonpath").read_text().split(os.pathsep)[0].strip() == os.path.dirname(TRAINING_SCRIPT)
    assert states(sweep_folder("cluster")) == {name: ("pending", None, None) for name in POINTS}


def test_preempted_job_is_requeued_and_resumes(results_env, tmp_path):
    from submitit.helpers import DelayedSubmission

    flags = ["--width", "16", "--num-data", "120", "--batch", "8", "--steps", "1000", "--log-every", "10",
             "--checkpoint-every", "100", "--quiet"]
    sweep_dir = sweep_folder("preempt")
    prepare_sweep(sweep_dir, define_sweep("preempt", {"lr": ["0.05"]}, flags))
    assert sweep.main(["status", "--name", "preempt"]) == 0
    assert states(sweep_dir) == {"lr0.05": ("pending", None, None)}
    run_dir = os.path.join(sweep_dir, "runs", "lr0.05")
    job = utils.sweep_slurm.SweepJob(sweep_dir, "lr0.05", threads=1)
    # What submitit does when SLURM signals a pre-emption or the time limit (SIGUSR2): call the
    # job's checkpoint() from the signal handler while the job runs, then requeue the submission.
    submissions = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: submissions.append(job.checkpoint()))
    signaller = threading.Thread(target=lambda: (wait_for_rows(run_dir, 3), os.kill(os.getpid(), signal.SIGUSR2)))
    signaller.start()
    try:
        first = job()
    finally:
        signaller.join()
        signal.signal(signal.SIGUSR2, previous)
    submission, = submissions
    assert first["returncode"] == 143 and first["status"] == "interrupted"
    assert 0 < first["step"] < 1000 and list_checkpoints(run_dir)[-1][0] == first["step"]
    assert "--resume" not in first["command"]
    assert states(sweep_dir) == {"lr0.05": ("interrupted", first["step"], 1000)}

    assert isinstance(submission, DelayedSubmission) and submission.function is not job
    submission.dump(tmp_path / "requeued.pkl")
    requeued = DelayedSubmission.load(tmp_path / "requeued.pkl")
    second = requeued.result()
    assert second["command"][-3:] == ["--resume", run_dir, "--quiet"]
    assert second["returncode"] == 0 and second["status"] == "finished" and second["step"] == 1000
    reference = reference_run(results_env, *flags, "--lr", "0.05")
    same_results(reference, run_dir)
    same_parameters(reference, run_dir, 1000)
    assert states(sweep_dir) == {"lr0.05": ("finished", 1000, 1000)}


def test_torchrun_exiting_1_after_its_processes_checkpointed_a_signal_is_an_interruption():
    """torchrun passes SIGTERM on to its processes, which checkpoint (summary "interrupted", exit 143),
    and exits 1 itself; exit 1 is a failure otherwise: without torchrun, without a summary this
    attempt wrote, or with another status (a full disk's interrupted summary has no exit code)."""
    from utils.sweep import attempt_failed
    stopped = {"status": "interrupted", "exit_code": 143}
    assert not attempt_failed(1, stopped, torchrun=True, summary_written_now=True)
    assert attempt_failed(1, stopped, torchrun=False, summary_written_now=True)
    assert attempt_failed(1, stopped, torchrun=True, summary_written_now=False)  # an earlier attempt's
    assert attempt_failed(1, None, torchrun=True, summary_written_now=False)
    assert attempt_failed(2, stopped, torchrun=True, summary_written_now=True)
    full_disk = {"status": "interrupted", "final_step": 10, "reason": "no space left on device"}
    assert attempt_failed(1, full_disk, torchrun=True, summary_written_now=True)
    assert not attempt_failed(1, {"status": "finished"}, torchrun=True, summary_written_now=False)
    for code in (143, 130, -9, 0):
        assert not attempt_failed(code, None, torchrun=False, summary_written_now=False)


def test_crashing_run_is_reported_failed_and_retried(results_env, monkeypatch, capsys):
    crashing = results_env / "crashing_training.py"
    crashing.write_text("import sys\nprint('something broke', file=sys.stderr)\nsys.exit(3)\n")
    monkeypatch.setattr(utils.sweep, "TRAINING_SCRIPT", str(crashing))
    assert sweep.main(["--name", "crash", "--batch", "8", "--", *BASE]) == 1
    sweep_dir = sweep_folder("crash")
    entry = table(sweep_dir)["batch8"]
    assert (entry["status"], entry["exit_code"], entry["log"]) == ("failed", 3, "logs/batch8.log")
    with open(os.path.join(sweep_dir, entry["log"])) as f:
        assert "something broke" in f.read()
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "batch8: failed (exit code 3, see logs/batch8.log)"
    assert out[-1] == "batch8  failed                          exit code 3, see logs/batch8.log"

    # The next run of the sweep retries the point.
    crashing.write_text("import sys\nsys.exit(1)\n")
    assert sweep.main(["--name", "crash", "--batch", "8", "--", *BASE]) == 1
    assert "batch8: started" in capsys.readouterr().out
    assert table(sweep_dir)["batch8"]["exit_code"] == 1


def test_grid_file_and_dry_run(results_env, tmp_path, capsys):
    grid_file = tmp_path / "grid.json"
    grid_file.write_text(json.dumps({"lr": [0.05, 0.1], "classes": [[1, 9]], "momentum": 0.9, "nesterov": [True, False]}))
    assert sweep.main(["--name", "file", "--grid", str(grid_file), "--batch", "8", "--dry-run", "--", *BASE]) == 0
    runs = os.path.join(sweep_folder("file"), "runs")
    expected = []
    for lr in ("0.05", "0.1"):
        for nesterov in (["--nesterov"], []):
            name = f"batch8_lr{lr}_classes1-9_momentum0.9_nesterov-{'on' if nesterov else 'off'}"
            expected.append(shlex.join([sys.executable, TRAINING_SCRIPT, "--batch", "8", "--lr", lr, "--classes", "1", "9",
                                      "--momentum", "0.9", *nesterov, *BASE, "--run-dir", os.path.join(runs, name)]))
    assert capsys.readouterr().out.splitlines() == expected
    assert not os.path.exists(sweep_folder("file"))


def test_yaml_grid_file_equals_the_json_one(results_env, tmp_path, capsys):
    as_json = {"lr": [0.05, 0.1], "classes": [[1, 9]], "momentum": 0.9, "nesterov": [True, False]}
    (tmp_path / "grid.json").write_text(json.dumps(as_json))
    (tmp_path / "grid.yaml").write_text("lr: [0.05, 0.1]\nclasses:\n  - [1, 9]\nmomentum: 0.9\nnesterov: [true, false]\n")
    assert load_grid_file(str(tmp_path / "grid.yaml")) == load_grid_file(str(tmp_path / "grid.json"))
    printed = []
    for name in ("grid.json", "grid.yaml"):
        assert sweep.main(["--name", "file", "--grid", str(tmp_path / name), "--batch", "8", "--dry-run", "--", *BASE]) == 0
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1] and len(printed[0].splitlines()) == 4


def test_grid_tokens():
    assert parse_grid_tokens(["--lr=0.1", "0.2", "--init-seed", "-1", "2", "--adam", "off", "on", "--classes", "1,9", "3,5"]) == {
        "lr": ["0.1", "0.2"], "init-seed": ["-1", "2"], "adam": [False, True], "classes": [["1", "9"], ["3", "5"]]}


@pytest.mark.parametrize("argv, fragment", [
    (["--lr", "0.1", "--bogus", "1"], "--bogus is not a training.py flag"),
    (["--lr", "--batch", "8"], "--lr has no values"),
    (["--", "--steps", "5"], "the grid is empty"),
    (["--lr", "0.1", "--", "--run-dir", "x"], "--run-dir is set by the sweep"),
    (["--lr", "0.1", "0.2", "--", "--lr", "0.3"], "--lr is both a grid flag and a flag after --"),
    (["--lr", "-1", "0.1"], "grid point lr-1: --lr must be a positive number"),
    (["--lambdamax", "false", "true", "--", "--lambdamax-every", "5"], "--lambdamax-every paces --lambdamax, which is off"),
    (["--batch", "8.5"], "invalid int value: '8.5'"),
    (["--lr", "0.1", "0.10"], "grid points lr0.1 and lr0.10 are the same run"),
    (["--adam", "maybe"], "--adam is a switch"),
    (["--dataset", "a/b", "a_b"], "two grid points get the folder name dataseta-b"),
    (["--lr", "0.1", "--lr", "0.2"], "--lr is given twice"),
    (["--lr", "0.1", "--", "--bogus"], "flags after --: unrecognized arguments: --bogus"),
    (["--lr", "0.1", "--jobs", "0"], "--jobs must be at least 1"),
    (["--lr", "0.1", "--partition", "gpu"], "--partition applies to --executor slurm only"),
    (["--lr", "0.1", "--gpus-per-run", "2"], "--gpus-per-run applies to --executor slurm only"),
    (["--lr", "0.1", "--time-min=30"], "--time-min applies to --executor slurm only"),
    (["--lr", "0.1", "--executor", "slurm", "--jobs", "2"], "--jobs applies to --executor local only"),
    (["--lr", "0.1", "--grid", "{tmp}/bad.json"], "is not valid JSON"),
    (["--lr", "0.1", "--grid", "{tmp}/list.json"], "must hold a mapping of flag to values"),
    (["--grid", "{tmp}/missing.json"], "cannot read the grid file"),
    (["--grid", "{tmp}/grid.yaml"], "needs PyYAML (pip install pyyaml); or write the grid as JSON"),
    (["--lr", "0.1", "--executor", "slurm"], "--executor slurm needs submitit"),
])
def test_errors_exit_2_with_one_line(results_env, monkeypatch, capsys, argv, fragment):
    (results_env / "bad.json").write_text('{"lr": [0.1,')
    (results_env / "list.json").write_text("[0.1, 0.2]")
    (results_env / "grid.yaml").write_text("lr: [0.1, 0.2]\n")
    monkeypatch.setitem(sys.modules, "yaml", None)
    monkeypatch.setitem(sys.modules, "submitit", None)
    argv = [a.format(tmp=results_env) for a in argv]
    assert sweep.main(["--name", "bad", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sweep.py: error: ") and fragment in err, err
    assert not os.path.exists(sweep_folder("bad"))


def test_sweep_name_errors(results_env, capsys):
    prepare_sweep(sweep_folder("taken"), define_sweep("taken", {"lr": ["0.1"]}, BASE))
    for argv, fragment in [
        (["--name", "taken", "--lr", "0.2", "--dry-run", "--", *BASE], "already exists with a different grid"),
        (["--name", "taken", "--lr", "0.1", "--", "--width", "32", "--num-data", "120", "--steps", "20"],
         "already exists with a different grid"),
        (["--name", "a/b", "--lr", "0.1"], "must be a folder name"),
        (["status", "--name", "nowhere"], "no sweep at"),
        (["status", str(results_env)], "is not a sweep folder"),
    ]:
        assert sweep.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and fragment in err, err
    # The same shared flags in another order and without --quiet make the same sweep.
    assert sweep.main(["--name", "taken", "--lr", "0.1", "--dry-run", "--", "--steps", "20", "--num-data", "120",
                       "--width", "16"]) == 0


def test_runs_split_the_cpu_threads_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(utils.sweep, "available_cpus", lambda: 8)
    assert local_threads(1) == 8 and local_threads(3) == 2 and local_threads(16) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert local_threads(2) == 5
    env = training_env(3)  # what a SLURM job's --cpus-per-run sets, whatever the login shell exported
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"
