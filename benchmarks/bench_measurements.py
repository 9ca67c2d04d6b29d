"""Cost of the curvature measurements against a plain double-backward baseline, in one run.

    python benchmarks/bench_measurements.py [--device cuda] [--json bench.json]

Models on synthetic CIFAR-shaped data (3 x 32 x 32 inputs, 10 classes, mse): the MLP
3072 -> 512 -> 512 -> 10 (1,841,162 parameters) on n = 2048 samples and the CNN (2,477,514
parameters) on n = 512. For every measurement a table row gives the wall time (median, min and
max over ``--repeats``), the Hessian-vector products (or per-batch quadratic forms) spent,
Monte Carlo samples, value and standard error, and the ratio to the baseline of the same
measurement, all from this run on this machine with the same thread count.

The baseline is written here and is deliberately plain: per batch one forward pass, one
gradient with ``create_graph=True`` and one double-backward Hessian-vector product; full-batch
quantities the same way on the whole data (one graph, one double backward per vector). It draws
the same batches from the same generator and applies the same stopping rule as ours, so values
and standard errors agree and only the time differs. Baselines that would take minutes per
repeat are timed on a few samples and scaled (marked ``scaled``). lambda_max is also solved by
LOBPCG with the cost profile of the paper's code (:func:`paper_lobpcg`), cold, warm-started,
along training and at training.py's cadence through ``--run-seeds`` runs of ``--run-steps``
steps (batches drawn as training.py draws them), on the same HVPs as the baseline.
At the first warm start a floor row gives the fewest HVPs after which any approximate eigenpair
from the Krylov space of the previous eigenvector meets the tolerance: a bound on every
single-vector method started there.

Also: full-batch lambda_max of the MLP on ``--large-n`` samples with chunked products in a
fresh process (peak resident memory, or peak CUDA memory), and the 1000-step sanity run
(64 samples, batch 4, --lambdamax --batch-sharpness) through ``training.main`` with its time
and checkpoint size. ``--only`` picks sections; ``--quick`` shrinks everything for a smoke run.

One script of about 850 lines, so that a single run times every measurement against the same
baseline, on the same machine and load.
"""

import argparse
import copy
import datetime
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from typing import NamedTuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

from _timing import in_turns, timed  # noqa: E402

from utils import measures  # noqa: E402
from utils.batch_forms import batch_route  # noqa: E402
from utils.config import RunConfig  # noqa: E402
from utils.data import load_dataset  # noqa: E402
from utils.eigs import power_iteration  # noqa: E402
from utils.estimators import mean_with_stopping, measurement_generator, sample_batch_indices  # noqa: E402
from utils.gram import linear_network  # noqa: E402
from utils.hvp import HessianOperator, default_hvp_mode  # noqa: E402
from utils.losses import mse_loss  # noqa: E402
from utils.models import build_model  # noqa: E402
from utils.monitor import measurement_schedule  # noqa: E402
from utils.r_operator import ChainCurvature, is_chain  # noqa: E402
from utils.schedule import is_due  # noqa: E402
from utils.training import epoch_permutation  # noqa: E402

SECTIONS = ("gradient", "hvp", "lambda_max", "batch_sharpness", "gni", "gni_all_b", "large", "sanity")
GNI_FIXED_SAMPLES = 500  # the fixed sample count of a GNI estimate without a stopping rule
PAPER_RELTOL = 0.005  # the relative tolerance of the paper code's lambda_max solves


# --- setup and timing ------------------------------------------------------------------------


def problem(name: str, n: int, device: str, side: int = 32):
    data = load_dataset("synthetic", root=None, loss="mse", num_data=n, input_shape=(3, side, side),
                        num_classes=10, device=device)
    model = build_model(name, (3, side, side), 10).to(device)
    return model, data.X_train, data.Y_train


def repeat(fn, repeats: int, device: str):
    """(list of seconds, last result) of ``repeats`` calls."""
    return in_turns({"": (fn, repeats)}, device)[""]


def row(model: str, measurement: str, method: str, seconds: list[float], *, hvps=None, samples=None,
        value=None, se=None, note: str = "") -> dict:
    return {"model": model, "measurement": measurement, "method": method,
            "median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds),
            "repeats": len(seconds), "hvps": hvps, "samples": samples, "value": value, "se": se,
            "note": note}


# --- the plain baseline ------------------------------------------------------------------------


def params_of(model):
    return [p for p in model.parameters() if p.requires_grad]


def plain_gradient(model, X, Y):
    return torch.autograd.grad(mse_loss(model(X), Y), params_of(model))


def plain_graph(model, X, Y):
    """The full-batch gradient with its graph kept for double backward."""
    return torch.autograd.grad(mse_loss(model(X), Y), params_of(model), create_graph=True)


def plain_hvp(model, grads, vector):
    return torch.autograd.grad(grads, params_of(model), vector, retain_graph=True)


def dot(a, b) -> float:
    return sum((x * y).sum() for x, y in zip(a, b)).item()


def plain_rayleigh(model, xb, yb) -> float:
    grads = plain_graph(model, xb, yb)
    detached = [g.detach() for g in grads]
    return dot(detached, plain_hvp(model, grads, detached)) / dot(detached, detached)


def plain_batch_sharpness(model, X, Y, b, generator, rel_se, max_samples):
    n = X.shape[0]

    def sample(m):
        return [plain_rayleigh(model, X[idx], Y[idx])
                for idx in (sample_batch_indices(n, b, generator, X.device) for _ in range(m))]

    return mean_with_stopping(sample, min_samples=20, max_samples=max_samples, rel_se=rel_se)


def plain_gni_samples(model, X, Y, b, generator, count):
    """``count`` samples g_B^T H g_B, each one batch gradient and one full-batch HVP."""
    n = X.shape[0]
    grads = plain_graph(model, X, Y)
    values = []
    for _ in range(count):
        idx = sample_batch_indices(n, b, generator, X.device)
        g_b = [g.detach() for g in plain_gradient(model, X[idx], Y[idx])]
        values.append(dot(g_b, plain_hvp(model, grads, g_b)))
    return values


def plain_operator(model, X, Y):
    """(matvec, dim) of the full-batch Hessian by plain double backward through one graph."""
    grads = plain_graph(model, X, Y)
    params = params_of(model)
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def matvec(V):
        columns = []
        for j in range(V.shape[1]):
            pieces = [piece.view(s) for piece, s in zip(V[:, j].split(sizes), shapes)]
            columns.append(torch.cat([h.reshape(-1) for h in plain_hvp(model, grads, pieces)]))
        return torch.stack(columns, dim=1)

    return matvec, sum(sizes)


def plain_lambda_max(model, X, Y, tol, max_hvps, generator):
    """Power iteration on the plain HVP, stopped on the same residual rule as ours."""
    matvec, dim = plain_operator(model, X, Y)
    p = params_of(model)[0]
    return power_iteration(matvec, dim, tol=tol, max_iter=max_hvps, generator=generator,
                           dtype=p.dtype, device=p.device)


def paper_lobpcg(matvec, dim, *, init=None, generator=None, reltol=PAPER_RELTOL, max_iter=100,
                 dtype=torch.float32, device="cpu"):
    """lambda_max by single-vector LOBPCG with the cost profile of the paper's code.

    As that code runs it for lambda_max (k = 1): the start x (the cached eigenvector, or a
    Gaussian vector) costs one product; each iteration takes the Rayleigh-Ritz step on
    span[x, r, p] (r = Hx - theta x, p the previous search direction; no p in the first
    iteration), multiplying the orthonormalised r and p by H (1 product, then 2), and then
    multiplies the new x by H once more (1 product) instead of combining the products it holds:
    2 HVPs in the first iteration, 3 after it. Convergence is tested after each iteration, never
    on the start, so a solve takes at least one iteration; it has converged when
    ||Hx - theta x|| < (reltol / 2) (||Hx|| + theta), about reltol * theta. The paper runs it at
    reltol 0.005 for at most 100 iterations. A column of [r, p] that has become dependent on
    the others is dropped but still counted, as that code multiplies it as well.
    Returns (value, vector, HVPs, converged); a product that is not finite ends the solve
    unconverged.
    """
    hvps = 0

    def product(block):
        nonlocal hvps
        hvps += block.shape[1]
        return matvec(block)

    if init is None:
        init = torch.randn(dim, 1, generator=generator, dtype=dtype).to(device)  # same start on every device
    x = init[:, :1] / init[:, :1].norm()
    hx = product(x)
    theta = float(x[:, 0] @ hx[:, 0])
    direction, converged = None, False
    for _ in range(max_iter):
        residual = hx - theta * x
        # Residual first, so that a search direction dependent on it is what drops out.
        new = residual if direction is None else torch.cat([residual, direction], dim=1)
        for _ in range(2):  # twice is enough to make float32 columns orthogonal to x
            new = new - x @ (x.T @ new)
        q, r = torch.linalg.qr(new)
        kept = r.diagonal().abs() > 1e-6 * r.diagonal().abs().max()
        hvps += int((~kept).sum())
        q = q[:, kept]
        if q.shape[1] == 0:
            break
        basis = torch.cat([x, q], dim=1)
        images = torch.cat([hx, product(q)], dim=1)
        projected = basis.T.double() @ images.double()
        values, vectors = torch.linalg.eigh((projected + projected.T) / 2)
        top = vectors[:, -1:].to(dtype)
        x = basis @ top
        direction = q @ top[1:]
        x = x / x.norm()
        hx = product(x)  # the paper's redundant product: images @ top would do
        theta = float(values[-1])
        if not torch.isfinite(hx).all():
            break
        converged = bool((hx - theta * x).norm() < reltol / 2 * (hx.norm() + theta))
        if converged:
            break
    return theta, x, hvps, converged


# --- sections ---------------------------------------------------------------------------------


def bench_gradient_and_hvp(name, model, X, Y, args, with_hvp: bool):
    """One full-batch gradient, and one full-batch HVP on a new vector by each exact mode."""
    from torch.func import functional_call, grad, jvp, vmap

    plain_graph(model, X, Y)  # the first call on a device pays one-off start-up costs
    build, grads = timed(lambda: plain_graph(model, X, Y), args.device)
    params = params_of(model)
    vectors = [torch.randn_like(p) for p in params]
    block = 8
    batched = [torch.randn(block, *p.shape, device=p.device, dtype=p.dtype) for p in params]
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    detached = {k: p.detach() for k, p in model.named_parameters()}
    tangent = dict(zip(names, vectors))

    def loss_of(values):
        return mse_loss(functional_call(model, values, (X,)), Y)

    calls = {"gradient": (lambda: plain_gradient(model, X, Y), args.repeats)}
    chain = None
    if with_hvp and is_chain(model):
        ChainCurvature(model, mse_loss, X, Y)  # one-off start-up costs, as for plain_graph above
        chain_build, chain = timed(lambda: ChainCurvature(model, mse_loss, X, Y), args.device)
        calls.update({
            "r-operator": (lambda: chain.product(vectors), args.repeats),
            "vmap r-operator": (lambda: chain.products(batched), args.repeats),
        })
    if with_hvp:
        calls.update({
            "double backward": (lambda: plain_hvp(model, grads, vectors), args.repeats),
            "vmap block": (lambda: torch.autograd.grad(grads, params, batched, retain_graph=True,
                                                       is_grads_batched=True), args.repeats),
            "forward-over-reverse": (lambda: jvp(grad(loss_of), (detached,), (tangent,)), args.repeats),
            "vmap forward-over-reverse": (lambda: vmap(lambda t: jvp(grad(loss_of), (detached,), (t,))[1])(
                dict(zip(names, batched))), args.repeats),
        })
    results = in_turns(calls, args.device, warm_up=True)
    gradient = results["gradient"][0]
    rows = [row(name, "full-batch gradient", "forward + backward", gradient)]
    if not with_hvp:
        return rows
    rows.append(row(name, "HVP graph (one-off)", "gradient with create_graph", [build],
                    note=f"{build / statistics.median(gradient):.2f}x gradient"))
    if chain is not None:
        rows.append(row(name, "HVP graph (one-off)", "r-operator primal pass (forward + backward)", [chain_build],
                        note=f"{chain_build / statistics.median(gradient):.2f}x gradient"))
    ours = default_hvp_mode(model, X.device)
    methods = {"double backward": ("double backward, retained graph", 1, "double-backward"),
               "vmap block": (f"block of {block} (is_grads_batched), per vector", block, "double-backward-batched"),
               "forward-over-reverse": ("torch.func forward-over-reverse jvp(grad)", 1, "forward-over-reverse"),
               "vmap forward-over-reverse": (f"vmap of jvp(grad), block of {block}, per vector", block, None),
               "r-operator": ("r-operator on the cached primal pass", 1, "r-operator"),
               "vmap r-operator": (f"vmap of the r-operator, block of {block}, per vector", block, None)}
    for key, (method, per_call, mode) in methods.items():
        if key not in results:
            continue
        if mode == ours:
            method += f" (ours: {ours})"
        seconds = [s / per_call for s in results[key][0]]
        rows.append(row(name, "HVP on a new vector", method, seconds, hvps=1,
                        note=f"{statistics.median(seconds) / statistics.median(gradient):.2f}x gradient"))
    return rows


def sgd_steps(model, X, Y, steps, lr, batch, seed):
    """A copy of ``model`` after a few plain SGD steps (the state a warm start meets)."""
    moved = copy.deepcopy(model)
    generator = torch.Generator(device=X.device).manual_seed(seed)
    optimizer = torch.optim.SGD(moved.parameters(), lr=lr)
    for _ in range(steps):
        idx = sample_batch_indices(X.shape[0], batch, generator, X.device)
        optimizer.zero_grad()
        mse_loss(moved(X[idx]), Y[idx]).backward()
        optimizer.step()
    return moved


class Solve(NamedTuple):
    """What a lambda_max solve hands on: its vector (the next warm start), cost and value."""

    vector: torch.Tensor
    hvps: int
    value: float
    converged: bool


def bench_lambda_max(name, model, X, Y, args):
    """lambda_max cold, at the first warm start and along training: ours (Lanczos, tol 1e-3)
    and, for the models in ``--lobpcg-baseline``, LOBPCG as the paper's code runs it (at its
    tolerance of 0.5 % and at ours), on the same model states."""
    tol = 1e-3

    def ours(target, warm, seed):
        result, estimate = measures.lambda_max(target, mse_loss, X, Y, tol=tol, warm_start=warm,
                                               generator=measurement_generator(0, seed))
        return Solve(result.vectors, estimate.hvps, estimate.value, result.converged)

    def paper(reltol):
        def solve(target, warm, seed):
            matvec, dim = plain_operator(target, X, Y)
            p = params_of(target)[0]
            value, vector, hvps, converged = paper_lobpcg(matvec, dim, init=warm, reltol=reltol, dtype=p.dtype,
                                                          device=p.device, generator=measurement_generator(0, seed))
            return Solve(vector, hvps, value, converged)
        return solve

    solvers = {f"ours: Lanczos, tol {tol:.1%}": (ours, args.repeats)}
    if args.lobpcg_baseline:
        # At the paper's tolerance, and at ours for a comparison at equal accuracy.
        for reltol in (PAPER_RELTOL, tol):
            solvers[f"baseline: LOBPCG as in the paper, tol {reltol:.1%}"] = (paper(reltol), args.baseline_repeats)
    rows, colds = [], {}
    for method, (solve, repeats) in solvers.items():
        seconds, colds[method] = repeat(lambda: solve(model, None, 1), repeats, args.device)
        cold = colds[method]
        rows.append(row(name, "lambda_max, cold", method, seconds, hvps=cold.hvps, value=cold.value,
                        note="" if cold.converged else "not converged"))
    sharpness = colds[next(iter(solvers))].value
    if args.sgd_lr * sharpness >= 2:
        raise SystemExit(f"{name}: SGD at lr {args.sgd_lr} diverges from this initialisation (lambda_max "
                         f"{sharpness:.3g} >= 2/lr); pass --sgd-lr below {2 / sharpness:.2g}")
    rows += bench_first_warm_solve(name, model, X, Y, solvers, colds, args, tol)
    rows += bench_lambda_max_along_training(name, model, X, Y, solvers, args)
    if args.run_steps:
        rows += bench_lambda_max_training_run(name, model, X, Y, solvers, args)
    seconds, result = repeat(lambda: plain_lambda_max(model, X, Y, tol, args.power_max_hvps,
                                                      measurement_generator(0, 1)), 1, args.device)
    note = "" if result.converged else f"not converged, residual {float(result.residuals[0]):.1e}"
    rows.append(row(name, "lambda_max, cold", f"baseline: power iteration, tol {tol:.1%}", seconds,
                    hvps=result.matvecs, value=float(result.values[0]), note=note))
    return rows


def spread(counts: list[int]) -> str:
    return (f"HVPs median {statistics.median(counts)}, mean {statistics.mean(counts):.1f}, "
            f"range {min(counts)}-{max(counts)}")


def bench_first_warm_solve(name, model, X, Y, solvers, colds, args, tol) -> list[dict]:
    """The first warm solve of a run: ``--warm-steps`` SGD steps (batch 8, lr ``--sgd-lr``)
    after the cold solve at initialisation, started from its eigenvector (each solver from its
    own). The cost depends on how the steps rotate the top eigenvectors, so it is taken over
    ``--warm-draws`` draws of the steps; a row gives the median time and HVPs, its note their
    spread and how far the values lie from ours. A last row gives, for the same states, the
    fewest HVPs any single-vector method started from our previous eigenvector could stop at
    (:func:`fewest_krylov_hvps`, searched up to our own count)."""
    outcomes = {method: ([], []) for method in solvers}
    ours = next(iter(solvers))
    floor_seconds, floor_counts = [], []
    for draw in range(1, args.warm_draws + 1):
        moved = sgd_steps(model, X, Y, steps=args.warm_steps, lr=args.sgd_lr, batch=8, seed=draw)
        for method, (solve, _) in solvers.items():
            took, result = timed(lambda: solve(moved, colds[method].vector, 2), args.device)
            outcomes[method][0].append(took)
            outcomes[method][1].append(result)
        took, fewest = timed(lambda: fewest_krylov_hvps(moved, X, Y, colds[ours].vector, tol,
                                                        outcomes[ours][1][-1].hvps), args.device)
        floor_seconds.append(took)
        floor_counts.append(fewest)
    what = f"{args.warm_draws} draw(s) of the {args.warm_steps} SGD steps"
    rows = [warm_row(name, "lambda_max, warm", f"{method} ({args.warm_steps} SGD steps later)",
                     seconds, results, outcomes[ours][1], what)
            for method, (seconds, results) in outcomes.items()]
    rows.append(row(name, "lambda_max, warm", f"floor: best pair in the Krylov space of our previous vector "
                    f"({args.warm_steps} SGD steps later)", floor_seconds, hvps=statistics.median(floor_counts),
                    note=f"{what}: {spread(floor_counts)}; time: building the space"))
    return rows


def krylov_space(matvec, start: torch.Tensor, size: int) -> tuple:
    """(Q, H Q) for an orthonormal basis Q of the Krylov space K_size(H, start) =
    span{start, H start, ..., H^(size-1) start}: ``size`` HVPs, each new direction
    orthogonalised twice against Q. Stops early if the space becomes invariant."""
    basis = [start.reshape(-1, 1) / start.norm()]
    products = []
    while True:
        products.append(matvec(basis[-1]))
        if len(basis) == size:
            break
        direction = products[-1]
        Q = torch.cat(basis, dim=1)
        for _ in range(2):
            direction = direction - Q @ (Q.T @ direction)
        norm = direction.norm()
        if norm <= 1e-10 * products[-1].norm():
            break
        basis.append(direction / norm)
    return torch.cat(basis, dim=1), torch.cat(products, dim=1)


def krylov_residual_floor(basis: torch.Tensor, products: torch.Tensor, centre: float, window: float = 0.03,
                          grid: int = 601) -> list[float]:
    """For m = 1 .. M, the smallest relative residual of ANY approximate eigenpair (theta, u)
    with u in the span of the first m columns of the orthonormal ``basis`` (``products`` = H basis)
    and theta within ``window`` of ``centre`` (relative):

        floor_m = min_theta  min_{u in span(Q_m), |u| = 1}  |H u - theta u| / theta
                = min_theta  sigma_min(H Q_m - theta Q_m) / theta.

    sigma_min^2 is the smallest eigenvalue of (H Q_m - theta Q_m)^T (H Q_m - theta Q_m), formed
    from the Gram matrix of [Q, H Q] in float64; the minimum over theta is taken on a grid, then
    refined by ternary search around the best grid point. A solver whose search space lies in
    span(Q_m) (every single-vector method started from Q's first column: Lanczos, LOBPCG with one
    vector, power or Chebyshev iteration) cannot stop on the residual test ``tol`` before the
    first m with floor_m <= tol, whatever vector it picks and whatever shift within the window."""
    size = basis.shape[1]
    W = torch.cat([basis, products], dim=1).double()
    gram = W.T @ W

    def relative(thetas: torch.Tensor, m: int) -> torch.Tensor:
        qq, qh, hh = gram[:m, :m], gram[:m, size : size + m], gram[size : size + m, size : size + m]
        t = thetas.reshape(-1, 1, 1)
        normal = hh - t * (qh + qh.T) + t * t * qq
        return torch.linalg.eigvalsh(normal)[:, 0].clamp_min(0).sqrt() / thetas

    thetas = centre * torch.linspace(1 - window, 1 + window, grid, dtype=torch.float64)
    spacing = float(thetas[1] - thetas[0])
    floors = []
    for m in range(1, size + 1):
        values = relative(thetas, m)
        best = int(values.argmin())
        low, high = max(float(thetas[best]) - spacing, float(thetas[0])), min(float(thetas[best]) + spacing,
                                                                              float(thetas[-1]))
        for _ in range(50):
            pair = torch.tensor([low + (high - low) / 3, high - (high - low) / 3], dtype=torch.float64)
            left, right = relative(pair, m).tolist()
            if left < right:
                high = float(pair[1])
            else:
                low = float(pair[0])
        refined = float(relative(torch.tensor([(low + high) / 2], dtype=torch.float64), m))
        floors.append(min(float(values[best]), refined))
    return floors


def fewest_krylov_hvps(model, X, Y, start, tol: float, max_hvps: int) -> int:
    """The fewest HVPs after which some pair from K_m(H, start) of ``model``'s full-batch Hessian
    meets the residual test ``tol`` (:func:`krylov_residual_floor`, centred on the top Ritz value
    of the largest space); ``max_hvps`` if none does within that many."""
    operator = HessianOperator(model, mse_loss, X, Y)
    basis, products = krylov_space(operator.matvec, start.to(operator.dtype), max_hvps)
    projected = basis.T.double() @ products.double()
    top_ritz_value = float(torch.linalg.eigvalsh((projected + projected.T) / 2)[-1])
    floors = krylov_residual_floor(basis, products, top_ritz_value)
    return next((m for m, floor in enumerate(floors, start=1) if floor <= tol), max_hvps)


def warm_row(name, measurement, method, seconds, results, reference, what) -> dict:
    counts = [r.hvps for r in results]
    note = f"{what}: {spread(counts)}; value of the first"
    if results is not reference:
        worst = max(abs(r.value - ref.value) / abs(ref.value) for r, ref in zip(results, reference))
        note += f"; values differ from ours by up to {worst:.1e} (relative)"
    missed = sum(not r.converged for r in results)
    if missed:
        note += f"; {missed} not converged"
    return row(name, measurement, method, seconds, hvps=statistics.median(counts), value=results[0].value, note=note)


def sgd_batches(n: int, batch: int, order: str, seed: int, device):
    """Endless batch indices of an SGD run: ``"replacement"`` draws every batch afresh from a
    generator seeded ``seed``; ``"epochs"`` walks through the data as ``training.py`` does
    (:func:`epoch_permutation` with data-ordering seed ``seed``, the last partial batch dropped)."""
    if order == "replacement":
        generator = torch.Generator(device=device).manual_seed(seed)
        while True:
            yield sample_batch_indices(n, batch, generator, device)
    for epoch in itertools.count():
        permutation = epoch_permutation(seed, epoch, n).to(device)
        for start in range(0, n - batch + 1, batch):
            yield permutation[start : start + batch]


def warm_solves_along_sgd(model, X, Y, solvers, solve_steps, args, order: str = "replacement", seed: int = 1) -> dict:
    """Plain SGD (batch 8, lr ``--sgd-lr``, batches from :func:`sgd_batches` in ``order`` with
    ``seed``) from initialisation, with a lambda_max solve by every solver at each of
    ``solve_steps`` (the state before that step's update), each started from the previous
    eigenvector of the same solver. Returns, per solver, the times and results of the warm
    solves (the first is cold)."""
    moved = copy.deepcopy(model)
    batches = sgd_batches(X.shape[0], 8, order, seed, X.device)
    optimizer = torch.optim.SGD(moved.parameters(), lr=args.sgd_lr)
    caches = {method: None for method in solvers}
    outcomes = {method: ([], []) for method in solvers}
    step = 0
    for point, solve_step in enumerate(solve_steps):
        for _ in range(solve_step - step):
            idx = next(batches)
            optimizer.zero_grad()
            mse_loss(moved(X[idx]), Y[idx]).backward()
            optimizer.step()
        step = solve_step
        for method, (solve, _) in solvers.items():
            took, result = timed(lambda: solve(moved, caches[method], point), args.device)
            caches[method] = result.vector
            if point > 0:
                outcomes[method][0].append(took)
                outcomes[method][1].append(result)
    return outcomes


def bench_lambda_max_along_training(name, model, X, Y, solvers, args) -> list[dict]:
    """Warm-started lambda_max every ``--trajectory-every`` SGD steps from initialisation
    (:func:`warm_solves_along_sgd`). A row gives the median time and HVPs of the warm solves;
    the note their spread."""
    steps = [point * args.trajectory_every for point in range(args.trajectory_points + 1)]
    outcomes = warm_solves_along_sgd(model, X, Y, solvers, steps, args)
    what = f"{args.trajectory_points} warm solves every {args.trajectory_every} SGD steps from initialisation"
    reference = outcomes[next(iter(solvers))][1]
    return [warm_row(name, "lambda_max, warm along training", method, seconds, results, reference, what)
            for method, (seconds, results) in outcomes.items()]


def bench_lambda_max_training_run(name, model, X, Y, solvers, args) -> list[dict]:
    """Warm-started lambda_max as ``training.py --lambdamax`` measures a run of ``--run-steps``
    steps: at its default cadence (dense in the first tenth, sparser later), through the
    progressive sharpening of the run's early phase. How much the top eigenvectors turn between
    solves depends on the batches, so the warm solves of ``--run-seeds`` runs (batch orders
    ``--run-order`` with seeds 1, 2, ...) are pooled."""
    cadence = measurement_schedule(RunConfig(lambdamax=True), args.run_steps)["lambdamax"]
    steps = [step for step in range(args.run_steps) if is_due(cadence, step)]
    outcomes = {method: ([], []) for method in solvers}
    for seed in range(1, args.run_seeds + 1):
        run = warm_solves_along_sgd(model, X, Y, solvers, steps, args, order=args.run_order, seed=seed)
        for method, (seconds, results) in run.items():
            outcomes[method][0].extend(seconds)
            outcomes[method][1].extend(results)
    runs = "one run" if args.run_seeds == 1 else f"each of {args.run_seeds} runs"
    what = (f"{len(steps) - 1} warm solves at training.py's default cadence (steps {steps[1]}, ..., {steps[-1]}) "
            f"in {runs} of {args.run_steps} SGD steps (batch order: {args.run_order})")
    reference = outcomes[next(iter(solvers))][1]
    return [warm_row(name, "lambda_max, warm in a training run", method, seconds, results, reference, what)
            for method, (seconds, results) in outcomes.items()]


def bench_batch_sharpness(name, model, X, Y, args, batch_sizes):
    rows = []
    for b in batch_sizes:
        options = {"rel_se": 0.005, "max_samples": args.max_samples}
        # One untimed batch of each first, so neither pays the one-off costs of a first call.
        plain_rayleigh(model, X[:b], Y[:b])
        measures.batch_sharpness(model, mse_loss, X, Y, b, generator=measurement_generator(1, b), min_samples=2,
                                 max_samples=2)
        results = in_turns({
            "ours": (lambda: measures.batch_sharpness(model, mse_loss, X, Y, b, generator=measurement_generator(0, b),
                                                      **options), args.repeats),
            "baseline": (lambda: plain_batch_sharpness(model, X, Y, b, measurement_generator(0, b), **options),
                         args.baseline_repeats)}, args.device)
        (seconds, est), (base_seconds, base) = results["ours"], results["baseline"]
        rows.append(row(name, f"Batch Sharpness b={b}, SE 0.5%", f"ours: {batch_route(model, mse_loss, X, Y, batch_size=b)}",
                        seconds, hvps=est.hvps, samples=est.n, value=est.value, se=est.se))
        rows.append(row(name, f"Batch Sharpness b={b}, SE 0.5%", "baseline: one batch at a time",
                        base_seconds, hvps=base.n, samples=base.n, value=base.value, se=base.se))
        rows[-2]["note"] = f"{statistics.median(base_seconds) / statistics.median(seconds):.1f}x faster"
    return rows


def bench_gni(name, model, X, Y, args):
    b = 8
    limits = {"max_samples": args.gni_max_samples}
    count = args.gni_baseline_samples
    results = in_turns({
        "ours": (lambda: measures.gni(model, mse_loss, X, Y, b, generator=measurement_generator(0, 3), **limits),
                 args.repeats),
        "baseline": (lambda: plain_gni_samples(model, X, Y, b, measurement_generator(0, 3), count), 1)},
        args.device)
    (seconds, est), (base_seconds, _) = results["ours"], results["baseline"]
    if linear_network(model, mse_loss, X, Y) is not None:
        method = "ours: batch directions per data pass"
    elif default_hvp_mode(model, X.device) == "r-operator":
        method = "ours: blocks of quadratic forms (r-operator)"
    else:
        method = "ours: blocks of exact HVPs"
    rows = [row(name, f"GNI b={b}, SE 1%", method, seconds, hvps=est.hvps, samples=est.n,
                value=est.value, se=est.se)]
    scaled = [s * GNI_FIXED_SAMPLES / count for s in base_seconds]
    rows.append(row(name, f"GNI b={b}, SE 1%", f"baseline: {GNI_FIXED_SAMPLES} sequential full-batch HVPs",
                    scaled, hvps=GNI_FIXED_SAMPLES, samples=GNI_FIXED_SAMPLES,
                    note=f"scaled from {count} samples"))
    if est.n == args.gni_max_samples and est.se > 0.01 * abs(est.value):
        # Capped before the 1 % rule fired: only the cost per sample compares.
        per_sample = (statistics.median(scaled) / GNI_FIXED_SAMPLES) / (statistics.median(seconds) / est.n)
        rows[0]["note"] = (f"{per_sample:.1f}x faster per sample; capped at {est.n} samples "
                           f"(SE {est.se / abs(est.value):.1%})")
    else:
        rows[0]["note"] = f"{statistics.median(scaled) / statistics.median(seconds):.1f}x faster"
    return rows


def bench_gni_all_b(name, model, X, Y, args):
    n = X.shape[0]
    sizes = [b for b in (8, 16, 32, 64, 128, 256, 512, 1024) if b < n] + [n]
    seconds, by_size = repeat(lambda: measures.gni_by_batch_size(model, mse_loss, X, Y, sizes,
                                                                 generator=measurement_generator(0, 4)),
                              args.repeats, args.device)
    est = by_size[sizes[0]]
    rows = [row(name, f"GNI for {len(sizes)} batch sizes 8..n", "ours: one tr(HS) estimate", seconds,
                hvps=est.hvps, samples=est.n, value=est.value, se=est.se,
                note=", ".join(f"b={b}: {e.value:.4g}" for b, e in by_size.items()))]
    per_size = []
    for b in sizes[:3]:
        s, _ = timed(lambda: measures.gni(model, mse_loss, X, Y, b, generator=measurement_generator(0, 5)),
                     args.device)
        per_size.append(s)
    total = statistics.mean(per_size) * len(sizes)
    rows.append(row(name, f"GNI for {len(sizes)} batch sizes 8..n", "ours: measures.gni per batch size",
                    [total], note=f"scaled from b = {', '.join(map(str, sizes[:3]))}"))
    rows[0]["note"] = f"{total / statistics.median(seconds):.1f}x faster; " + rows[0]["note"]
    return rows


def bench_large(args) -> list[dict]:
    """lambda_max of the MLP on --large-n samples in a fresh process, for its peak memory."""
    command = [sys.executable, os.path.abspath(__file__), "--large-worker", "--large-n", str(args.large_n),
               "--device", args.device, "--hvp-chunk", str(args.hvp_chunk)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    note = f"peak {result['peak_bytes'] / 2**30:.2f} GiB ({result['peak_kind']}); chunks of {args.hvp_chunk}"
    if not result["converged"]:
        note += "; not converged"
    return [row("mlp", f"lambda_max on n={args.large_n}, tol 1e-3", "ours: Lanczos, chunked HVPs",
                [result["seconds"]], hvps=result["hvps"], value=result["value"], note=note)]


def peak_resident_bytes() -> int:
    """This process's peak resident set: VmHWM on Linux (ru_maxrss survives exec, so a child
    of a large process would report its parent's peak), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def large_worker(args) -> None:
    model, X, Y = problem("mlp", args.large_n, args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    seconds, (eig, est) = timed(lambda: measures.lambda_max(model, mse_loss, X, Y, tol=1e-3, chunk_size=args.hvp_chunk,
                                                            generator=measurement_generator(0, 6)), args.device)
    if args.device.startswith("cuda"):
        peak, kind = torch.cuda.max_memory_allocated(), "CUDA allocated"
    else:
        peak, kind = peak_resident_bytes(), "resident set"
    print(json.dumps({"seconds": seconds, "hvps": est.hvps, "value": est.value, "converged": bool(eig.converged),
                      "peak_bytes": peak, "peak_kind": kind}))


def bench_sanity(args) -> list[dict]:
    """The 1000-step CPU sanity run with lambda_max and Batch Sharpness, through training.main,
    and the same run without measurements (what the machine's load does to plain training)."""
    import pandas as pd

    import training

    steps = 100 if args.quick else 1000
    base = ["--dataset", "synthetic", "--input-shape", "3,32,32", "--num-data", "64", "--model", "mlp",
            "--loss", "mse", "--batch", "4", "--lr", "0.05", "--steps", str(steps), "--quiet"]
    if args.device == "cpu":
        base.append("--cpu")
    rows = []
    for label, extra in (("with --lambdamax --batch-sharpness", ["--lambdamax", "--batch-sharpness"]),
                         ("training only", [])):
        with tempfile.TemporaryDirectory() as folder:
            run_dir = os.path.join(folder, "run")
            seconds, code = timed(lambda: training.main([*base, *extra, "--run-dir", run_dir]), args.device)
            if code != 0:
                raise SystemExit(f"sanity run failed with exit code {code}")
            folder_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(run_dir)
                               for f in files)
            checkpoints = len(os.listdir(os.path.join(run_dir, "checkpoints")))
            frame = pd.read_csv(os.path.join(run_dir, "results.txt"), comment="#")
        note = f"run folder {folder_bytes / 2**20:.0f} MiB in {checkpoints} checkpoints"
        if extra:
            note += (f"; lambda_max measured {int(frame['lambda_max'].notna().sum())}x "
                     f"({frame['lambda_max_seconds'].sum():.1f} s), Batch Sharpness "
                     f"{int(frame['batch_sharpness'].notna().sum())}x ({frame['batch_sharpness_seconds'].sum():.1f} s)")
        rows.append(row("mlp n=64", f"sanity run: {steps} steps, b=4", f"training.main, {label}", [seconds],
                        note=note))
    return rows


# --- output -----------------------------------------------------------------------------------


def fmt(value, digits=4) -> str:
    if value is None:
        return ""
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}g}"


def markdown(rows: list[dict]) -> str:
    header = ["model", "measurement", "method", "median s", "range s", "HVPs", "samples", "value", "SE", "note"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["model"], r["measurement"], r["method"], fmt(r["median_s"], 3),
                 f"{fmt(r['min_s'], 3)}–{fmt(r['max_s'], 3)}", fmt(r["hvps"]), fmt(r["samples"]),
                 fmt(r["value"]), fmt(r["se"], 2), r["note"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--repeats", type=int, default=3, help="repeats of our measurements (median and range)")
    p.add_argument("--baseline-repeats", type=int, default=1, help="repeats of the slow baselines")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=None, help="run only these sections")
    p.add_argument("--models", nargs="+", choices=("mlp", "cnn", "resnet", "resnet_bn"), default=["mlp", "cnn"],
                   help="the convolutional models run on --cnn-n samples with the --cnn-* settings")
    p.add_argument("--mlp-n", type=int, default=2048)
    p.add_argument("--cnn-n", type=int, default=512)
    p.add_argument("--max-samples", type=int, default=1000, help="Batch Sharpness sample limit")
    p.add_argument("--gni-max-samples", type=int, default=1000, help="GNI sample limit")
    p.add_argument("--gni-baseline-samples", type=int, default=10, help="baseline GNI samples timed (then scaled to 500)")
    p.add_argument("--power-max-hvps", type=int, default=150, help="cap of the power-iteration baseline")
    p.add_argument("--cnn-side", type=int, default=32,
                   help="image side of the CNN's inputs (12: small batches whose cost is mostly overhead)")
    p.add_argument("--cnn-repeats", type=int, default=1, help="repeats of our measurements on the CNN")
    p.add_argument("--cnn-gni-max-samples", type=int, default=40, help="GNI sample limit on the CNN")
    p.add_argument("--cnn-power-max-hvps", type=int, default=30, help="power-iteration cap on the CNN")
    p.add_argument("--lobpcg-baseline", nargs="*", choices=("mlp", "cnn", "resnet", "resnet_bn"), default=["mlp"],
                   help="models whose lambda_max rows also run LOBPCG as in the paper's code (none: no models)")
    p.add_argument("--cnn-gni-baseline-samples", type=int, default=3, help="baseline GNI samples timed on the CNN")
    p.add_argument("--warm-steps", type=int, default=5, help="SGD steps between the cold and the warm lambda_max")
    p.add_argument("--sgd-lr", type=float, default=0.05, help="learning rate of the SGD steps between lambda_max solves")
    p.add_argument("--warm-draws", type=int, default=8, help="draws of those SGD steps (first warm solve)")
    p.add_argument("--cnn-warm-draws", type=int, default=1, help="the same on the CNN")
    p.add_argument("--trajectory-points", type=int, default=20, help="warm lambda_max solves along training")
    p.add_argument("--trajectory-every", type=int, default=10, help="SGD steps between those solves")
    p.add_argument("--cnn-trajectory-points", type=int, default=4, help="warm solves along training on the CNN")
    p.add_argument("--run-steps", type=int, default=1000,
                   help="SGD steps of the training run whose lambda_max solves follow training.py's cadence (0: skip)")
    p.add_argument("--cnn-run-steps", type=int, default=0, help="the same on the convolutional models")
    p.add_argument("--run-seeds", type=int, default=3,
                   help="training runs (batch orders) whose warm solves are pooled")
    p.add_argument("--run-order", choices=("epochs", "replacement"), default="epochs",
                   help="batches of those runs: epochs as training.py draws them, or each batch drawn afresh")
    p.add_argument("--large-n", type=int, default=8192, help="samples of the chunked lambda_max (50000: CIFAR-10 size)")
    p.add_argument("--hvp-chunk", type=int, default=2048, help="chunk of the large lambda_max")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke run")
    p.add_argument("--json", default=None, help="write the rows and the settings here")
    p.add_argument("--large-worker", action="store_true", help=argparse.SUPPRESS)
    return p


def main() -> None:
    args = build_parser().parse_args()
    for flag in ("run_steps", "cnn_run_steps"):
        if getattr(args, flag) < 0 or getattr(args, flag) == 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be 0 (no training run) or at least 2 (one warm solve)")
    for flag in ("trajectory_points", "cnn_trajectory_points", "warm_draws", "cnn_warm_draws", "trajectory_every",
                 "run_seeds"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.large_worker:
        large_worker(args)
        return
    if args.quick:
        args.repeats, args.mlp_n, args.cnn_n, args.large_n, args.hvp_chunk = 1, 128, 32, 256, 100
        args.max_samples, args.gni_max_samples, args.gni_baseline_samples, args.power_max_hvps = 40, 40, 2, 20
        args.cnn_gni_max_samples, args.cnn_power_max_hvps, args.cnn_gni_baseline_samples = 20, 10, 2
        args.trajectory_points, args.cnn_trajectory_points, args.warm_draws, args.cnn_warm_draws = 3, 2, 2, 1
        args.run_steps, args.cnn_run_steps, args.run_seeds = 60, 0, 2
    sections = args.only or SECTIONS
    rows = []
    for name in args.models:
        convolutional = name != "mlp"
        n = args.cnn_n if convolutional else args.mlp_n
        model, X, Y = problem(name, n, args.device, args.cnn_side if convolutional else 32)
        label = f"{name} n={n}"
        limits = copy.copy(args)
        limits.lobpcg_baseline = name in args.lobpcg_baseline
        if convolutional:  # every exact HVP of these costs seconds on a CPU: fewer and capped
            limits.repeats, limits.gni_max_samples = args.cnn_repeats, args.cnn_gni_max_samples
            limits.power_max_hvps, limits.gni_baseline_samples = args.cnn_power_max_hvps, args.cnn_gni_baseline_samples
            limits.trajectory_points, limits.warm_draws = args.cnn_trajectory_points, args.cnn_warm_draws
            limits.run_steps = args.cnn_run_steps
        if "gradient" in sections or "hvp" in sections:
            rows += bench_gradient_and_hvp(label, model, X, Y, limits, with_hvp="hvp" in sections)
        if "lambda_max" in sections:
            rows += bench_lambda_max(label, model, X, Y, limits)
        if "batch_sharpness" in sections:
            rows += bench_batch_sharpness(label, model, X, Y, limits, (8, 64) if name == "mlp" else (8,))
        if "gni" in sections:
            rows += bench_gni(label, model, X, Y, limits)
        if "gni_all_b" in sections and name == "mlp":
            rows += bench_gni_all_b(label, model, X, Y, limits)
        print(markdown(rows), flush=True)
    if "large" in sections:
        rows += bench_large(args)
    if "sanity" in sections:
        rows += bench_sanity(args)
    options = {k: v for k, v in vars(args).items() if k not in ("large_worker", "threads")}
    settings = {**options, "date": datetime.date.today().isoformat(), "device": args.device,
                "threads": torch.get_num_threads(), "torch": torch.__version__, "command": " ".join(sys.argv)}
    print(f"\n{settings['date']}, {args.device}, {settings['threads']} threads, torch {torch.__version__}")
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": settings, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
