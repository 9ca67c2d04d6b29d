"""Curvature measurements: each a pure function of (model, loss_fn, data, ...) -> Estimate.

Notation: n training points, L = (1/n) sum_i l_i, g and H the full-batch gradient and Hessian,
g_B and H_B those of the mean loss on a batch B of b distinct points drawn uniformly.

All of them count Hessian-vector products and wall time into the returned Estimate, draw any
randomness from the generator they are given (never the global RNG), and leave the model's
parameters, buffers, ``.grad`` and train/eval mode as they found them.
"""

import time

import torch

from utils import eigs
from utils.errors import UserError
from utils.estimators import (Estimate, exact_estimate, mean_with_stopping,
                              ratio_of_means_with_stopping, sample_batch_indices)
from utils.hvp import HessianOperator, flat_grad

EIG_METHODS = ("lanczos", "lobpcg", "power")


def lambda_max(model, loss_fn, X, Y, *, k=1, tol=1e-3, max_iter=None, chunk_size=None,
               train_mode=True, warm_start=None, generator=None, method=None):
    """The k algebraically largest eigenvalues of H on the WHOLE training set (X, Y).

        lambda_max = max_{|v|=1} v^T H v,   H = (1/n) sum_i hess l_i

    Columns ``lambda_max``, ``lambda_2`` ... ``lambda_k``. ``method`` defaults to lanczos for
    k = 1 and lobpcg for k > 1 (power iteration is k = 1 only). ``warm_start`` is the previous
    eigenvectors (P,) or (P, k') or the previous EigResult; the returned ``EigResult.vectors``
    are the cache for the next call. ``generator`` draws the random start where needed (the
    solvers fall back to a fixed-seed generator, never the global RNG).
    Returns (EigResult, Estimate of lambda_max with se = nan).
    """
    start = time.perf_counter()
    method = method or ("lanczos" if k == 1 else "lobpcg")
    if method not in EIG_METHODS:
        raise UserError(f"unknown eigen-solver {method!r}; choose one of {', '.join(EIG_METHODS)}")
    if method == "power" and k != 1:
        raise UserError(f"power iteration finds one eigenvalue, got k={k}; use lanczos or lobpcg")
    op = HessianOperator(model, loss_fn, X, Y, chunk_size=chunk_size, train_mode=train_mode)
    if isinstance(warm_start, eigs.EigResult):
        warm_start = warm_start.vectors
    if warm_start is not None:
        # The solvers work in the dtype of their start block; keep it that of the operator.
        warm_start = warm_start.to(device=op.device, dtype=op.dtype)
    options = {"tol": tol, "init": warm_start, "generator": generator, "dtype": op.dtype,
               "device": op.device}
    if max_iter is not None:
        options["max_iter"] = max_iter
    if method == "power":
        result = eigs.power_iteration(op.matvec, op.dim, **options)
    else:
        solver = eigs.lanczos if method == "lanczos" else eigs.lobpcg
        result = solver(op.matvec, op.dim, k=k, **options)
    estimate = exact_estimate(result.values[0].item(), op.hvps, time.perf_counter() - start)
    return result, estimate


def _rayleigh_on_batch(model, loss_fn, xb, yb, train_mode) -> float:
    """g_B^T H_B g_B / |g_B|^2 with gradient and Hessian of the same batch."""
    op = HessianOperator(model, loss_fn, xb, yb, train_mode=train_mode)
    g = op.gradient()
    return (g @ op.matvec(g) / (g @ g)).item()


def step_sharpness(model, loss_fn, xb, yb, train_mode=True) -> Estimate:
    """Step sharpness g_B^T H_B g_B / |g_B|^2 on the given batch (the one about to be stepped on).

    Column ``step_sharpness``; one HVP, se = nan.
    """
    start = time.perf_counter()
    value = _rayleigh_on_batch(model, loss_fn, xb, yb, train_mode)
    return exact_estimate(value, 1, time.perf_counter() - start)


def batch_sharpness(model, loss_fn, X, Y, batch_size, *, generator, min_samples=20,
                    max_samples=1000, rel_se=0.005, train_mode=True) -> Estimate:
    """Batch Sharpness E_B[ g_B^T H_B g_B / |g_B|^2 ], B uniform among b-subsets of the data.

    The mean of per-batch Rayleigh quotients (H_B and g_B of the SAME batch) over independent
    random batches, drawn until SE / |mean| < ``rel_se`` (at least ``min_samples``, at most
    ``max_samples`` batches). One HVP per batch. Columns ``batch_sharpness``,
    ``batch_sharpness_se``, ``batch_sharpness_n``.
    """
    start = time.perf_counter()
    n = X.shape[0]
    hvps = 0

    def sample(m):
        nonlocal hvps
        hvps += m
        values = []
        for _ in range(m):
            idx = sample_batch_indices(n, batch_size, generator, X.device)
            values.append(_rayleigh_on_batch(model, loss_fn, X[idx], Y[idx], train_mode))
        return values

    estimate = mean_with_stopping(sample, min_samples=min_samples, max_samples=max_samples,
                                  rel_se=rel_se)
    return Estimate(estimate.value, estimate.se, estimate.n, hvps,
                    time.perf_counter() - start)


def gni(model, loss_fn, X, Y, batch_size, *, generator, chunk_size=None, min_samples=20,
        max_samples=1000, rel_se=0.01, train_mode=True, block_size=10) -> Estimate:
    """Gradient-Noise Interaction GNI = E_B[ g_B^T H g_B ] / |g|^2, H and g on the full data.

    For an SGD step theta' = theta - eta g_B, to second order
    E_B[L(theta')] - L(theta) = -eta |g|^2 + (eta^2 / 2) E_B[g_B^T H g_B],
    so the loss decreases in expectation iff GNI < 2 / eta.

    The numerator is a sample mean over independent random batches; |g|^2 is exact, so the
    SE is that of the mean divided by |g|^2. ``block_size`` batch gradients go through one
    full-data Hessian pass (chunked by ``chunk_size``); stopping at SE / |GNI| < ``rel_se``
    (at least ``min_samples``, at most ``max_samples`` batches). Columns ``gni``, ``gni_se``,
    ``gni_n``.
    """
    start = time.perf_counter()
    n = X.shape[0]
    op = HessianOperator(model, loss_fn, X, Y, chunk_size=chunk_size, train_mode=train_mode)

    def sample(m):
        G = torch.stack([flat_grad(model, loss_fn, X[idx], Y[idx], train_mode=train_mode)
                         for idx in (sample_batch_indices(n, batch_size, generator, X.device)
                                     for _ in range(m))], dim=1)
        return (G * op.matvec(G)).sum(dim=0)

    # SE / |mean| does not depend on the constant |g|^2, so the stopping rule runs on the
    # numerator samples; the first chunked pass also yields g without an extra pass.
    numerator = mean_with_stopping(sample, min_samples=min_samples, max_samples=max_samples,
                                   rel_se=rel_se, block_size=block_size)
    g = op.gradient()
    norm2 = (g @ g).item()
    return Estimate(numerator.value / norm2, numerator.se / norm2, numerator.n, op.hvps,
                    time.perf_counter() - start)


def _batch_quadratic_and_norm(model, loss_fn, xb, yb, train_mode) -> tuple[float, float]:
    """(g_B^T H_B g_B, |g_B|^2) with gradient and Hessian of the same batch."""
    op = HessianOperator(model, loss_fn, xb, yb, train_mode=train_mode)
    g = op.gradient()
    return (g @ op.matvec(g)).item(), (g @ g).item()


def batch_sharpness_ratio(model, loss_fn, X, Y, batch_size, *, generator, min_samples=20,
                          max_samples=1000, rel_se=0.005, train_mode=True) -> Estimate:
    """Batch Sharpness as a ratio of means, E_B[ g_B^T H_B g_B ] / E_B[ |g_B|^2 ].

    Unlike :func:`batch_sharpness` (a mean of ratios) each batch contributes in proportion to
    its squared gradient norm. Paired samples a = g_B^T H_B g_B, b = |g_B|^2 over independent
    random batches; delta-method SE, drawn until SE / |ratio| < ``rel_se`` (at least
    ``min_samples``, at most ``max_samples`` batches). One HVP per batch. Columns
    ``batch_sharpness_ratio``, ``batch_sharpness_ratio_se``, ``batch_sharpness_ratio_n``.
    """
    start = time.perf_counter()
    n = X.shape[0]
    hvps = 0

    def sample(m):
        nonlocal hvps
        hvps += m
        pairs = []
        for _ in range(m):
            idx = sample_batch_indices(n, batch_size, generator, X.device)
            pairs.append(_batch_quadratic_and_norm(model, loss_fn, X[idx], Y[idx], train_mode))
        quadratic, norm2 = zip(*pairs)
        return list(quadratic), list(norm2)

    estimate = ratio_of_means_with_stopping(sample, min_samples=min_samples,
                                            max_samples=max_samples, rel_se=rel_se)
    return Estimate(estimate.value, estimate.se, estimate.n, hvps, time.perf_counter() - start)
