"""λ_min, the gradient overlap, per-layer curvature and the spectral density as training.py
measurements: their columns, files, reuse of the λ_max eigenvectors, final.json, resume."""

import json

import pandas as pd
import pytest

import training
from run_checks import interrupt_at, same_results
from utils.results import read_results

SPECTRUM = ["--dataset", "digits", "--num-data", "48", "--width", "6", "--batch", "8", "--lr", "0.1", "--steps", "4",
            "--measure-every", "2", "--checkpoint-every", "2", "--quiet", "--cpu", "--lambdamax", "--num-eigenvalues",
            "2", "--lambda-min", "--gradient-overlap", "2", "--layer-sharpness", "--layer-groups", "module",
            "--spectral-density", "--density-probes", "3", "--density-steps", "5", "--final"]
MODULES = ("1", "3", "5")  # Flatten, Linear, ReLU, Linear, ReLU, Linear


def test_columns_files_and_final_record(tmp_path):
    run_dir = tmp_path / "run"
    assert training.main([*SPECTRUM, "--run-dir", str(run_dir)]) == 0
    frame = read_results(run_dir / "results.txt")
    measured = frame[frame["lambda_min"].notna()]
    assert list(measured["step"]) == [0, 2]
    assert (measured["lambda_min"] <= measured["lambda_2"]).all()
    # The top-2 eigenvectors of --lambdamax serve the overlap: no products of its own.
    assert (measured["grad_overlap_full_hvps"] == 0).all()
    assert measured["grad_overlap_full"].between(0, 1).all() and measured["grad_overlap_batch"].between(0, 1).all()
    assert (measured["grad_overlap_batch_n"] >= 20).all()
    for kind in ("layer_lambda_max", "layer_trace", "layer_trace_se"):
        assert [c for c in frame.columns if c.startswith(kind + "/")] == [f"{kind}/{name}" for name in MODULES]
    assert {"layer_sharpness_seconds", "layer_sharpness_hvps"} <= set(frame.columns)
    assert "layer_sharpness" not in frame.columns
    assert (measured["density_trace_n"] == 3).all() and (measured["density_trace_hvps"] == 15).all()
    for step, row in measured.set_index("step").iterrows():
        grid = pd.read_csv(run_dir / "density" / f"step_{step}.csv")
        nodes = pd.read_csv(run_dir / "density" / f"step_{step}_nodes.csv")
        assert list(grid.columns) == ["eigenvalue", "density"] and len(grid) == 1000
        assert list(nodes.columns) == ["probe", "node", "weight"] and len(nodes) == 15
        above = nodes[nodes["node"] > 1 / 0.1]["weight"].sum() / 3  # half of 2/eta
        assert row["density_mass_above"] == pytest.approx(above, abs=1e-12)
    final = json.loads((run_dir / "final.json").read_text())
    assert final["lambda_min"] <= final["lambda_max"] and 0 <= final["grad_overlap_full"] <= 1
    assert "grad_overlap_batch_se" in final and "density_trace" not in final


def test_an_interrupted_run_resumes_to_the_same_columns(tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    assert training.main([*SPECTRUM, "--run-dir", str(whole)]) == 0
    cut = tmp_path / "cut"
    with monkeypatch.context() as patch:
        interrupt_at(patch, 2)
        training.main([*SPECTRUM, "--run-dir", str(cut)])
    assert training.main(["--resume", str(cut), "--quiet"]) == 0
    same_results(whole, cut)


@pytest.mark.parametrize("flags, message", [
    (["--layer-sharpness", "--layer-groups", "block"], "unknown --layer-groups 'block'"),
    (["--gradient-overlap", "-1"], "--gradient-overlap K needs K >= 1"),
    (["--spectral-density", "--density-steps", "0"], "--density-steps must be at least 1"),
])
def test_mistakes_are_one_line(tmp_path, capsys, flags, message):
    assert training.main(["--steps", "1", "--quiet", "--run-dir", str(tmp_path / "run"), *flags]) == 2
    assert message in capsys.readouterr().err
