"""compute_final_gHg.py end to end: the gHg family at the final checkpoint against the measurement functions."""

import json
import math

import pandas as pd
import pytest
import torch

import compute_final_gHg
import sharpness_gap
from analysis_runs import (check_bad_input, copy_run, final_model, missing_folder, no_checkpoints, runs,  # noqa: F401
                           unknown_version)
from curvature_reference import forbid_fast_routes
from utils.analysis import default_batch_sizes, estimates_at_sample_limit, gni_all_batch_sizes
from utils.estimators import measurement_generator
from utils.losses import mse_loss
from utils.measures import batch_sharpness, batch_sharpness_ratio, gni, gni_by_batch_size


def test_ghg_matches_the_measurement_functions(runs, tmp_path, capsys):
    out = tmp_path / "out"
    assert compute_final_gHg.main([str(runs["a"]), "--batch-sizes", "4", "32", "--max-samples", "25",
                                   "--out", str(out), "--cpu", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'final_ghg.csv'}" in printed
    record = json.loads((out / "final_ghg.json").read_text())
    targets = {"batch_sharpness": 0.005, "batch_sharpness_ratio": 0.005, "gni": 0.01}
    capped = [(b, name) for b, values in record["batch_sizes"].items() for name, target in targets.items()
              if values[f"{name}_n"] == 25 and values[f"{name}_se"] > target * abs(values[name])]
    assert capped, "25 samples are too few for any estimate of this run to reach its target"
    assert printed.count("note: ") == len(capped) + 1
    for b, name in capped:
        assert f"note: {name} at b={b} stopped at the 25-sample limit" in printed
    # The training batch size 8 is measured whatever --batch-sizes says.
    assert sorted(record["batch_sizes"], key=int) == ["4", "8", "32"] and record["training_batch"] == 8
    assert record["step"] == 30 and record["gni_method"] == "tr(HS) identity"

    run, setup, step = final_model(runs["a"])
    args = (setup.model, setup.loss_fn, setup.data.X_train, setup.data.Y_train)
    identity = gni_by_batch_size(*args, [4, 8, 32], generator=measurement_generator(run.cfg.measure_seed, step),
                                 max_samples=25, min_samples=20)
    for b in (4, 8, 32):
        limits = {"generator": measurement_generator(run.cfg.measure_seed, step), "max_samples": 25, "min_samples": 20}
        expected = {"batch_sharpness": batch_sharpness(*args, b, **limits)}
        limits["generator"] = measurement_generator(run.cfg.measure_seed, step)
        expected["batch_sharpness_ratio"] = batch_sharpness_ratio(*args, b, **limits)
        expected["gni"] = identity[b]
        got = record["batch_sizes"][str(b)]
        for name, estimate in expected.items():
            assert (got[name], got[f"{name}_se"], got[f"{name}_n"]) == (estimate.value, estimate.se, estimate.n)
            assert 20 <= got[f"{name}_n"] <= 25 and got[f"{name}_se"] > 0

        # GNI from one tr(HS) estimate agrees with GNI measured at b alone, within their errors.
        limits["generator"] = measurement_generator(run.cfg.measure_seed, step)
        alone = gni(*args, b, **limits)
        assert abs(got["gni"] - alone.value) < 3 * math.hypot(got["gni_se"], alone.se)

    table = pd.read_csv(out / "final_ghg.csv")
    assert list(table["batch_size"]) == [4, 8, 32]
    assert table.loc[1, "gni"] == record["batch_sizes"]["8"]["gni"]


def test_exact_measurements_take_the_plain_path_with_the_same_values(runs, tmp_path, monkeypatch):
    common = [str(runs["a"]), "--batch-sizes", "4", "--max-samples", "25", "--dtype", "float64", "--cpu", "--quiet"]
    assert compute_final_gHg.main([*common, "--out", str(tmp_path / "fast")]) == 0
    forbid_fast_routes(monkeypatch)
    assert compute_final_gHg.main([*common, "--exact-measurements", "--out", str(tmp_path / "exact")]) == 0
    fast, exact = (json.loads((tmp_path / kind / "final_ghg.json").read_text()) for kind in ("fast", "exact"))
    assert (fast["exact_measurements"], exact["exact_measurements"]) == (False, True)
    for b in ("4", "8"):
        for name in ("batch_sharpness", "batch_sharpness_ratio", "gni"):
            assert exact["batch_sizes"][b][f"{name}_n"] == fast["batch_sizes"][b][f"{name}_n"]
            for column in (name, f"{name}_se"):
                assert exact["batch_sizes"][b][column] == pytest.approx(fast["batch_sizes"][b][column], rel=1e-9)


def test_gni_is_measured_per_batch_size_with_batchnorm():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    X, Y = torch.randn(12, 3), torch.randn(12, 1)
    assert gni_all_batch_sizes(model, mse_loss, X, Y, [4, 6], measure_seed=0, step=0) is None
    without = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    by_size = gni_all_batch_sizes(without, mse_loss, X, Y, [4, 6, 12], measure_seed=0, step=0, max_samples=20)
    assert sorted(by_size) == [4, 6, 12] and by_size[12].se == 0


def test_estimates_that_hit_the_sample_limit_short_of_their_target_are_named():
    def estimates(**overrides):
        values = {"batch_sharpness": 2.0, "batch_sharpness_se": 0.02, "batch_sharpness_n": 1000,
                  "batch_sharpness_ratio": -4.0, "batch_sharpness_ratio_se": 0.04, "batch_sharpness_ratio_n": 40,
                  "gni": 0.0, "gni_se": 0.5, "gni_n": 39}
        return {"batch_sizes": {"8": {**values, **overrides}}}

    assert estimates_at_sample_limit(estimates()) == [
        "batch_sharpness at b=8 stopped at the 1000-sample limit with a relative standard error of 1.00% (target 0.5%)"]
    assert estimates_at_sample_limit(estimates(), max_samples=39) == [
        "batch_sharpness at b=8 stopped at the 39-sample limit with a relative standard error of 1.00% (target 0.5%)",
        "batch_sharpness_ratio at b=8 stopped at the 39-sample limit with a relative standard error of 1.00% (target 0.5%)",
        "gni at b=8 stopped at the 39-sample limit with a standard error of 0.5 (target 1.0%)"]
    # At the limit but on target (just, or exactly as GNI at b = n), or short of the limit: no line.
    on_target = estimates(batch_sharpness_se=0.01, batch_sharpness_ratio_se=0.02, gni=3.0, gni_se=0.0)
    assert estimates_at_sample_limit(on_target, max_samples=39) == []
    assert estimates_at_sample_limit(estimates(), max_samples=1001) == []


def test_default_batch_sizes():
    assert default_batch_sizes(120, 8) == [1, 2, 4, 8, 16, 32, 64]
    assert default_batch_sizes(100, 12) == [1, 2, 4, 8, 12, 16, 32, 64]
    assert default_batch_sizes(64, 64) == [1, 2, 4, 8, 16, 32, 64]


def test_ghg_rejects_batch_sizes_above_n(runs, tmp_path, capsys):
    code = compute_final_gHg.main([str(runs["a"]), "--batch-sizes", "4", "500", "--out", str(tmp_path / "out"), "--cpu"])
    assert code == 2 and "500" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sharpness_gap_takes_batch_sharpness_from_final_ghg_json(runs, tmp_path):
    run_dir = copy_run(runs["a"], tmp_path)
    assert compute_final_gHg.main([str(run_dir), "--batch-sizes", "8", "--max-samples", "20", "--cpu"]) == 0
    assert sharpness_gap.main([str(run_dir), "--tail", "0.5"]) == 0
    row = pd.read_csv(run_dir / "sharpness_gap.csv").iloc[0]
    ghg = json.loads((run_dir / "final_ghg.json").read_text())["batch_sizes"]["8"]
    assert row["batch_sharpness_source"] == "final_ghg.json" and row["batch_sharpness"] == ghg["batch_sharpness"]
    assert row["batch_sharpness_se"] == ghg["batch_sharpness_se"] and row["lambda_max_source"] == "results.txt"


@pytest.mark.parametrize("damage", [missing_folder, unknown_version, no_checkpoints])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(runs, tmp_path, capsys, damage):
    check_bad_input(compute_final_gHg, ["--cpu", "--batch-sizes", "8", "--max-samples", "20"], damage, runs, tmp_path, capsys)
