"""training.py end to end, in-process through main(argv), plus two subprocess smoke tests."""

import json
import os
import re
import subprocess
import sys

import pandas as pd
import pytest
import torch

import training
from run_checks import without_timing
from utils.checkpoints import list_checkpoints, load_checkpoint
from utils.results import read_results

SMALL = ["--width", "16", "--num-data", "200", "--batch", "16", "--quiet"]


def train(tmp_path, *extra, name="run"):
    run_dir = tmp_path / name
    code = training.main([*SMALL, "--run-dir", str(run_dir), *extra])
    return code, run_dir


def test_run_folder_contract(results_env, capsys):
    code, run_dir = train(results_env, "--steps", "30", "--checkpoint-every", "10")
    assert code == 0
    assert f"run folder: {run_dir}" in capsys.readouterr().out
    frame = read_results(run_dir / "results.txt")
    for column in ("epoch", "step", "batch_loss", "full_loss", "full_accuracy", "wall_time"):
        assert column in frame.columns
    assert list(frame["step"]) == list(range(30))
    assert frame["full_loss"].notna().iloc[0] and frame["batch_loss"].notna().all()
    assert (frame["wall_time"].diff().dropna() >= 0).all()
    lines = (run_dir / "results.txt").read_text().splitlines()
    assert lines[0].startswith("# ") and lines[1].startswith("# command: training.py")

    record = json.loads((run_dir / "config.json").read_text())
    assert record["version"] == 1
    assert record["config"]["lr"] == 0.05 and record["config"]["dataset"] == "digits"
    assert record["resolved"]["num_train"] == 200 and record["resolved"]["total_steps"] == 30
    assert record["resolved"]["num_params"] == 64 * 16 + 16 + 16 * 16 + 16 + 16 * 10 + 10
    assert record["resolved"]["hvp_mode"] == "double-backward"  # the fastest exact mode on a CPU
    assert record["resolved"]["batch_route"] == "stacked-gram"
    assert record["resolved"]["closed_forms"] == []
    assert "torch" in record["versions"] and record["device"] == "cpu"

    steps = [step for step, _ in list_checkpoints(run_dir)]
    assert steps == [0, 10, 20, 30]
    state = load_checkpoint(list_checkpoints(run_dir)[-1][1])
    assert {"model", "optimizer", "step", "epoch", "rng"} <= set(state)
    assert state["step"] == 30

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["final_step"] == 30
    assert 0 <= summary["final_test_accuracy"] <= 1


def test_identical_seeds_give_identical_results(results_env):
    args = ("--steps", "25", "--lambdamax", "--batch-sharpness", "--measure-every", "8")
    train(results_env, *args, name="a")
    train(results_env, *args, name="b")
    a = read_results(results_env / "a" / "results.txt")
    b = read_results(results_env / "b" / "results.txt")
    pd.testing.assert_frame_equal(without_timing(a), without_timing(b))
    assert a["lambda_max"].notna().sum() == 4  # steps 0, 8, 16, 24
    c_code, _ = train(results_env, "--steps", "25", "--init-seed", "3", name="c")
    c = read_results(results_env / "c" / "results.txt")
    assert not c["batch_loss"].equals(a["batch_loss"])


def test_trained_parameters_match_a_manual_sgd_loop(results_env):
    """The loop is plain SGD over seeded per-epoch permutations, nothing hidden."""
    from utils.data import load_dataset
    from utils.losses import mse_loss
    from utils.models import build_model
    from utils.training import epoch_permutation

    _, run_dir = train(results_env, "--steps", "15", "--checkpoint-every", "100")
    data = load_dataset("digits", root=".", num_data=200)
    model = build_model("mlp", data.input_shape, data.output_dim, width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    per_epoch = 200 // 16
    for step in range(15):
        epoch, pos = divmod(step, per_epoch)
        idx = epoch_permutation(1, epoch, 200)[pos * 16:(pos + 1) * 16]
        opt.zero_grad()
        mse_loss(model(data.X_train[idx]), data.Y_train[idx]).backward()
        opt.step()
    saved = load_checkpoint(str(run_dir / "checkpoints" / "step_15.pt"))["model"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(saved[name], tensor), name


def test_epochs_drop_the_last_partial_batch(results_env):
    code, run_dir = train(results_env, "--epochs", "2")
    frame = read_results(run_dir / "results.txt")
    assert len(frame) == 2 * (200 // 16)
    assert list(frame["epoch"].unique()) == [0, 1]


def test_log_every_and_keep_checkpoints(results_env):
    code, run_dir = train(results_env, "--steps", "20", "--log-every", "5", "--full-loss-every", "10",
                          "--checkpoint-every", "4", "--keep-checkpoints", "2")
    frame = read_results(run_dir / "results.txt")
    assert list(frame["step"]) == [0, 5, 10, 15, 19]
    assert [s for s, _ in list_checkpoints(run_dir)] == [16, 20]


def test_stop_loss_and_divergence(results_env):
    code, run_dir = train(results_env, "--steps", "20", "--stop-loss", "100", name="stop")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert code == 0 and summary["status"] == "stopped_at_loss" and summary["final_step"] == 0

    code, run_dir = train(results_env, "--steps", "50", "--lr", "1e4", name="div")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert code == 0 and summary["status"] == "diverged"
    frame = read_results(run_dir / "results.txt")
    assert not torch.isfinite(torch.tensor(frame["batch_loss"].iloc[-1]))
    assert len(frame) == summary["final_step"] + 1


def test_default_run_folder_name(results_env):
    code = training.main([*SMALL, "--steps", "3", "--lr", "0.02"])
    code2 = training.main([*SMALL, "--steps", "3", "--lr", "0.02"])
    folders = sorted(os.listdir(results_env / "results" / "digits_mlp"))
    assert code == code2 == 0 and len(folders) == 2
    assert all("_lr0.02_b16" in f for f in folders)


@pytest.mark.parametrize("argv, fragment", [
    (["--lr", "0"], "--lr"),
    (["--lr", "-1"], "--lr"),
    (["--batch", "0"], "--batch"),
    (["--num-data", "100", "--batch", "500"], "larger than the training set"),
    (["--steps", "5", "--epochs", "1"], "either --steps or --epochs"),
    (["--dataset", "imagenet"], "unknown data set"),
    (["--model", "transformer"], "unknown model"),
    (["--loss", "hinge"], "unknown loss"),
    (["--activation", "relu6"], "unknown activation"),
    (["--model", "cnn"], "cnn"),
    (["--classes", "1", "11"], "11"),
    (["--num-data", "5000"], "5000"),
    (["--momentum", "0.9", "--adam"], "--adam"),
    (["--lr", "abc"], "--lr"),
    (["--no-such-flag"], "--no-such-flag"),
    (["--dataset", "cifar10"], "--download"),
    (["--model", "linear", "--lambdamax", "--num-eigenvalues", "700", "--eig-method", "lobpcg"], "at most 650"),
    (["--lambdamax-every", "5"], "--lambdamax-every paces --lambdamax, which is off; add --lambdamax"),
    (["--gni", "--batch-sharpness-every", "5"], "--batch-sharpness-every paces --batch-sharpness, which is off"),
])
def test_user_errors_exit_2_with_one_line(results_env, capsys, argv, fragment):
    code = training.main(["--quiet", "--steps", "2", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("training.py: error:") and fragment in err
    assert not (results_env / "results").exists() or not any((results_env / "results").rglob("config.json"))


def test_unwritable_results_folder(results_env, capsys, monkeypatch):
    blocker = results_env / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("RESULTS", str(blocker / "results"))
    code = training.main([*SMALL, "--steps", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "$RESULTS" in err


def test_existing_run_dir_is_never_overwritten(results_env, capsys):
    train(results_env, "--steps", "2")
    before = (results_env / "run" / "results.txt").read_text()
    code, _ = train(results_env, "--steps", "3")
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert (results_env / "run" / "results.txt").read_text() == before


def test_progress_lines_show_the_latest_measurements(results_env, capsys):
    """Off a terminal a line every tenth of the run, carrying values measured at earlier steps."""
    assert training.main(["--width", "16", "--num-data", "200", "--batch", "16", "--steps", "40", "--lambdamax",
                          "--measure-every", "7", "--full-loss-every", "7", "--run-dir", str(results_env / "run")]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [f"step {k}/40" for k in range(4, 41, 4)]
    assert all("batch_loss=" in line and "full_loss=" in line and "lambda_max=" in line for line in lines)
    # Values from earlier rows carry their step; the measurement cadence is every 7 steps.
    assert "lambda_max=" in lines[0] and " @3" not in lines[0]  # step 4/40 shows row 3, no measurement there
    assert re.search(r"lambda_max=\S+ @0\b", lines[0]) and re.search(r"lambda_max=\S+ @35\b", lines[-1])
    assert re.search(r"batch_loss=[^ ,]+,", lines[-1])  # the newest row's own value has no mark


def test_estimates_stopped_by_the_sample_cap_are_counted_and_shown(results_env, capsys, monkeypatch):
    """A target no sample count meets: every Batch Sharpness estimate stops at the cap, which the
    progress line and summary.json say, counted over the whole run also when it was resumed."""
    import functools

    from utils import registry
    capped = functools.partial(registry.measures.batch_sharpness, max_samples=20, rel_se=0.0)
    monkeypatch.setattr(registry.measures, "batch_sharpness", capped)
    run_dir = results_env / "run"
    args = ["--width", "16", "--num-data", "200", "--batch", "16", "--steps", "10", "--batch-sharpness",
            "--gni", "--gradient-norm", "--measure-every", "3", "--checkpoint-every", "5", "--run-dir", str(run_dir)]
    assert training.main(args) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert "; stopped at the sample cap: batch_sharpness 4/4" in lines[-1]
    summary = json.loads((run_dir / "summary.json").read_text())
    frame = read_results(run_dir / "results.txt")
    assert summary["estimates"]["batch_sharpness"] == {"measured": 4, "stopped_at_cap": 4, "exact": 0}
    assert summary["estimates"]["gni"]["measured"] == 4
    assert json.loads((run_dir / "config.json").read_text())["resolved"]["closed_forms"] == ["gni", "gradient_norm"]
    # n = 200 per-sample gradients cost less than 20 batches of 16: every one in closed form
    assert summary["estimates"]["grad_norm_sq_batch"] == {"measured": 4, "stopped_at_cap": 0, "exact": 4}
    assert (frame["grad_norm_sq_batch_n"].dropna() == 0).all() and (frame["grad_norm_sq_batch_se"].dropna() == 0).all()
    assert (frame["batch_sharpness_n"].dropna() == 20).all()

    state = load_checkpoint(run_dir / "checkpoints" / "step_5.pt")
    assert state["estimate_counts"]["batch_sharpness"]["measured"] == 2  # steps 0 and 3
    os.unlink(run_dir / "summary.json")
    os.unlink(run_dir / "checkpoints" / "step_10.pt")
    assert training.main(["--resume", str(run_dir), "--quiet"]) == 0
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["estimates"] == summary["estimates"]


def test_unconverged_eigen_solver_warns_with_its_residual_and_the_run_goes_on(results_env):
    with pytest.warns(UserWarning, match=r"step 0: lambda_max solver stopped at relative residual \d\.\d\de-\d+ "
                                         r"above --eig-tol 1e-09"):
        code, run_dir = train(results_env, "--steps", "3", "--lambdamax", "--measure-every", "5",
                              "--eig-method", "power", "--eig-tol", "1e-9")
    frame = read_results(run_dir / "results.txt")
    assert code == 0 and list(frame["step"]) == [0, 1, 2]
    assert frame["lambda_max"].iloc[0] > 0 and frame["lambda_max"].iloc[1:].isna().all()


def test_subprocess_smoke(results_env):
    env = {**os.environ, "RESULTS": str(results_env / "results")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "training.py", *SMALL, "--steps", "5"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    run_dir = done.stdout.strip().splitlines()[-1].removeprefix("run folder: ")
    assert os.path.isfile(os.path.join(run_dir, "results.txt"))
    bad = subprocess.run([sys.executable, "training.py", "--lr", "-1"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


def test_final_json_matches_the_dense_hessian(results_env):
    """--final: the top three eigenvalues at tol 1e-4 on the final parameters, against eigvalsh of the exact Hessian."""
    from torch.func import functional_call, grad, jacrev

    from utils.data import load_dataset
    from utils.losses import mse_loss
    from utils.models import build_model

    run_dir = results_env / "final"
    assert training.main(["--width", "8", "--num-data", "60", "--batch", "10", "--steps", "12", "--quiet",
                          "--final", "--num-eigenvalues", "3", "--run-dir", str(run_dir)]) == 0
    final = json.loads((run_dir / "final.json").read_text())
    assert set(final) == {"step", "lambda_max", "lambda_2", "lambda_3", "batch_sharpness", "batch_sharpness_se",
                          "gni", "gni_se"}
    assert final["step"] == 12 and final["batch_sharpness_se"] > 0 and final["gni_se"] > 0

    data = load_dataset("digits", root=".", num_data=60)
    model = build_model("mlp", data.input_shape, data.output_dim, width=8).double()
    model.load_state_dict(load_checkpoint(str(run_dir / "checkpoints" / "step_12.pt"))["model"])
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    X, Y = data.X_train.double(), data.Y_train.double()

    def loss(flat):
        pieces, start = {}, 0
        for name, shape in zip(names, shapes):
            pieces[name] = flat[start:start + shape.numel()].reshape(shape)
            start += shape.numel()
        return mse_loss(functional_call(model, pieces, (X,)), Y)

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    exact = torch.linalg.eigvalsh(jacrev(grad(loss))(flat)).flip(0)[:3].tolist()
    for name, value in zip(("lambda_max", "lambda_2", "lambda_3"), exact):
        assert abs(final[name] - value) <= 2e-4 * abs(value), name


def test_json_files_are_strict_and_readable_by_others(results_env):
    code, run_dir = train(results_env, "--steps", "50", "--lr", "1e4")
    text = (run_dir / "summary.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text)
    for name in ("summary.json", "config.json", "checkpoints/step_0.pt"):
        assert (run_dir / name).stat().st_mode & 0o044 == 0o044, name
