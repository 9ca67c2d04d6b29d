"""One run over several processes (torch.distributed, Gloo on the CPU) equals the single-process run."""

import glob
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch

import compute_final_fullbs
import compute_final_gHg
import sweep
import training
from distributed_runs import launch
from run_checks import same_parameters, same_results
from utils import distributed, sharded
from utils.checkpoints import list_checkpoints, load_checkpoint
from utils.gauss_newton import GaussNewtonOperator
from utils.hvp import HessianOperator, num_params
from utils.losses import mse_loss
from utils.models import build_model
from utils.results import read_results
from utils.sharded import Rows, shard_range
from utils.sweep import TRAINING_SCRIPT, load_definition, point_command, sweep_folder

REL_TOL = 1e-5
BASE = ["--width", "16", "--num-data", "61", "--batch", "8", "--quiet", "--steps", "10", "--checkpoint-every", "4",
        "--full-loss-every", "3", "--lambdamax", "--measure-every", "4"]


def close(a, b, tol=REL_TOL) -> bool:
    return abs(a - b) <= tol * max(abs(a), abs(b), 1e-12) or (math.isnan(a) and math.isnan(b))


def assert_same_run(single, launched, *, counts=True, state_as_one_vector=False):
    """results.txt (time columns aside), final.json and the checkpoints of the single run agree to
    REL_TOL: each tensor of a checkpoint's model to REL_TOL of its largest entry, or with
    ``state_as_one_vector`` the whole floating state, |a - b| <= REL_TOL |a|."""
    a, b = read_results(os.path.join(single, "results.txt")), read_results(os.path.join(launched, "results.txt"))
    assert list(a.columns) == list(b.columns) and list(a["step"]) == list(b["step"])
    for column in a.columns:
        if column.endswith("_seconds") or column == "wall_time" or (not counts and column.endswith(("_hvps", "_n"))):
            continue
        for x, y in zip(a[column], b[column]):
            assert close(float(x), float(y)), (column, x, y)
    if os.path.exists(os.path.join(single, "final.json")):
        fa, fb = (json.load(open(os.path.join(d, "final.json"))) for d in (single, launched))
        assert fa.keys() == fb.keys() and all(close(fa[k], fb[k]) for k in fa), (fa, fb)
    launched_steps = dict(list_checkpoints(launched))
    for step, path in list_checkpoints(single):
        ma, mb = load_checkpoint(path)["model"], load_checkpoint(launched_steps[step])["model"]
        if state_as_one_vector:
            a, b = (torch.cat([t.double().reshape(-1) for t in m.values() if t.is_floating_point()]) for m in (ma, mb))
            assert (a - b).norm() <= REL_TOL * a.norm(), step
            continue
        for name in ma:
            assert torch.allclose(ma[name], mb[name], rtol=REL_TOL, atol=REL_TOL * ma[name].abs().max().item()), name


def single_run(tmp_path, argv, name="single"):
    run_dir = tmp_path / name
    assert training.main([*argv, "--run-dir", str(run_dir)]) == 0
    return run_dir


def launched_run(tmp_path, argv, size, name="launched", actions=()):
    run_dir = tmp_path / name
    result = launch(training.main, [*argv, "--run-dir", str(run_dir)], size, tmp_path / f"{name}_err", actions)
    return run_dir, result


# --- rows held by each rank -----------------------------------------------------------------


def test_shards_cover_the_rows_once_in_blocks_differing_by_one():
    n, size = 61, 3
    ranges = [shard_range(n, distributed.World(rank, size)) for rank in range(size)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


def test_a_batch_keeps_the_rows_held_here_in_batch_order_even_none():
    whole = torch.arange(10.0)[:, None]
    parts = [Rows.shard(whole, distributed.World(rank, 3)) for rank in range(3)]
    idx = torch.tensor([9, 0, 4, 1, 8])
    batches = [p[idx] for p in parts]
    assert [b.total for b in batches] == [5] * 3
    assert sorted(v for b in batches for v in b.local[:, 0].tolist()) == sorted(idx.tolist())
    assert batches[0].local[:, 0].tolist() == [0.0, 1.0] and batches[0].positions.tolist() == [1, 3]
    inner = batches[2][torch.tensor([0, 4, 2])]  # positions within the batch: rows 9, 8 (rank 2), 4 (rank 1)
    assert inner.local[:, 0].tolist() == [9.0, 8.0] and inner.total == 3
    assert parts[1][torch.tensor([0, 9])].count == 0 and parts[1][torch.tensor([0, 9])].weight == 0


# --- whole runs -------------------------------------------------------------------------------


def test_mlp_on_two_processes_is_the_single_process_run(results_env):
    argv = [*BASE, "--batch-sharpness", "--step-sharpness", "--lambda-min", "--final"]  # final.json: lambda_max, Batch Sharpness, GNI
    single = single_run(results_env, argv)
    launched, result = launched_run(results_env, argv, 2)
    assert result.exit_codes == [0, 0], result.stderr
    assert_same_run(single, launched)
    config = json.load(open(launched / "config.json"))
    assert config["launch"] == {"world_size": 2, "backend": "gloo"}
    assert sorted(os.listdir(launched)) == sorted(os.listdir(single))


def test_closed_forms_of_gni_and_gradient_norm_on_two_processes_are_the_single_process_ones(results_env):
    """n = 24: gradient_norm takes the closed form at once (n <= 20 b), GNI after the first 20 batches
    predict more than n + 1 further ones; every rank makes both choices as one process does."""
    argv = ["--width", "16", "--num-data", "24", "--batch", "8", "--quiet", "--steps", "3", "--measure-every", "1",
            "--gni", "--gradient-norm"]
    single = single_run(results_env, argv)
    launched, result = launched_run(results_env, argv, 2)
    assert result.exit_codes == [0, 0], result.stderr
    assert_same_run(single, launched)
    records = [json.load(open(run / "config.json"))["resolved"]["closed_forms"] for run in (single, launched)]
    assert records[0] == records[1] == ["gni", "gradient_norm"]
    counts = [json.load(open(run / "summary.json"))["estimates"] for run in (single, launched)]
    assert counts[0] == counts[1] and counts[1]["gni"]["exact"] == counts[1]["grad_norm_sq_batch"]["exact"] == 3
    assert list(read_results(os.path.join(launched, "results.txt"))["gni_hvps"]) == [45] * 3  # 20 batches, n + 1


def test_cnn_on_three_processes_with_uneven_and_empty_parts(results_env):
    argv = ["--model", "cnn", "--dataset", "synthetic", "--input-shape", "1,12,12", "--num-classes", "3",
            "--width", "4", "--depth", "2", "--num-data", "23", "--batch", "2", "--quiet", "--steps", "5",
            "--checkpoint-every", "4", "--full-loss-every", "2", "--lambdamax", "--batch-sharpness",
            "--momentum", "0.9", "--measure-every", "4", "--gni", "--final"]  # GNI in closed form, final.json
    single = single_run(results_env, argv)
    launched, result = launched_run(results_env, argv, 3)
    assert result.exit_codes == [0, 0, 0], result.stderr
    assert_same_run(single, launched)
    assert json.load(open(launched / "config.json"))["resolved"]["closed_forms"] == ["gni"]


def test_sigterm_on_one_rank_checkpoints_and_the_run_resumes_on_another_world_size(results_env):
    single = single_run(results_env, BASE)
    launched, result = launched_run(results_env, BASE, 2, actions=[("sigterm", 1, 5)])
    assert result.exit_codes == [143, 143], result.stderr
    summary = json.load(open(launched / "summary.json"))
    assert summary["status"] == "interrupted" and summary["final_step"] == 6
    assert training.main(["--resume", str(launched), "--quiet"]) == 0  # the rest in one process
    assert_same_run(single, launched)


def test_a_single_process_run_resumes_on_two_processes(results_env):
    single = single_run(results_env, BASE)
    interrupted, result = launched_run(results_env, BASE, 1, actions=[("sigterm", 0, 5)])
    assert result.exit_codes == [143], result.stderr
    assert json.load(open(interrupted / "summary.json"))["final_step"] == 6
    result = launch(training.main, ["--resume", str(interrupted), "--quiet"], 2, results_env / "resume_err")
    assert result.exit_codes == [0, 0], result.stderr
    assert_same_run(single, interrupted)
    record = json.load(open(interrupted / "config.json"))
    assert record["launch"]["world_size"] == 1
    assert [(r["step"], r["world_size"], r["backend"]) for r in record["resumes"]] == [(6, 2, "gloo")]


def test_a_killed_rank_ends_the_job_with_one_line(results_env):
    launched, result = launched_run(results_env, BASE, 2, actions=[("kill", 1, 2)])
    assert result.exit_codes[1] == 9 and result.exit_codes[0] == 2, result.stderr
    message = result.stderr[0].strip().splitlines()[-1]
    assert message.startswith("training.py: error: rank 0 of 2 lost its peers") and "--resume" in message
    assert list_checkpoints(launched)  # the folder keeps what it had, resumable


def test_a_signal_while_a_peer_hangs_ends_within_the_signal_timeout(results_env, monkeypatch):
    # Without the shorter wait rank 0 would sit in the stop's collective until the hung peer died
    # (HANG_S later) and then report a lost peer, not the signal.
    monkeypatch.setenv("EOSS_DIST_SIGNAL_TIMEOUT", "2")
    launched, result = launched_run(results_env, BASE, 2, actions=[("hang", 1, 3), ("sigterm", 0, 3)])
    assert result.exit_codes == [2, 9], result.stderr
    message = result.stderr[0].strip().splitlines()[-1]
    assert message.startswith("training.py: error: rank 0 of 2 caught SIGTERM and its peers did not join the stop "
                              "within 2 s (EOSS_DIST_SIGNAL_TIMEOUT"), message
    assert "--resume" in message and list_checkpoints(launched)


def _coupled_parts(argv):
    """On each rank of a launch: a float64 resnet_bn's gradient, H v and G v (Gauss-Newton) on the
    whole data and on a batch, and its running statistics after one step; rank 0 saves them to argv[0]."""
    world = distributed.init(torch.device("cpu"))
    try:
        model, X, Y = _bn_case()
        X, Y = Rows.shard(X, world), Rows.shard(Y, world)
        parts = _bn_parts(model, X, Y)
        if world.is_main:
            torch.save(parts, argv[0])
    finally:
        distributed.close()
    return 0


def _bn_case():
    torch.manual_seed(0)
    model = build_model("resnet_bn", (2, 6, 6), 3, width=4).double()
    X = torch.randn(11, 2, 6, 6, dtype=torch.float64)
    return model, X, torch.randn(11, 3, dtype=torch.float64)


BN_BATCH = torch.tensor([4, 0, 5, 1, 3, 7])  # of 11 rows over three ranks: 2, 3 and 1 of them


def _bn_parts(model, X, Y):
    v = torch.randn(num_params(model), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    parts = {}
    for name, (x, y) in {"whole": (X, Y), "batch": (X[BN_BATCH], Y[BN_BATCH])}.items():
        op = sharded.operator(HessianOperator, model, mse_loss, x, y)
        parts[name] = (op.gradient(), op.matvec(v),
                       sharded.operator(GaussNewtonOperator, model, mse_loss, x, y).matvec(v))
    model.train()
    xb, yb = X[BN_BATCH[:4]], Y[BN_BATCH[:4]]  # no rows on rank 2
    if sharded.is_sharded(xb):
        sharded.mean_loss_backward(model, mse_loss, xb, yb)
    else:
        mse_loss(model(xb), yb).backward()
    parts["step"] = (torch.cat([p.grad.reshape(-1) for p in model.parameters()]),
                     torch.cat([b.double().reshape(-1) for b in model.buffers()]))
    return parts


def test_train_mode_batchnorm_over_three_processes_takes_the_whole_batch_statistics(results_env):
    """Gradients, Hessian and Gauss-Newton products and a step's running statistics of a float64 resnet_bn, with
    a rank that holds none of the batch, equal one process's (F.batch_norm) to round-off."""
    single = _bn_parts(*_bn_case())
    result = launch(_coupled_parts, [str(results_env / "parts.pt")], 3, results_env / "err")
    assert result.exit_codes == [0, 0, 0], result.stderr
    launched = torch.load(results_env / "parts.pt")
    for name in single:
        for a, b in zip(single[name], launched[name]):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-10 * a.abs().max().item()), name


def test_resnet_bn_on_two_processes_is_the_single_process_run(results_env):
    """Train-mode BatchNorm steps over batches of 4 split unevenly; lambda_max and lambda_min on
    the whole data, the step sharpness on the step's batch. The checkpoints are compared as one
    vector: in float32 the BatchNorm biases, whose gradients are small differences of large
    sums, agree only to about 3e-5 of their largest entry after 4 steps (the whole state to
    7e-7). (Batch Sharpness and GNI take the routes the MLP and CNN runs check, at a thousand
    resnet_bn batches a measurement here, and so does final.json: --final would add 40 s to one
    process alone.)"""
    argv = ["--model", "resnet_bn", "--dataset", "synthetic", "--input-shape", "3,8,8", "--num-classes", "3",
            "--width", "4", "--num-data", "12", "--batch", "4", "--lr", "0.01", "--quiet", "--steps", "4",
            "--checkpoint-every", "2", "--full-loss-every", "2", "--lambdamax", "--lambda-min", "--step-sharpness",
            "--measure-every", "2"]
    single = single_run(results_env, argv)
    launched, result = launched_run(results_env, argv, 2)
    assert result.exit_codes == [0, 0], result.stderr
    assert_same_run(single, launched, state_as_one_vector=True)


def test_hvp_chunks_of_batchnorm_models_are_refused_under_a_launch(results_env):
    argv = ["--model", "resnet_bn", "--dataset", "synthetic", "--input-shape", "3,8,8", "--width", "4",
            "--num-data", "16", "--batch", "4", "--steps", "2", "--quiet", "--hvp-chunk", "8"]
    _, result = launched_run(results_env, argv, 2)
    assert result.exit_codes == [2, 2]
    assert "--hvp-chunk" in result.stderr[0].strip().splitlines()[-1]


def test_timeout_must_be_a_positive_number(monkeypatch):
    monkeypatch.setenv(distributed.TIMEOUT_VARIABLE, "soon")
    with pytest.raises(distributed.UserError, match="EOSS_DIST_TIMEOUT"):
        distributed.timeout_seconds()
    monkeypatch.setenv(distributed.TIMEOUT_VARIABLE, "2.5")
    assert distributed.timeout_seconds() == 2.5


def test_outside_a_launch_nothing_is_set_up(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.init(torch.device("cpu")) is distributed.SINGLE
    assert distributed.from_main(lambda: 3) == 3 and not distributed.any_rank(False)
    assert np.array_equal(distributed.all_reduce_sum(torch.ones(2)).numpy(), np.ones(2))


def test_end_of_run_analyses_under_a_launch_equal_one_process(results_env):
    run_dir = single_run(results_env, ["--width", "16", "--num-data", "61", "--batch", "8", "--quiet", "--steps", "4"])
    fullbs = ["--tol", "1e-6"]
    ghg = ["--batch-sizes", "16", "--max-samples", "40"]
    assert compute_final_fullbs.main([str(run_dir), *fullbs, "--out", str(results_env / "one")]) == 0
    assert compute_final_gHg.main([str(run_dir), *ghg, "--out", str(results_env / "one")]) == 0
    for main, flags in ((compute_final_fullbs.main, fullbs), (compute_final_gHg.main, ghg)):
        result = launch(main, [str(run_dir), *flags, "--out", str(results_env / "two")], 2, results_env / "err")
        assert result.exit_codes == [0, 0], result.stderr
    one, two = (json.load(open(results_env / d / "final_fullbs.json")) for d in ("one", "two"))
    assert one["step"] == two["step"] == 4 and close(one["lambda_max"], two["lambda_max"])
    one, two = (json.load(open(results_env / d / "final_ghg.json")) for d in ("one", "two"))
    assert one["gni_method"] == two["gni_method"] == "tr(HS) identity"
    for b in ("8", "16"):
        for name in ("batch_sharpness", "batch_sharpness_ratio", "gni", "gni_se"):
            assert close(one["batch_sizes"][b][name], two["batch_sizes"][b][name]), (b, name)


def test_sweep_gpus_per_run_submits_one_torchrun_launch_per_point(results_env, monkeypatch, capsys):
    """Against stand-ins for srun and sbatch: K GPUs per task, and each point's job starts torchrun with K processes."""
    bin_dir = results_env / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\n")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {results_env}/sbatch.sh\necho "Submitted batch job 7"\n')
    for name in ("srun", "sbatch"):
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert sweep.main(["--name", "wide", "--lr", "0.05", "0.1", "--executor", "slurm", "--gpus-per-run", "4",
                       "--cpus-per-run", "8", "--", "--steps", "5", "--quiet"]) == 0
    script = (results_env / "sbatch.sh").read_text().splitlines()
    assert "#SBATCH --gpus-per-node=4" in script and "#SBATCH --cpus-per-task=8" in script
    sweep_dir = sweep_folder("wide")
    jobs = [pickle.load(open(path, "rb")) for path in glob.glob(os.path.join(sweep_dir, "submitit", "*_submitted.pkl"))]
    assert sorted((job.function.processes, job.function.threads) for job in jobs) == [(4, 2), (4, 2)]
    definition = load_definition(sweep_dir)
    command = point_command(sweep_dir, definition, definition["points"][0], python="python", processes=4)
    assert command[:7] == ["python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
                           TRAINING_SCRIPT]


def test_a_launch_is_bit_identical_from_run_to_run(results_env):
    first, result = launched_run(results_env, BASE, 2, name="first")
    assert result.exit_codes == [0, 0], result.stderr
    second, result = launched_run(results_env, BASE, 2, name="second")
    assert result.exit_codes == [0, 0], result.stderr
    same_results(first, second)
    for step, _ in list_checkpoints(first):
        same_parameters(first, second, step)
