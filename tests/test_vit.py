"""The vit model: its shape defaults, and every measurement on a tiny instance against the dense
float64 Hessian (the generic double-backward routes; a vit is neither a layer chain nor linear)."""

import json
from itertools import combinations_with_replacement

import numpy as np
import pytest
import torch
from curvature_reference import (LOSSES, all_batches, delta_method, dense_gauss_newton, dense_gradient,
                                 dense_hessian, exact_ghg_family)

import training
from utils.estimators import measurement_generator
from utils.measures import (
    batch_lambda_max,
    batch_sharpness,
    batch_sharpness_ratio,
    gn_batch_sharpness,
    gn_lambda_max,
    gni,
    hessian_trace,
    lambda_max,
    preconditioned_sharpness,
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


def ten_draws(per_batch, estimate, statistic):
    """The one multiset of ten of the exact per-batch values (rows of ``per_batch``) whose
    ``statistic`` -> (value, se) is the estimate's: the estimate is checked draw by draw."""
    matches = [statistic(per_batch[list(pick)]) for pick in combinations_with_replacement(range(len(per_batch)), 10)]
    matches = [(value, se) for value, se in matches if value == pytest.approx(estimate.value, rel=1e-7)]
    assert estimate.n == 10 and len(matches) == 1, matches
    assert estimate.se == pytest.approx(matches[0][1], rel=1e-6)


def mean_and_se(x):
    return x[:, 0].mean(), x[:, 0].std(ddof=1) / np.sqrt(len(x))


@pytest.mark.parametrize("loss_name", ["mse", "ce"])
def test_vit_gauss_newton_batch_ratio_and_batch_top_eigenvalue_match_dense_references(loss_name):
    model, X, Y = tiny_vit(loss_name)
    loss_fn = LOSSES[loss_name]
    _, gn_top = gn_lambda_max(model, loss_fn, X, Y, tol=1e-9)
    assert gn_top.value == pytest.approx(torch.linalg.eigvalsh(dense_gauss_newton(model, loss_name, X, Y))[-1].item(),
                                         rel=1e-7)
    # Each estimate takes ten draws among the six batches of two of the four points; their
    # spread is wide, so each is checked against the exact values of the batches it drew.
    terms = []
    for rows in all_batches(4, 2):
        g_B, H_B = dense_gradient(model, loss_fn, X[rows], Y[rows]), dense_hessian(model, loss_fn, X[rows], Y[rows])
        G_B = dense_gauss_newton(model, loss_name, X[rows], Y[rows])
        terms.append([(g_B @ G_B @ g_B / (g_B @ g_B)).item(), (g_B @ H_B @ g_B).item(), (g_B @ g_B).item(),
                      torch.linalg.eigvalsh(H_B)[-1].item()])
    terms = np.array(terms)
    ten = {"min_samples": 10, "max_samples": 10}
    ten_draws(terms[:, [0]], gn_batch_sharpness(model, loss_fn, X, Y, 2, generator=measurement_generator(0, 6), **ten),
              mean_and_se)
    ten_draws(terms[:, [1, 2]], batch_sharpness_ratio(model, loss_fn, X, Y, 2, generator=measurement_generator(0, 7),
                                                      **ten), lambda x: delta_method(x[:, 0], x[:, 1]))
    ten_draws(terms[:, [3]], batch_lambda_max(model, loss_fn, X, Y, 2, generator=measurement_generator(0, 8), tol=1e-9,
                                              **ten), mean_and_se)


def test_vit_preconditioned_sharpness_matches_the_dense_preconditioned_hessian():
    model, X, Y = tiny_vit("mse")
    loss_fn = LOSSES["mse"]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(3):
        optimizer.zero_grad()
        loss_fn(model(X[step:step + 2]), Y[step:step + 2]).backward()
        optimizer.step()
    # P = (1 - beta1^k) (sqrt(v / (1 - beta2^k)) + eps) after k = 3 updates, on the coordinates Adam has seen.
    v = torch.cat([optimizer.state[p]["exp_avg_sq"].reshape(-1) for p in model.parameters()])
    seen = torch.nonzero(v > 0)[:, 0]
    D = torch.diag(((1 - 0.9 ** 3) * (torch.sqrt(v / (1 - 0.999 ** 3)) + 1e-8))[seen].rsqrt())
    H = dense_hessian(model, loss_fn, X, Y)[seen][:, seen]
    eig, est = preconditioned_sharpness(model, loss_fn, X, Y, optimizer=optimizer, tol=1e-9,
                                        generator=torch.Generator().manual_seed(0))
    assert eig.converged and np.isfinite(est.value)
    assert est.value == pytest.approx(torch.linalg.eigvalsh(D @ H @ D)[-1].item(), rel=1e-7)


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
