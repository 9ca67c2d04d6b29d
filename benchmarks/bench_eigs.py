"""HVP counts of the eigen-solvers, cold and warm-started, on Hessian-like test problems.

Not a test: prints a table so the numbers can be re-measured. Usage:

    python benchmarks/bench_eigs.py [--dim 2000] [--seeds 3] [--tol 1e-3] [--no-mlp]

Problems (each measured twice: at a "before" operator, then at a slightly moved "after" one):
    outliers   Q diag(50, 30, 20, 10, bulk) Q^T with a bulk of small and negative eigenvalues
               (density peaked at 0, range [-2, 4]); "after" adds a symmetric perturbation whose
               entries in the eigenbasis scale like sqrt(|lambda_i| + 1)(|lambda_j| + 1), as a
               Gauss-Newton-like Hessian changes when the parameters move.
    cluster    the same with a tight top cluster 10, 9.95, 9.9, 9.8, 9.6, 9.3 as at the edge of
               stability, where many eigenvalues sit near 2 / lr.
    mlp        Hessian of a small tanh MLP (mse, synthetic data) after 200 and 210 full-batch
               gradient steps (torch.func forward-over-reverse products, float32).
For every problem and solver: HVPs from a cold start at "after", HVPs warm-started at "after"
from the vectors returned at "before", the top-eigenvector overlap between the two operators,
and the largest relative error of lambda_1 against a tight reference solve.
"""

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch
from torch.func import functional_call, grad, jvp, vmap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.eigs import lanczos, lobpcg, power_iteration  # noqa: E402

SOLVERS = {"lanczos": lanczos, "lobpcg": lobpcg, "power": power_iteration}


def dense_pair(dim: int, top: list, strength: float, seed: int) -> tuple:
    """(before, after) float32 matrices with the given top eigenvalues above a bulk."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(dim - len(top), generator=g, dtype=torch.float64) * 2 - 1
    bulk = torch.where(x > 0, 4 * x**3, 2 * x**3)
    values = torch.cat([torch.tensor(top, dtype=torch.float64), bulk])
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    before = (basis * values) @ basis.T
    scale = (values.abs() + 1).sqrt()
    noise = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    change = (noise + noise.T) / 2 * scale[:, None] * scale[None, :] / math.sqrt(dim)
    after = before + strength * basis @ change @ basis.T
    return before.float(), after.float()


def matrix_operator(matrix: torch.Tensor):
    return (lambda block: matrix @ block), matrix.shape[0]


def mlp_pair(seed: int, steps=(200, 210), lr=0.05) -> tuple:
    """HVP operators of a small MLP's full-batch mse loss at two points of a GD trajectory."""
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(256, 32, generator=g)
    labels = (inputs @ torch.randn(32, 10, generator=g)).argmax(1)
    targets = torch.nn.functional.one_hot(labels, 10).float()
    torch.manual_seed(seed)
    nn = torch.nn
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def loss(theta):
        pieces = theta.split([math.prod(s) for s in shapes])
        params = {name: piece.reshape(s) for name, piece, s in zip(names, pieces, shapes)}
        return (functional_call(model, params, (inputs,)) - targets).pow(2).sum(1).mean()

    gradient = grad(loss)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    points = []
    for step in range(max(steps) + 1):
        if step in steps:
            points.append(theta.clone())
        theta = theta - lr * gradient(theta)

    def operator(point):
        product = vmap(lambda v: jvp(gradient, (point,), (v,))[1], in_dims=1, out_dims=1)
        return product, point.numel()

    return operator(points[0]), operator(points[1])


def overlap(first, second) -> float:
    return abs(float(first.vectors[:, 0] @ second.vectors[:, 0]))


def measure(pairs: list, tol: float, k: int) -> list:
    """Rows (solver, k, cold HVPs, warm HVPs, overlaps, worst relative error) over ``pairs``."""
    rows = []
    references = [lanczos(*after, tol=1e-5, max_iter=1000, generator=torch.Generator().manual_seed(99)) for _, after in pairs]
    before_tops = [lanczos(*before, tol=1e-5, max_iter=1000, generator=torch.Generator().manual_seed(99)) for before, _ in pairs]
    overlaps = [overlap(a, b) for a, b in zip(before_tops, references)]
    for name, solver in SOLVERS.items():
        if name == "power" and k > 1:
            continue
        options = {"tol": tol, "max_iter": 3000} | ({} if name == "power" else {"k": k})
        cold, warm, errors, unconverged = [], [], [], 0
        for seed, ((before, after), reference) in enumerate(zip(pairs, references)):
            previous = solver(*before, generator=torch.Generator().manual_seed(seed), **options)
            results = [
                solver(*after, generator=torch.Generator().manual_seed(seed + 1000), **options),
                solver(*after, init=previous.vectors, generator=torch.Generator().manual_seed(seed), **options),
            ]
            cold.append(results[0].matvecs)
            warm.append(results[1].matvecs)
            for result in results:
                unconverged += not result.converged
                errors.append(abs(float(result.values[0] - reference.values[0])) / abs(float(reference.values[0])))
        rows.append((name, k, cold, warm, overlaps, max(errors), unconverged))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=2000, help="size of the dense test matrices")
    parser.add_argument("--seeds", type=int, default=3, help="problem instances per setting")
    parser.add_argument("--tol", type=float, default=1e-3, help="relative residual tolerance")
    parser.add_argument("--no-mlp", action="store_true", help="skip the MLP Hessian problem")
    args = parser.parse_args()
    problems = {
        "outliers": lambda seed: [tuple(map(matrix_operator, dense_pair(args.dim, [50.0, 30.0, 20.0, 10.0], 1.0, seed)))],
        "cluster": lambda seed: [tuple(map(matrix_operator, dense_pair(args.dim, [10.0, 9.95, 9.9, 9.8, 9.6, 9.3], 0.3, seed)))],
    }
    if not args.no_mlp:
        problems["mlp"] = lambda seed: [mlp_pair(seed)]
    print(f"tol {args.tol:g}, {args.seeds} instances each; HVPs as mean [min-max]")
    print(f"{'problem':9s} {'solver':8s} {'k':>2s} {'cold HVPs':>14s} {'warm HVPs':>14s} {'overlap':>8s} "
          f"{'max rel err':>11s} {'unconv':>6s}")
    for problem, build in problems.items():
        pairs = [pair for seed in range(args.seeds) for pair in build(seed)]
        for k in (1, 3):
            for name, kk, cold, warm, overlaps, error, unconverged in measure(pairs, args.tol, k):
                print(f"{problem:9s} {name:8s} {kk:2d} {_summary(cold):>14s} {_summary(warm):>14s} "
                      f"{statistics.mean(overlaps):8.3f} {error:11.1e} {unconverged:6d}", flush=True)


def _summary(counts: list) -> str:
    return f"{statistics.mean(counts):.1f} [{min(counts)}-{max(counts)}]"


if __name__ == "__main__":
    main()
