"""The vit model: its shape defaults, and every measurement on a tiny instance against the dense
float64 Hessian (the generic double-backward routes; a vit is neither a layer chain nor linear)."""

import json

import numpy as np
import pytest
import torch
from curvature_reference import LOSSES, dense_gradient, dense_hessian, exact_ghg_family

import training
from utils.estimators import measurement_generator
from utils.measures import (
    batch_sharpness,
    gni,
    hessian_trace,
    lambda_max,
    step_sharpness,
)
from utils.models import build_model, count_parameters, resolved_shape
from utils.spectrum import gradient_overlap, lambda_min, layer_sharpness, parameter_groups
from utils.results import read_results


def tiny_vit(loss_name, n=4):
    """A 1x4x4-input vit with width 4, one block, 2 heads, patch 2 (four tokens), float64."""
    model = build_model("vit", (1, 4, 4), 2, width=4, depth=1, heads=2, patch=2, activation="tanh",
                        init_scale=1.0, init_seed=3).double()
    generator = torch.Generator().manual_seed(7)
    X = torch.randn(n, 1, 4, 4, generator=generator, dtype=torch.float64)
    Y = torch.randn(n, 2, generator=generator, dtype=torch.float64) if loss_name == "mse" else torch.tensor([0, 1] * (n // 2))
    return model, X, Y


def test_shape_defaults_are_per_model():
    assert resolved_shape("mlp", (1, 8, 8)) == {"width": 512, "depth": 2, "heads": None, "patch": None}
    assert resolved_shape("vit", (1, 8, 8)) == {"width": 64, "depth": 2, "heads": 4, "patch": 2}
    assert resolved_shape("vit", (3, 32, 32), width=32) == {"width": 32, "depth": 2, "heads": 4, "patch": 4}
    model = build_model("vit", (1, 8, 8), 10, width=64, depth=2)
    assert count_parameters(model) == 69_066 and model(torch.randn(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.parametrize("loss_name", ["mse", "ce"])
def test_vit_measurements_match_the_dense_hessian(loss_name):
    model, X, Y = tiny_vit(loss_name)
    loss_fn = LOSSES[loss_name]
    H = dense_hessian(model, loss_fn, X, Y)
    spectrum = torch.linalg.eigvalsh(H)
    _, top = lambda_max(model, loss_fn, X, Y, tol=1e-9)
    assert top.value == pytest.approx(spectrum[-1].item(), rel=1e-7)

    rows = torch.tensor([1, 3])
    g_B, H_B = dense_gradient(model, loss_fn, X[rows], Y[rows]), dense_hessian(model, loss_fn, X[rows], Y[rows])
    assert step_sharpness(model, loss_fn, X[rows], Y[rows]).value == pytest.approx((g_B @ H_B @ g_B / (g_B @ g_B)).item(), rel=1e-9)

    exact = exact_ghg_family(model, loss_fn, X, Y, 2)
    for name, measure in (("batch_sharpness", batch_sharpness), ("gni", gni)):
        est = measure(model, loss_fn, X, Y, 2, generator=measurement_generator(0, 1), max_samples=100)
        if est.exact:  # GNI on four points is taken in closed form
            assert est.value == pytest.approx(exact[name], rel=1e-9), name
        else:
            assert abs(est.value - exact[name]) < 4 * est.se, name
    trace = hessian_trace(model, loss_fn, X, Y, generator=measurement_generator(0, 2), max_samples=100)
    assert abs(trace.value - torch.trace(H).item()) < 4 * trace.se

    # The spectrum beyond its top: lambda_min, the gradient's share in the top eigenvector, the diagonal blocks.
    _, bottom = lambda_min(model, loss_fn, X, Y, tol=1e-9, generator=measurement_generator(0, 3))
    assert bottom.value == pytest.approx(spectrum[0].item(), rel=1e-6, abs=1e-8 * spectrum[-1].item())
    g, top_vector = dense_gradient(model, loss_fn, X, Y), torch.linalg.eigh(H).eigenvectors[:, -1]
    full, _ = gradient_overlap(model, loss_fn, X, Y, 2, k=1, generator=measurement_generator(0, 4), tol=1e-9,
                               max_samples=20)
    assert full.value == pytest.approx(((top_vector @ g) ** 2 / (g @ g)).item(), rel=1e-6)
    groups = parameter_groups(model)
    blocks = layer_sharpness(model, loss_fn, X, Y, groups=groups, generator=measurement_generator(0, 5), tol=1e-9,
                             max_samples=20)
    for (name, where), block_top in zip(groups, blocks.lambda_max):
        assert block_top == pytest.approx(torch.linalg.eigvalsh(H[where, where])[-1].item(), rel=1e-6, abs=1e-9), name


def test_every_measurement_runs_on_vit_and_records_resolved_shape(results_env):
    run_dir = results_env / "run"
    # One batch of the whole set: every batch average stops at its minimum sample count.
    # (hessian_trace draws probes instead; its value is checked against the dense trace above.)
    flags = ["--lambdamax", "--batch-sharpness", "--step-sharpness", "--gni", "--batch-sharpness-ratio",
             "--batch-lambdamax", "--gauss-newton", "--gradient-norm", "--momentum-sharpness", "--param-distance",
             "--lambda-min", "--gradient-overlap", "--layer-sharpness", "--spectral-density", "--density-probes", "2",
             "--density-steps", "8"]
    assert training.main(["--model", "vit", "--width", "8", "--heads", "2", "--num-data", "8", "--batch", "8",
                          "--momentum", "0.9", "--steps", "1", "--quiet", "--run-dir", str(run_dir), *flags]) == 0
    cfg = json.loads((run_dir / "config.json").read_text())["config"]
    assert (cfg["width"], cfg["depth"], cfg["heads"], cfg["patch"]) == (8, 2, 2, 2)
    frame = read_results(run_dir / "results.txt")
    for column in ("lambda_max", "batch_sharpness", "step_sharpness", "gni", "batch_sharpness_ratio", "batch_lambda_max",
                   "gn_lambda_max", "gn_batch_sharpness", "grad_norm_sq_batch", "momentum_sharpness",
                   "param_distance", "lambda_min", "grad_overlap_full", "grad_overlap_batch", "density_trace",
                   "layer_lambda_max/head.weight"):
        assert np.isfinite(frame[column].iloc[0]), column
