import math
from itertools import combinations

import numpy as np
import pytest
import torch

from curvature_reference import LOSSES, check_honest, dense_gradient, dense_hessian, tiny_data, tiny_mlp
from utils.errors import UserError
from utils.estimators import measurement_generator
from utils.measures import batch_sharpness, gni, lambda_max, step_sharpness

N, B = 8, 3


def exact_batch_expectations(model, loss_fn, X, Y, b):
    """(Batch Sharpness, GNI) by enumerating all C(n, b) batches with dense derivatives."""
    H = dense_hessian(model, loss_fn, X, Y)
    g = dense_gradient(model, loss_fn, X, Y)
    rayleigh, noise = [], []
    for batch in combinations(range(X.shape[0]), b):
        idx = list(batch)
        g_B = dense_gradient(model, loss_fn, X[idx], Y[idx])
        H_B = dense_hessian(model, loss_fn, X[idx], Y[idx])
        rayleigh.append((g_B @ H_B @ g_B / (g_B @ g_B)).item())
        noise.append((g_B @ H @ g_B).item())
    return float(np.mean(rayleigh)), float(np.mean(noise)) / (g @ g).item()


def check_honest_estimates(estimates, exact):
    check_honest([e.value for e in estimates], [e.se for e in estimates], exact)


@pytest.mark.parametrize("loss_name", ["mse", "ce"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_lambda_max_and_top_k_match_dense_spectrum(loss_name, chunk_size):
    model, (X, Y) = tiny_mlp(), tiny_data(10, loss_name)
    loss_fn = LOSSES[loss_name]
    spectrum = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, X, Y)).flip(0)
    eig, est = lambda_max(model, loss_fn, X, Y, tol=1e-8, chunk_size=chunk_size)
    assert est.value == pytest.approx(spectrum[0].item(), rel=1e-9)
    assert eig.converged and est.hvps == eig.matvecs and est.n == 1 and math.isnan(est.se)
    top, top_est = lambda_max(model, loss_fn, X, Y, k=3, tol=1e-8, chunk_size=chunk_size)
    torch.testing.assert_close(top.values, spectrum[:3], rtol=1e-9, atol=1e-12)
    assert top.vectors.shape == (26, 3) and top_est.value == top.values[0].item()


def test_lambda_max_methods_and_warm_start():
    model, (X, Y) = tiny_mlp(), tiny_data(10, "mse")
    loss_fn = LOSSES["mse"]
    spectrum = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, X, Y))
    largest_magnitude = spectrum[spectrum.abs().argmax()].item()
    power, _ = lambda_max(model, loss_fn, X, Y, tol=1e-7, method="power", max_iter=20000)
    assert power.values[0].item() == pytest.approx(largest_magnitude, rel=1e-6)
    lobpcg, _ = lambda_max(model, loss_fn, X, Y, tol=1e-8, method="lobpcg")
    assert lobpcg.values[0].item() == pytest.approx(spectrum[-1].item(), rel=1e-9)
    cold, cold_est = lambda_max(model, loss_fn, X, Y, tol=1e-8)
    warm, warm_est = lambda_max(model, loss_fn, X, Y, tol=1e-8, warm_start=cold)
    assert warm.values[0].item() == pytest.approx(spectrum[-1].item(), rel=1e-9)
    assert warm_est.hvps < cold_est.hvps
    with pytest.raises(UserError):
        lambda_max(model, loss_fn, X, Y, method="arnoldi")
    with pytest.raises(UserError):
        lambda_max(model, loss_fn, X, Y, k=2, method="power")


@pytest.mark.parametrize("train_mode", [True, False])
def test_lambda_max_batchnorm_mode_and_no_side_effects(train_mode):
    model, (X, Y) = tiny_mlp(batchnorm=True), tiny_data(10, "mse")
    loss_fn = LOSSES["mse"]
    model.train(not train_mode)
    buffers = [b.clone() for b in model.buffers()]
    params = [p.detach().clone() for p in model.parameters()]
    spectrum = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, X, Y, train_mode=train_mode))
    _, est = lambda_max(model, loss_fn, X, Y, tol=1e-8, train_mode=train_mode)
    assert est.value == pytest.approx(spectrum[-1].item(), rel=1e-9)
    assert model.training is (not train_mode)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_step_sharpness_is_the_batch_rayleigh_quotient():
    model, (X, Y) = tiny_mlp(), tiny_data(N, "ce")
    loss_fn = LOSSES["ce"]
    xb, yb = X[[1, 4, 6]], Y[[1, 4, 6]]
    g, H = dense_gradient(model, loss_fn, xb, yb), dense_hessian(model, loss_fn, xb, yb)
    est = step_sharpness(model, loss_fn, xb, yb)
    assert est.value == pytest.approx((g @ H @ g / (g @ g)).item(), rel=1e-12)
    assert est.hvps == 1 and est.n == 1 and math.isnan(est.se)


@pytest.mark.parametrize("loss_name", ["mse", "ce"])
def test_batch_sharpness_and_gni_converge_to_exact_expectations(loss_name):
    model, (X, Y) = tiny_mlp(), tiny_data(N, loss_name)
    loss_fn = LOSSES[loss_name]
    exact_bs, exact_gni = exact_batch_expectations(model, loss_fn, X, Y, B)
    bs = batch_sharpness(model, loss_fn, X, Y, B, generator=measurement_generator(0, 1))
    assert bs.se < 0.005 * abs(bs.value) or bs.n == 1000
    assert abs(bs.value - exact_bs) < 4 * bs.se
    assert bs.hvps == bs.n and bs.seconds > 0
    g = gni(model, loss_fn, X, Y, B, generator=measurement_generator(0, 2))
    assert g.se < 0.01 * abs(g.value) or g.n == 1000
    assert abs(g.value - exact_gni) < 4 * g.se
    assert g.n <= g.hvps < g.n + 10


def test_batch_sharpness_standard_errors_are_honest():
    model, (X, Y) = tiny_mlp(), tiny_data(N, "ce")
    loss_fn = LOSSES["ce"]
    exact, _ = exact_batch_expectations(model, loss_fn, X, Y, B)
    estimates = [batch_sharpness(model, loss_fn, X, Y, B, generator=measurement_generator(seed, 0),
                                 min_samples=40, max_samples=40)
                 for seed in range(100)]
    check_honest_estimates(estimates, exact)


def test_gni_standard_errors_are_honest():
    model, (X, Y) = tiny_mlp(), tiny_data(N, "mse")
    loss_fn = LOSSES["mse"]
    _, exact = exact_batch_expectations(model, loss_fn, X, Y, B)
    estimates = [gni(model, loss_fn, X, Y, B, generator=measurement_generator(seed, 0),
                     min_samples=40, max_samples=40, block_size=40)
                 for seed in range(100)]
    check_honest_estimates(estimates, exact)


def test_gni_chunking_and_blocks_do_not_change_the_estimate():
    model, (X, Y) = tiny_mlp(), tiny_data(N, "ce")
    loss_fn = LOSSES["ce"]
    reference = gni(model, loss_fn, X, Y, B, generator=measurement_generator(5, 9), rel_se=0.05)
    for chunk_size, block_size in ((3, 10), (None, 1), (2, 7)):
        other = gni(model, loss_fn, X, Y, B, generator=measurement_generator(5, 9), rel_se=0.05,
                    chunk_size=chunk_size, block_size=block_size)
        assert other.n == reference.n
        assert other.value == pytest.approx(reference.value, rel=1e-10)
        assert other.se == pytest.approx(reference.se, rel=1e-8)


def test_measurements_are_reproducible_and_leave_global_state_alone():
    model, (X, Y) = tiny_mlp(batchnorm=True), tiny_data(N, "mse")
    loss_fn = LOSSES["mse"]
    model.eval()
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    rng_state = torch.get_rng_state()
    runs = []
    for _ in range(2):
        runs.append((
            batch_sharpness(model, loss_fn, X, Y, B, generator=measurement_generator(11, 40),
                            rel_se=0.05),
            gni(model, loss_fn, X, Y, B, generator=measurement_generator(11, 40), chunk_size=3,
                rel_se=0.2),
            lambda_max(model, loss_fn, X, Y, generator=measurement_generator(11, 40))[1],
            step_sharpness(model, loss_fn, X[:B], Y[:B]),
        ))
    for first, second in zip(*runs):
        assert (first.value, first.n, first.hvps) == (second.value, second.n, second.hvps)
        assert first.se == second.se or (math.isnan(first.se) and math.isnan(second.se))
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert model.training is False
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert all(p.grad is None for p in model.parameters())
