"""The spectrum beyond its top (utils/spectrum.py) against the dense float64 Hessian of tiny networks:
lambda_min, the gradient's share in the top eigenspace, the curvature of each diagonal block and
the eigenvalue density by stochastic Lanczos quadrature."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from curvature_reference import (LOSSES, all_batches, check_honest, dense_gradient, dense_hessian, drawn_batches,
                                 mean_reference, tiny_cnn, tiny_data, tiny_images, tiny_mlp, tiny_resnet_bn)
from spectra import counting, known_matrix
from utils import spectrum
from utils.estimators import measurement_generator

N, B = 8, 3


def tiny_case(name):
    """(model, loss_fn, X, Y, train_mode) of one tiny network; resnet_bn in train- and eval-mode BatchNorm."""
    if name == "mlp":
        return tiny_mlp(), LOSSES["mse"], *tiny_data(N, "mse"), True
    if name == "mlp-ce":
        return tiny_mlp(), LOSSES["ce"], *tiny_data(N, "ce"), True
    if name == "cnn":
        return tiny_cnn(), LOSSES["ce"], *tiny_images(N, "ce"), True
    X = torch.randn(N, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return tiny_resnet_bn(), LOSSES["mse"], X, tiny_data(N, "mse")[1], name == "resnet_bn-train"


CASES = ["mlp", "mlp-ce", "cnn", "resnet_bn-train", "resnet_bn-eval"]


@pytest.fixture(scope="module")
def dense():
    """Dense Hessian, gradient and spectrum of every case, computed once."""
    cache = {}

    def get(name):
        if name not in cache:
            model, loss_fn, X, Y, train_mode = tiny_case(name)
            H = dense_hessian(model, loss_fn, X, Y, train_mode)
            values, vectors = torch.linalg.eigh(H)
            cache[name] = H.detach(), dense_gradient(model, loss_fn, X, Y, train_mode).detach(), values.detach(), vectors.detach()
        return cache[name]

    return get


@pytest.mark.parametrize("name", CASES)
def test_lambda_min_matches_the_dense_spectrum(name, dense):
    model, loss_fn, X, Y, train_mode = tiny_case(name)
    _, _, values, _ = dense(name)
    scale = max(abs(values[0].item()), values[-1].item())
    eig, estimate = spectrum.lambda_min(model, loss_fn, X, Y, tol=1e-10, train_mode=train_mode,
                                        generator=torch.Generator().manual_seed(0))
    assert abs(estimate.value - values[0].item()) <= 1e-6 * scale
    assert eig.converged and estimate.hvps == eig.matvecs and math.isnan(estimate.se)
    # With lambda_max known from the same step the top is not solved again.
    _, known = spectrum.lambda_min(model, loss_fn, X, Y, tol=1e-10, train_mode=train_mode,
                                   lambda_max=values[-1].item(), generator=torch.Generator().manual_seed(0))
    assert abs(known.value - values[0].item()) <= 1e-6 * scale and known.hvps < estimate.hvps


def test_lambda_min_stops_when_it_is_zero():
    # A linear model on two points in R^3 with a bias: H = (2/n) [X 1]^T [X 1] (x) I has rank 4 of 8,
    # so lambda_min = 0 and a residual relative to |lambda_min| could never pass.
    model = nn.Linear(3, 2).double()
    X, Y = tiny_data(2, "mse")
    spectrum_ = torch.linalg.eigvalsh(dense_hessian(model, LOSSES["mse"], X, Y))
    eig, estimate = spectrum.lambda_min(model, LOSSES["mse"], X, Y, tol=1e-8, max_iter=4,
                                        generator=torch.Generator().manual_seed(1))
    assert abs(spectrum_[0].item()) < 1e-12 and eig.converged
    assert abs(estimate.value) <= 1e-8 * spectrum_[-1].item()


@pytest.mark.parametrize("name", CASES)
def test_gradient_overlap_matches_the_dense_eigenspace(name, dense):
    model, loss_fn, X, Y, train_mode = tiny_case(name)
    _, g, _, vectors = dense(name)
    k = 2
    top = vectors[:, -k:]

    def fraction(v):
        return ((top.T @ v) @ (top.T @ v) / (v @ v)).item()

    full, batch = spectrum.gradient_overlap(model, loss_fn, X, Y, B, k=k, tol=1e-10, train_mode=train_mode,
                                            generator=measurement_generator(0, 7), max_samples=60)
    assert full.value == pytest.approx(fraction(g), abs=1e-6) and full.hvps > 0
    generator = measurement_generator(0, 7)
    torch.randint(0, 2 ** 62, (1,), generator=generator)  # the solver's seed comes first
    samples = [fraction(dense_gradient(model, loss_fn, X[idx], Y[idx], train_mode))
               for idx in drawn_batches(N, B, generator, 60)]
    value, se, n = mean_reference(samples, 20, 60, 0.01)
    assert (batch.value, batch.se, batch.n) == pytest.approx((value, se, n), abs=1e-6)
    # Eigenvectors of lambda_max at the same step are reused: no products, the same batches.
    reused, reused_batch = spectrum.gradient_overlap(model, loss_fn, X, Y, B, k=k, vectors=top.flip(1),
                                                     train_mode=train_mode, generator=measurement_generator(0, 7),
                                                     max_samples=60)
    assert reused.hvps == 0 and reused.value == pytest.approx(fraction(g), abs=1e-12)
    assert reused_batch.value == pytest.approx(batch.value, abs=1e-6) and reused_batch.n == batch.n


def test_batch_gradient_overlap_is_honest():
    model, loss_fn, (X, Y) = tiny_mlp(), LOSSES["mse"], tiny_data(N, "mse")
    top = torch.linalg.eigh(dense_hessian(model, loss_fn, X, Y))[1][:, -2:]

    def fraction(v):
        return ((top.T @ v) @ (top.T @ v) / (v @ v)).item()

    exact = np.mean([fraction(dense_gradient(model, loss_fn, X[idx], Y[idx])) for idx in all_batches(N, B)])
    runs = [spectrum.gradient_overlap(model, loss_fn, X, Y, B, k=2, vectors=top, generator=measurement_generator(s, 0),
                                      min_samples=30, max_samples=30)[1] for s in range(100)]
    check_honest([r.value for r in runs], [r.se for r in runs], exact)


@pytest.mark.parametrize("name", CASES)
def test_layer_sharpness_matches_the_dense_blocks(name, dense):
    model, loss_fn, X, Y, train_mode = tiny_case(name)
    H = dense(name)[0]
    groups = spectrum.parameter_groups(model)
    assert [n for n, _ in groups] == [n for n, p in model.named_parameters() if p.requires_grad]
    layers = spectrum.layer_sharpness(model, loss_fn, X, Y, tol=1e-10, train_mode=train_mode,
                                      generator=torch.Generator().manual_seed(2), min_samples=20, max_samples=20)
    for (_, rows), top, trace, se in zip(groups, layers.lambda_max, layers.trace, layers.trace_se):
        block = H[rows, rows]
        exact = torch.linalg.eigvalsh(block)[-1].item()
        assert abs(top - exact) <= 1e-6 * max(abs(exact), torch.linalg.eigvalsh(H).abs().max().item() * 1e-3)
        assert abs(trace - torch.trace(block).item()) <= 5 * se + 1e-12
    assert all(layers.converged) and layers.probes == 20


def test_layer_groups_by_module_and_honest_block_traces():
    model, loss_fn, (X, Y) = tiny_mlp(batchnorm=True), LOSSES["mse"], tiny_data(N, "mse")
    assert [(n, r.stop - r.start) for n, r in spectrum.parameter_groups(model, by="module")] == \
        [("0", 16), ("1", 8), ("3", 10)]
    groups = spectrum.parameter_groups(model, by="module")
    H = dense_hessian(model, loss_fn, X, Y)
    exact = [torch.trace(H[rows, rows]).item() for _, rows in groups]
    runs = [spectrum.layer_sharpness(model, loss_fn, X, Y, groups=groups, generator=torch.Generator().manual_seed(s),
                                     tol=0.1, min_samples=30, max_samples=30) for s in range(100)]
    for i, value in enumerate(exact):
        check_honest([r.trace[i] for r in runs], [r.trace_se[i] for r in runs], value)


def test_lanczos_quadrature_is_exact_on_a_full_krylov_space_and_costs_p_m_products():
    H = known_matrix([-1.0, 0.5, 2.0, 3.0, 7.0])
    matvec, widths = counting(H)
    Z = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    nodes, weights = spectrum.lanczos_quadrature(matvec, Z, 5)
    assert widths == [3] * 5
    values, vectors = torch.linalg.eigh(H)
    v = Z / Z.norm(dim=0)
    for i in range(3):
        torch.testing.assert_close(nodes[i], values, atol=1e-10, rtol=0)
        torch.testing.assert_close(weights[i], (vectors.T @ v[:, i]) ** 2, atol=1e-10, rtol=0)
    # Fewer steps: Gauss quadrature is exact for polynomials of degree < 2m.
    nodes, weights = spectrum.lanczos_quadrature(counting(H)[0], Z, 2)
    for power in range(4):
        exact = torch.einsum("pi,pq,qi->i", v, torch.linalg.matrix_power(H, power), v)
        torch.testing.assert_close((weights * nodes ** power).sum(dim=1), exact, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", CASES)
def test_spectral_density_against_the_dense_spectrum(name, dense):
    model, loss_fn, X, Y, train_mode = tiny_case(name)
    H, _, values, _ = dense(name)
    P = values.numel()
    probes, steps = 40, 12
    density = spectrum.spectral_density(model, loss_fn, X, Y, probes=probes, steps=steps, train_mode=train_mode,
                                        generator=torch.Generator().manual_seed(4))
    assert density.hvps == probes * steps
    torch.testing.assert_close(density.weights.sum(dim=1), torch.ones(probes, dtype=torch.float64))
    # Wasserstein-1 to the exact eigenvalue measure: quadrature error ~ width / m, sampling ~ width / sqrt(p P).
    width = (values[-1] - values[0]).item()
    distance = spectrum.wasserstein_1(density.nodes, density.weights, values, torch.ones(P))
    assert distance <= width * (1 / steps + 1 / math.sqrt(probes * P))
    # ... and below the distance that moving every eigenvalue by 2.5 % of the width would make,
    # an error a reader of the figure would see.
    assert distance <= width / 40
    # tr(H) from the nodes is Hutchinson on the same probes, within its SE of the exact trace.
    generator = torch.Generator().manual_seed(4)
    Z = (2 * torch.randint(0, 2, (P, probes), generator=generator) - 1).double()
    hutchinson = torch.einsum("pi,pq,qi->i", Z, H, Z)
    trace = density.trace()
    assert trace.value == pytest.approx(hutchinson.mean().item(), rel=1e-9, abs=1e-9)
    assert trace.se == pytest.approx(hutchinson.std().item() / math.sqrt(probes), rel=1e-6, abs=1e-12)
    assert abs(trace.value - torch.trace(H).item()) <= 4 * trace.se + 1e-12
    grid, phi = density.on_grid()
    assert np.trapezoid(phi, grid) == pytest.approx(1, abs=1e-3)


def test_density_trace_and_mass_above_are_honest():
    model, loss_fn, (X, Y) = tiny_mlp(), LOSSES["mse"], tiny_data(N, "mse")
    values = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, X, Y))
    runs = [spectrum.spectral_density(model, loss_fn, X, Y, probes=10, steps=2,
                                      generator=torch.Generator().manual_seed(s)) for s in range(100)]
    check_honest([r.trace().value for r in runs], [r.trace().se for r in runs], values.sum().item())
    # With m = P steps every probe's quadrature is exact, so the mass above a threshold is unbiased.
    threshold = values[-3].item() - 1e-9  # the top three eigenvalues lie above it
    mass = np.array([spectrum.spectral_density(model, loss_fn, X, Y, probes=10, steps=values.numel(),
                                               generator=torch.Generator().manual_seed(s)).mass_above(threshold)
                     for s in range(30)])
    assert abs(mass.mean() - 3 / values.numel()) <= 4 * mass.std(ddof=1) / math.sqrt(len(mass))
    assert math.isnan(runs[0].mass_above(math.nan))


def test_wasserstein_1_of_shifted_measures_is_the_shift():
    assert spectrum.wasserstein_1([0.0, 1.0], [1, 1], [0.5, 1.5], [2, 2]) == pytest.approx(0.5)
    assert spectrum.wasserstein_1([0.0], [1], [0.0, 2.0], [1, 1]) == pytest.approx(1.0)
