"""λ_min, the gradient overlap, per-layer curvature and the spectral density as training.py
measurements: their columns, files, reuse of the λ_max eigenvectors, final.json, resume."""

import json

import pandas as pd
import pytest
import torch

import compute_final_fullbs
import plot_results
import training
from curvature_reference import LOSSES, dense_hessian
from run_checks import interrupt_at, same_results
from utils.checkpoints import list_checkpoints
from utils.plotting import LAMBDA_MAX, plot_runs
from utils.results import read_results
from utils.runs import load_run, load_weights, rebuild

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
    # The figure: λ_min dashed on the λ_max panel, and one small panel per layer with its line.
    axes = {ax.get_title(): ax for ax in plot_runs([load_run(str(run_dir))], [frame]).axes if ax.get_visible()}
    curves = {line.get_label(): line for line in axes[LAMBDA_MAX].get_lines()}
    assert list(curves[r"$\lambda_{\min}$"].get_ydata()) == list(measured["lambda_min"])
    assert curves[r"$\lambda_{\min}$"].get_linestyle() == "--"
    for name in MODULES:
        layer = {line.get_label(): line for line in axes[f"{LAMBDA_MAX} of {name}"].get_lines()}
        assert list(layer[r"$\lambda_{\max}(H_{kk})$"].get_ydata()) == list(measured[f"layer_lambda_max/{name}"])
        assert list(layer["2/η = 20"].get_ydata()) == [20, 20]


def test_compute_final_fullbs_measures_the_spectrum_of_the_final_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert training.main([*SPECTRUM, "--run-dir", str(run_dir)]) == 0
    assert plot_results.main([str(run_dir), "--density"]) == 2
    assert f"{run_dir} has no density.csv; run compute_final_fullbs.py {run_dir} --density first" in capsys.readouterr().err
    assert compute_final_fullbs.main([str(run_dir), "--lambda-min", "--layers", "--density", "--tol", "1e-9",
                                      "--cpu", "--quiet"]) == 0
    record = json.loads((run_dir / "final_fullbs.json").read_text())
    setup = rebuild(load_run(str(run_dir)), cpu=True, dtype=torch.float64)
    load_weights(setup, list_checkpoints(run_dir)[-1][1])
    H = dense_hessian(setup.model, LOSSES["mse"], setup.data.X_train.double(), setup.data.Y_train.double())
    values = torch.linalg.eigvalsh(H)
    assert abs(record["lambda_min"] - values[0].item()) <= 1e-6 * values[-1].item()
    assert [k for k in record if k.startswith("layer_lambda_max/")] == [f"layer_lambda_max/{m}" for m in MODULES]
    assert record["density_probes"] == 3 and record["density_hvps"] == 15
    assert {"density.csv", "density.pdf", "density.png", "density_nodes.csv"} <= {p.name for p in run_dir.iterdir()}
    out = tmp_path / "figures"
    assert plot_results.main([str(run_dir), "--density", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["density.pdf", "density.png"]


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


def test_density_panels_share_their_axes():
    """Two runs' densities are drawn on the same axes, so the outliers' reach compares: a narrow
    spectrum with a lower peak gets the wide one's limits and the stability line stays in view."""
    from utils.plotting import plot_density

    wide, narrow = [-0.5, 0.0, 5.5], [0.0, 0.5, 1.0]
    figure = plot_density([("GD", wide, [1e-3, 10.0, 1e-3], 5.0, "2/η"),
                           ("SGD", narrow, [1e-4, 0.1, 1e-4], 8.0, "2/η")])
    (gd, sgd) = figure.axes
    assert gd.get_ylim() == sgd.get_ylim() and gd.get_ylim()[1] == pytest.approx(20.0)
    assert gd.get_xlim() == sgd.get_xlim() and gd.get_xlim()[0] == -0.5 and gd.get_xlim()[1] > 8.0
    figure.canvas.draw()  # the legends in the same place of each panel, whatever the curves
    places = [ax.get_legend().get_window_extent().transformed(ax.transAxes.inverted()).bounds for ax in (gd, sgd)]
    assert places[0] == pytest.approx(places[1], abs=1e-6)


@pytest.mark.parametrize("optimiser, half_threshold", [(["--momentum", "0.5", "--lr", "0.75"], (2 + 2 * 0.5) / 0.75 / 2),
                                                       (["--adam", "--lr", "0.1"], None)])
def test_mass_above_half_the_threshold_of_the_runs_optimiser(tmp_path, optimiser, half_threshold):
    """density_mass_above counts the quadrature weight above half the momentum threshold
    (2 + 2 mu) / eta; with Adam, whose threshold bounds the preconditioned Hessian, it is nan."""
    run_dir = tmp_path / "run"
    assert training.main(["--dataset", "digits", "--num-data", "32", "--width", "6", "--batch", "8",
                          "--steps", "3", "--measure-every", "2", "--quiet", "--cpu", "--spectral-density",
                          "--density-probes", "2", "--density-steps", "4", *optimiser, "--run-dir", str(run_dir)]) == 0
    measured = read_results(run_dir / "results.txt").dropna(subset=["density_trace"]).set_index("step")
    assert list(measured.index) == [0, 2]
    for step, row in measured.iterrows():
        nodes = pd.read_csv(run_dir / "density" / f"step_{step}_nodes.csv")
        if half_threshold is None:
            assert pd.isna(row["density_mass_above"])
        else:
            above = nodes[nodes["node"] > half_threshold]["weight"].sum() / 2
            assert row["density_mass_above"] == pytest.approx(above, abs=1e-12)
            # Nodes between 1/eta and the momentum half-threshold tell the two apart.
            assert step > 0 or nodes["node"].between(1 / 0.75, half_threshold).any()
