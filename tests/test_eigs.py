"""Eigen-solvers against matrices with known spectra and the exact Hessian of a tiny MLP."""

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, hessian

from spectra import counting, known_matrix
from utils.eigs import EigResult, _inner, lanczos, lobpcg, power_iteration
from utils.errors import UserError

F64 = torch.float64


def outlier_spectrum(dim=120, seed=0):
    """Outliers 50, 30, 20, 10 above a bulk of small and negative eigenvalues."""
    g = torch.Generator().manual_seed(seed)
    bulk = torch.rand(dim - 4, generator=g, dtype=F64) * 4 - 2
    return torch.cat([torch.tensor([50.0, 30.0, 20.0, 10.0], dtype=F64), bulk])


def true_residuals(matrix, result):
    vectors, values = result.vectors, result.values
    return (matrix @ vectors - vectors * values).norm(dim=0) / values.abs()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def solve(solver, matrix, **options):
    options.setdefault("generator", gen())
    options.setdefault("dtype", F64)
    return solver(lambda v: matrix @ v, matrix.shape[0], **options)


def check_result(matrix, result, k, tol):
    """Converged, k descending values, unit vectors, residuals within tol and truthful."""
    assert isinstance(result, EigResult)
    assert result.converged
    assert result.values.shape == (k,) and result.vectors.shape == (matrix.shape[0], k)
    assert torch.all(result.values[:-1] >= result.values[1:])
    torch.testing.assert_close(result.vectors.norm(dim=0), torch.ones(k, dtype=F64), rtol=0, atol=1e-10)
    assert torch.all(result.residuals <= tol)
    torch.testing.assert_close(result.residuals, true_residuals(matrix, result), rtol=1e-5, atol=1e-14)


@pytest.mark.parametrize("solver", [lanczos, lobpcg])
@pytest.mark.parametrize("k", [1, 3])
def test_top_k_of_outlier_spectrum(solver, k):
    values = outlier_spectrum()
    matrix = known_matrix(values)
    result = solve(solver, matrix, k=k, tol=1e-8)
    check_result(matrix, result, k, 1e-8)
    torch.testing.assert_close(result.values, torch.tensor([50.0, 30.0, 20.0][:k], dtype=F64), rtol=1e-12, atol=0)
    assert result.matvecs < 60


@pytest.mark.parametrize("solver", [lanczos, lobpcg])
def test_nearly_equal_top_eigenvalues(solver):
    top = torch.tensor([10.0, 10.0 - 1e-4, 10.0 - 2e-4, 5.0], dtype=F64)
    values = torch.cat([top, torch.linspace(-1, 3, 96, dtype=F64)])
    matrix = known_matrix(values, seed=1)
    top3 = solve(solver, matrix, k=3, tol=1e-8)
    check_result(matrix, top3, 3, 1e-8)
    torch.testing.assert_close(top3.values, values[:3], rtol=0, atol=1e-10)
    top1 = solve(solver, matrix, k=1, tol=1e-8)
    check_result(matrix, top1, 1, 1e-8)
    assert abs(top1.values.item() - 10.0) < 1e-7


@pytest.mark.parametrize("solver", [lanczos, lobpcg])
def test_large_negative_eigenvalue_is_not_the_top(solver):
    values = torch.cat([torch.tensor([-100.0, 10.0, 5.0, 3.0], dtype=F64), torch.linspace(-1, 1, 76, dtype=F64)])
    matrix = known_matrix(values, seed=2)
    result = solve(solver, matrix, k=3, tol=1e-8)
    check_result(matrix, result, 3, 1e-8)
    torch.testing.assert_close(result.values, torch.tensor([10.0, 5.0, 3.0], dtype=F64), rtol=1e-12, atol=0)
    top1 = solve(solver, matrix, k=1, tol=1e-8)
    assert abs(top1.values.item() - 10.0) < 1e-10


def test_power_iteration_finds_largest_magnitude_with_its_sign():
    values = torch.cat([torch.tensor([-100.0, 10.0, 5.0], dtype=F64), torch.linspace(-1, 1, 37, dtype=F64)])
    matrix = known_matrix(values, seed=2)
    result = solve(power_iteration, matrix, tol=1e-8)
    check_result(matrix, result, 1, 1e-8)
    assert abs(result.values.item() + 100.0) < 1e-10
    assert result.matvecs == result.iterations


def test_power_iteration_positive_top():
    matrix = known_matrix(outlier_spectrum(60), seed=3)
    result = solve(power_iteration, matrix, tol=1e-8)
    check_result(matrix, result, 1, 1e-8)
    assert abs(result.values.item() - 50.0) < 1e-10


# Lanczos for k > 1 is left out: from a block of separated outliers its warm start is about as
# costly as a cold one (a single Krylov sequence already finds all of them quickly).
@pytest.mark.parametrize("solver,k", [(lanczos, 1), (lobpcg, 1), (lobpcg, 3), (power_iteration, 1)])
def test_warm_start_from_perturbed_matrix_needs_fewer_products(solver, k):
    values = outlier_spectrum(150, seed=4)
    before = known_matrix(values, seed=4)
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(150, 150, generator=g, dtype=F64)
    after = before + 0.05 * (noise + noise.T)
    options = {} if solver is power_iteration else {"k": k}
    previous = solve(solver, before, tol=1e-6, **options)
    cold = solve(solver, after, tol=1e-6, generator=gen(1), **options)
    warm = solve(solver, after, tol=1e-6, init=previous.vectors, **options)
    exact = torch.linalg.eigvalsh(after).flip(0)[:k]
    for result in (cold, warm):
        check_result(after, result, k, 1e-6)
        torch.testing.assert_close(result.values, exact, rtol=1e-9, atol=0)
    assert warm.matvecs < cold.matvecs


def test_block_warm_start_is_one_block_product():
    matrix = known_matrix(outlier_spectrum(), seed=0)
    previous = solve(lanczos, matrix, k=3, tol=1e-6)
    matvec, widths = counting(matrix)
    result = lanczos(matvec, matrix.shape[0], k=1, tol=1e-8, init=previous.vectors)
    assert widths[0] == 3 and all(w == 1 for w in widths[1:])
    assert result.matvecs == sum(widths)
    assert abs(result.values.item() - 50.0) < 1e-10


@pytest.mark.parametrize("solver", [lanczos, lobpcg])
def test_matvecs_count_vectors_not_calls(solver):
    matrix = known_matrix(outlier_spectrum(), seed=6)
    matvec, widths = counting(matrix)
    result = solver(matvec, matrix.shape[0], k=3, tol=1e-8, dtype=F64, generator=gen())
    assert result.matvecs == sum(widths)
    if solver is lobpcg:
        assert max(widths) > 1


@pytest.mark.parametrize("solver", [lanczos, lobpcg, power_iteration])
def test_same_generator_seed_gives_identical_results(solver):
    matrix = known_matrix(outlier_spectrum(), seed=7)
    global_state = torch.get_rng_state()
    first = solve(solver, matrix, tol=1e-6, generator=gen(11))
    second = solve(solver, matrix, tol=1e-6, generator=gen(11))
    assert torch.equal(torch.get_rng_state(), global_state)
    assert torch.equal(first.values, second.values) and torch.equal(first.vectors, second.vectors)
    assert first.matvecs == second.matvecs
    other = solve(solver, matrix, tol=1e-6, generator=gen(12))
    assert not torch.equal(first.vectors, other.vectors)


@pytest.mark.parametrize("solver", [lanczos, lobpcg, power_iteration])
def test_max_iter_too_small_returns_unconverged_estimate(solver):
    matrix = known_matrix(outlier_spectrum(), seed=8)
    result = solve(solver, matrix, tol=1e-10, max_iter=2)
    assert not result.converged and result.iterations == 2
    assert result.residuals.item() > 1e-10
    torch.testing.assert_close(result.residuals, true_residuals(matrix, result), rtol=1e-5, atol=1e-14)
    assert result.values.shape == (1,) and result.vectors.shape == (matrix.shape[0], 1)


@pytest.mark.parametrize("solver,k", [(lanczos, 1), (lanczos, 3), (lobpcg, 1), (lobpcg, 2), (lobpcg, 3)])
def test_tiny_dimension_is_exact(solver, k):
    values = torch.tensor([2.0, -5.0, 1.0], dtype=F64)
    matrix = known_matrix(values, seed=9)
    result = solve(solver, matrix, k=k, tol=1e-10)
    check_result(matrix, result, k, 1e-10)
    torch.testing.assert_close(result.values, torch.tensor([2.0, 1.0, -5.0], dtype=F64)[:k], rtol=1e-12, atol=1e-12)
    assert result.matvecs <= 4


def test_one_dimensional_operator():
    for solver in (lanczos, lobpcg, power_iteration):
        result = solver(lambda v: -3.0 * v, 1, tol=1e-10, dtype=F64, generator=gen())
        assert result.converged and result.values.item() == -3.0 and result.residuals.item() == 0.0


@pytest.mark.parametrize("generator", [None, gen(3)])
def test_lanczos_continues_past_an_invariant_start(generator):
    values = outlier_spectrum(80, seed=10)
    matrix = known_matrix(values, seed=10)
    top = torch.linalg.eigh(matrix).eigenvectors[:, -1:]
    result = solve(lanczos, matrix, k=3, tol=1e-8, init=top, generator=generator)
    check_result(matrix, result, 3, 1e-8)
    torch.testing.assert_close(result.values, torch.tensor([50.0, 30.0, 20.0], dtype=F64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("solver", [lanczos, lobpcg, power_iteration])
def test_without_generator_results_are_fixed_and_global_rng_untouched(solver):
    matrix = known_matrix(outlier_spectrum(), seed=13)
    global_state = torch.get_rng_state()
    first = solve(solver, matrix, tol=1e-8, generator=None)
    second = solve(solver, matrix, tol=1e-8, generator=None, init=torch.empty(matrix.shape[0], 0, dtype=F64))
    assert torch.equal(torch.get_rng_state(), global_state)
    assert torch.equal(first.vectors, second.vectors) and first.matvecs == second.matvecs
    check_result(matrix, first, 1, 1e-8)


def test_lanczos_thick_restart_keeps_accuracy():
    values = torch.cat([torch.tensor([10.0, 9.9, 9.8], dtype=F64), torch.linspace(-9, 9, 197, dtype=F64)])
    matrix = known_matrix(values, seed=11)
    result = solve(lanczos, matrix, k=3, tol=1e-8, max_basis=10, max_iter=2000)
    check_result(matrix, result, 3, 1e-8)
    torch.testing.assert_close(result.values, torch.tensor([10.0, 9.9, 9.8], dtype=F64), rtol=1e-12, atol=0)
    assert result.matvecs > 10


@pytest.mark.parametrize("solver", [lanczos, lobpcg, power_iteration])
def test_float32_and_dtype_of_init(solver):
    matrix = known_matrix(outlier_spectrum(), seed=12)
    single = matrix.float()
    result = solver(lambda v: single @ v, single.shape[0], tol=1e-3, dtype=torch.float32, generator=gen())
    assert result.converged and result.vectors.dtype == torch.float32 and result.values.dtype == torch.float32
    assert abs(result.values.item() - 50.0) < 50.0 * 1e-4
    warm = solver(lambda v: matrix @ v, matrix.shape[0], tol=1e-10, init=result.vectors.double(), generator=gen())
    assert warm.vectors.dtype == F64 and abs(warm.values.item() - 50.0) < 1e-9


def test_wanting_more_eigenvalues_than_dimensions_is_a_user_error():
    with pytest.raises(UserError):
        lanczos(lambda v: v, 3, k=4)
    with pytest.raises(UserError):
        lobpcg(lambda v: v, 3, k=0)


# torch.func.hessian goes through torch's forward-mode decompositions, which still call torch.jit.script.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_hessian_of_a_tiny_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    x = torch.randn(20, 3, dtype=F64)
    y = torch.randn(20, 2, dtype=F64)
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(theta):
        pieces = theta.split([s.numel() for s in shapes])
        params = {n: piece.reshape(s) for n, piece, s in zip(names, pieces, shapes)}
        return (functional_call(model, params, (x,)) - y).pow(2).sum(1).mean()

    matrix = hessian(loss)(flat)
    exact = torch.linalg.eigvalsh(matrix).flip(0)
    for solver in (lanczos, lobpcg):
        result = solve(solver, matrix, k=3, tol=1e-8)
        check_result(matrix, result, 3, 1e-8)
        torch.testing.assert_close(result.values, exact[:3], rtol=1e-6, atol=0)


def test_float32_inner_products_keep_digits_on_long_vectors():
    generator = torch.Generator().manual_seed(3)
    for a, b in ((1, 1), (3, 2)):
        A = torch.randn((1 << 20) + 3, a, generator=generator)
        B = torch.randn((1 << 20) + 3, b, generator=generator)
        exact = A.double().T @ B.double()
        # Relative to |a| |b| ~ dim: a float32 dot product over the whole length is off by ~1e-3.
        assert (_inner(A, B) - exact).abs().max() < 1e-7 * A.shape[0]


def test_float32_lanczos_reaches_a_tight_tolerance_on_a_long_operator():
    dim = 1 << 20
    generator = torch.Generator().manual_seed(0)
    diagonal = 3.3 * (torch.randperm(dim, generator=generator) + 1.0) ** -0.15
    result = lanczos(lambda V: diagonal[:, None] * V, dim, tol=1e-4, max_iter=40,
                     generator=torch.Generator().manual_seed(1))
    assert result.converged and result.vectors.dtype == torch.float32
    assert result.values[0].item() == pytest.approx(3.3, rel=2e-5)
