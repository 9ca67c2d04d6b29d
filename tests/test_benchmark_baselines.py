"""The baselines written inside benchmarks/bench_measurements.py: the ratios it reports are only
as good as these, so they are checked like any measurement."""

import copy
import importlib.util
import os
import statistics

import torch
import torch.nn as nn

from spectra import counting, known_matrix
from utils import eigs
from utils.hvp import HessianOperator
from utils.losses import mse_loss
from utils.training import epoch_permutation

F64 = torch.float64
BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                     "bench_measurements.py")


def load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_measurements", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_benchmark()


def spectrum_matrix(dim=150, seed=0):
    """A top eigenvalue 6 and a second 5.4 above a bulk in [-1, 4], with the top eigenvector."""
    g = torch.Generator().manual_seed(seed)
    values = torch.cat([torch.tensor([6.0, 5.4], dtype=F64), torch.rand(dim - 2, generator=g, dtype=F64) * 5 - 1])
    matrix = known_matrix(values, seed)
    return matrix, torch.linalg.eigh(matrix).eigenvectors[:, -1:]


def test_paper_lobpcg_finds_the_top_eigenvalue_within_its_tolerance():
    matrix, _ = spectrum_matrix()
    matvec, _ = counting(matrix)
    for reltol in (0.005, 1e-6):
        value, vector, hvps, converged = bench.paper_lobpcg(matvec, matrix.shape[0], reltol=reltol, dtype=F64,
                                                            generator=torch.Generator().manual_seed(1))
        assert converged
        image = matrix @ vector
        assert (image - value * vector).norm() < reltol / 2 * (image.norm() + value)
        # A residual r puts some eigenvalue within r of value, and within r^2 / gap of the top one.
        assert abs(value - 6.0) < 6.0 * reltol
    assert abs(value - 6.0) < 1e-9


def test_paper_lobpcg_pays_the_paper_codes_products():
    """One product for the start, then per iteration [r, p] (only r the first time) and the new
    x once more: 2 HVPs in the first iteration and 3 in every later one."""
    matrix, _ = spectrum_matrix()
    matvec, widths = counting(matrix)
    _, _, hvps, _ = bench.paper_lobpcg(matvec, matrix.shape[0], reltol=1e-4, dtype=F64,
                                       generator=torch.Generator().manual_seed(2))
    iterations = (len(widths) - 1) // 2
    assert widths == [1, 1, 1] + [2, 1] * (iterations - 1)
    assert hvps == sum(widths) == 3 * iterations


def krylov_top_ritz_value(matrix, start, size):
    """The largest Ritz value of H on the Krylov space K_size(H, start)."""
    columns = [start / start.norm()]
    for _ in range(size - 1):
        columns.append(matrix @ columns[-1])
    basis, _ = torch.linalg.qr(torch.cat(columns, dim=1))
    return float(torch.linalg.eigvalsh(basis.T @ matrix @ basis)[-1])


def test_paper_lobpcg_steps_are_rayleigh_ritz_on_the_krylov_spaces():
    """With one vector, LOBPCG's first iteration is Rayleigh-Ritz on span[x0, H x0] and its second
    on the three-dimensional Krylov space; ``max_iter`` caps the iterations and their products."""
    matrix, _ = spectrum_matrix()
    start = torch.randn(matrix.shape[0], 1, generator=torch.Generator().manual_seed(4), dtype=F64)
    for iterations in (1, 2):
        value, _, hvps, converged = bench.paper_lobpcg(counting(matrix)[0], matrix.shape[0], init=start,
                                                       max_iter=iterations, dtype=F64)
        assert not converged and hvps == 3 * iterations
        assert abs(value - krylov_top_ritz_value(matrix, start, iterations + 1)) < 1e-12


def test_paper_lobpcg_always_takes_one_iteration():
    """The paper's code tests convergence after an iteration only: even an exact eigenvector
    costs the start and one iteration."""
    matrix, top = spectrum_matrix()
    matvec, widths = counting(matrix)
    value, _, hvps, converged = bench.paper_lobpcg(matvec, matrix.shape[0], init=top, dtype=F64)
    assert converged and hvps == 3 and widths == [1, 1, 1]
    assert abs(value - 6.0) < 1e-12


def test_paper_lobpcg_pays_for_a_direction_it_drops():
    """From a start inside a two-dimensional invariant space the first iteration is exact, so the
    next residual vanishes; that column is dropped but paid for, as the paper's code multiplies it."""
    matrix = torch.diag(torch.tensor([3.0, 1.0, 0.5], dtype=F64))
    matvec, widths = counting(matrix)
    start = torch.tensor([[1.0], [1.0], [0.0]], dtype=F64)
    value, _, hvps, _ = bench.paper_lobpcg(matvec, 3, init=start, reltol=0.0, max_iter=2, dtype=F64)
    assert widths == [1, 1, 1, 1, 1] and hvps == 6
    assert abs(value - 3.0) < 1e-12


def test_paper_lobpcg_stops_unconverged_on_products_that_are_not_finite():
    def broken(block):
        return torch.full_like(block, float("nan"))

    _, _, hvps, converged = bench.paper_lobpcg(broken, 20, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert not converged and hvps <= 3


def test_plain_operator_is_the_full_batch_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    X, Y = torch.randn(12, 4, dtype=F64), torch.randn(12, 3, dtype=F64)
    matvec, dim = bench.plain_operator(model, X, Y)
    reference = HessianOperator(model, mse_loss, X, Y, mode="double-backward")
    block = torch.randn(dim, 3, dtype=F64)
    assert dim == reference.dim
    torch.testing.assert_close(matvec(block), reference.matvec(block), rtol=1e-12, atol=1e-12)


def test_warm_solves_follow_one_sgd_trajectory_and_hand_on_each_solvers_vector():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    X, Y = torch.randn(20, 3), torch.randn(20, 2)
    seen = {"a": [], "b": []}

    def solver(method, value):
        def solve(target, warm, point):
            params = torch.cat([p.detach().flatten() for p in target.parameters()]).clone()
            seen[method].append((params, warm))
            return bench.Solve(vector=torch.full((1,), value + point), hvps=point, value=value, converged=True)
        return solve

    args = type("Args", (), {"sgd_lr": 0.1, "device": "cpu"})()
    solvers = {"a": (solver("a", 10.0), 1), "b": (solver("b", 20.0), 1)}
    outcomes = bench.warm_solves_along_sgd(model, X, Y, solvers, [0, 2, 5], args)

    # The same states for both solvers: the SGD steps of a generator seeded 1, taken once.
    manual = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.SGD(manual.parameters(), lr=0.1)
    states = [torch.cat([p.detach().flatten() for p in manual.parameters()]).clone()]
    for steps in (2, 3):
        for _ in range(steps):
            idx = bench.sample_batch_indices(20, 8, generator)
            optimizer.zero_grad()
            mse_loss(manual(X[idx]), Y[idx]).backward()
            optimizer.step()
        states.append(torch.cat([p.detach().flatten() for p in manual.parameters()]).clone())
    for method, start in (("a", 10.0), ("b", 20.0)):
        assert all(torch.equal(params, state) for (params, _), state in zip(seen[method], states))
        assert [None if warm is None else warm.item() for _, warm in seen[method]] == [None, start, start + 1]
        seconds, results = outcomes[method]
        assert len(seconds) == 2 and [r.hvps for r in results] == [1, 2]  # the cold solve is not a warm one
    assert torch.equal(torch.cat([p.detach().flatten() for p in model.parameters()]), states[0])  # model untouched


def test_epoch_batches_are_the_ones_training_visits():
    batches = bench.sgd_batches(20, 8, "epochs", 3, "cpu")
    first, second = epoch_permutation(3, 0, 20), epoch_permutation(3, 1, 20)
    expected = [first[:8], first[8:16], second[:8], second[8:16]]  # the last partial batch is dropped
    for want in expected:
        assert torch.equal(next(batches), want)
    fresh = bench.sgd_batches(20, 8, "replacement", 3, "cpu")
    generator = torch.Generator().manual_seed(3)
    for _ in range(3):
        assert torch.equal(next(fresh), bench.sample_batch_indices(20, 8, generator))


def test_training_run_row_pools_the_warm_solves_of_every_seed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    X, Y = torch.randn(40, 3), torch.randn(40, 2)
    starts = []

    def solve(target, warm, point):
        params = torch.cat([p.detach().flatten() for p in target.parameters()]).clone()
        starts.append(params)
        return bench.Solve(vector=torch.ones(1), hvps=point, value=float(params.sum()), converged=True)

    args = type("Args", (), {"sgd_lr": 0.1, "device": "cpu", "run_steps": 30, "run_seeds": 2,
                             "run_order": "epochs"})()
    [row] = bench.bench_lambda_max_training_run("tiny", model, X, Y, {"ours": (solve, 1)}, args)
    solves = len(starts) // 2
    assert solves >= 3 and len(starts) == 2 * solves
    # Each run starts from the model's initialisation and the two runs' batches differ.
    assert torch.equal(starts[0], starts[solves])
    assert not torch.equal(starts[1], starts[solves + 1])
    warm_counts = 2 * list(range(1, solves))
    assert row["hvps"] == statistics.median(warm_counts)
    assert f"{solves - 1} warm solves" in row["note"] and "2 runs" in row["note"] and "epochs" in row["note"]


def test_krylov_space_is_an_orthonormal_basis_of_the_krylov_sequence():
    matrix, _ = spectrum_matrix(dim=60)
    start = torch.randn(60, 1, generator=torch.Generator().manual_seed(5), dtype=F64)
    matvec, widths = counting(matrix)
    basis, products = bench.krylov_space(matvec, start, 6)
    assert widths == [1] * 6  # one HVP per basis vector
    torch.testing.assert_close(basis.T @ basis, torch.eye(6, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(products, matrix @ basis, rtol=0, atol=1e-12)
    sequence = start.clone()
    for _ in range(6):  # each H^j start lies in the span of the basis
        unit = sequence / sequence.norm()
        assert (unit - basis @ (basis.T @ unit)).norm() < 1e-10
        sequence = matrix @ sequence


def test_krylov_space_stops_when_invariant_and_the_floor_is_then_zero():
    """A start in the span of two eigenvectors (6 and 5.4) spans an invariant plane: two HVPs,
    and an exact top eigenpair in it (floor 0), while span{start} alone has the closed-form floor
    min_theta sqrt(a^2 (6 - theta)^2 + b^2 (5.4 - theta)^2) / theta."""
    matrix, _ = spectrum_matrix(dim=40)
    eigenvectors = torch.linalg.eigh(matrix).eigenvectors
    a, b = 0.6, 0.8
    start = a * eigenvectors[:, -1:] + b * eigenvectors[:, -2:-1]
    basis, products = bench.krylov_space(counting(matrix)[0], start, 10)
    assert basis.shape[1] == 2
    floors = bench.krylov_residual_floor(basis, products, centre=5.7, window=0.1, grid=2001)
    thetas = torch.linspace(5.7 * 0.9, 5.7 * 1.1, 200001, dtype=F64)
    closed_form = ((a**2 * (6 - thetas) ** 2 + b**2 * (5.4 - thetas) ** 2).sqrt() / thetas).min()
    assert abs(floors[0] - float(closed_form)) < 1e-9
    assert floors[1] < 1e-7


def test_krylov_residual_floor_is_the_smallest_residual_of_any_pair_in_the_space():
    """Against a direct minimisation (singular values of H Q_m - theta Q_m on a fine grid): the
    floor never exceeds the top Ritz pair's residual, falls as the space grows and is the
    minimum over theta, not only over u."""
    matrix, top = spectrum_matrix(dim=80)
    start = top + 0.3 * torch.randn(80, 1, generator=torch.Generator().manual_seed(6), dtype=F64)
    basis, products = bench.krylov_space(counting(matrix)[0], start, 8)
    floors = bench.krylov_residual_floor(basis, products, centre=6.0)
    thetas = torch.linspace(6.0 * 0.97, 6.0 * 1.03, 30001, dtype=F64)
    for m in range(1, 9):
        Q, HQ = basis[:, :m], products[:, :m]
        direct = min(float(torch.linalg.svdvals(HQ - theta * Q)[-1] / theta) for theta in thetas)
        assert floors[m - 1] <= direct + 1e-12
        assert floors[m - 1] >= direct - 1e-6 * max(direct, 1e-3)
        ritz_values, ritz_vectors = torch.linalg.eigh(Q.T @ HQ)
        ritz_residual = (HQ @ ritz_vectors[:, -1] - ritz_values[-1] * Q @ ritz_vectors[:, -1]).norm() / ritz_values[-1]
        assert floors[m - 1] <= ritz_residual + 1e-12
    assert all(later <= earlier + 1e-12 for earlier, later in zip(floors, floors[1:]))
    assert floors[-1] < floors[0] / 10


def test_fewest_krylov_hvps_never_exceeds_lanczos_from_the_same_start():
    """On a tiny network: Lanczos started from one vector searches exactly that vector's Krylov
    space, so the floor's count is at most Lanczos' own."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    X, Y = torch.randn(30, 5, dtype=F64), torch.randn(30, 3, dtype=F64)
    operator = HessianOperator(model, mse_loss, X, Y)
    start = torch.randn(operator.dim, 1, generator=torch.Generator().manual_seed(7), dtype=F64)
    result = eigs.lanczos(operator.matvec, operator.dim, tol=1e-3, init=start)
    assert result.converged
    fewest = bench.fewest_krylov_hvps(model, X, Y, start, 1e-3, result.matvecs)
    assert 1 <= fewest <= result.matvecs
    tight = bench.fewest_krylov_hvps(model, X, Y, start, 1e-8, 3)
    assert tight == 3  # not reachable in three HVPs: the search limit is returned
