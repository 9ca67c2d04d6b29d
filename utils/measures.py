"""Curvature measurements: each a pure function of (model, loss_fn, data, ...) -> Estimate.

Notation: n training points, L = (1/n) sum_i l_i, g and H the full-batch gradient and Hessian,
g_B and H_B those of the mean loss on a batch B of b distinct points drawn uniformly.

All of them count Hessian-vector products and wall time into the returned Estimate, draw any
randomness from the generator they are given (never the global RNG), and leave the model's
parameters, buffers, ``.grad`` and train/eval mode as they found them.

Data flow one way: the measurements here draw the batches and run the stopping rules
(:mod:`utils.estimators`); per-batch quadratic forms come from :mod:`utils.batch_forms`, which
picks the fastest exact route (the Gram engine :mod:`utils.gram`, the R-operator, double
backward); full-batch products from :class:`utils.hvp.HessianOperator`. ``exact=True``
(``--exact-measurements``) takes the plain route everywhere: one double backward per batch and
every Hessian product by plain double backward instead of the fastest mode for the model and
device (:func:`utils.hvp.default_hvp_mode`). The values agree to round-off either way.

Under ``torchrun`` the data are :class:`utils.sharded.Rows`, each rank holding a block of them:
the operators, gradients and batch routes then come from :mod:`utils.sharded`, which sums every
rank's part, and the functions here draw the same batches and take the same decisions.

The module runs to about 600 lines because every measurement is a short function over the same
few helpers (batch drawing, the same-batch estimate, the product mode) and the notation above;
split by quantity, each part would import the others' helpers.
"""

import math
import time
import warnings
from dataclasses import replace

import torch

from utils import batch_forms, eigs, sharded
from utils.eigs import EIG_METHODS, EIG_TOL
from utils.errors import UserError
from utils.estimators import (BATCH_SHARPNESS_REL_SE, GNI_REL_SE, MAX_SAMPLES, Estimate, SamplesAhead, draw_batches,
                              draw_partitions, exact_estimate, group_limits, mean_with_stopping,
                              ratio_of_means_with_stopping, sample_batch_indices)
from utils.gauss_newton import GaussNewtonOperator
from utils.hvp import PLAIN_HVP_MODE, HessianOperator, flat_params, trainable_params
from utils.noise_decomposition import (closed_form_applies, closed_form_cheaper, closed_form_decomposition,
                                       gni_decomposition, gradient_spread, noise_factor)


def _product_mode(exact: bool):
    """The HVP mode of a measurement: plain double backward when ``exact``, else the default."""
    return PLAIN_HVP_MODE if exact else None


def lambda_max(model, loss_fn, X, Y, *, k=1, tol=EIG_TOL, max_iter=None, chunk_size=None,
               train_mode=True, warm_start=None, generator=None, method=None, exact=False):
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
    op = sharded.operator(HessianOperator, model, loss_fn, X, Y, chunk_size=chunk_size, train_mode=train_mode,
                          mode=_product_mode(exact))
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


# Disjoint batches the data hold, floor(n / b), up to which the same-batch measurements may draw
# them as partitions (:func:`partition_size`): where n / b is small the batches of one random
# permutation are negatively correlated (together they cover most of the data), so their mean
# varies much less than one batch's (ResNet-20 with BatchNorm at n / b = 3: 0.23x the variance
# per batch computed); where n / b is large a group is many batches for little gain.
PARTITION_MAX_BATCHES = 8


def partition_size(n: int, batch_size: int, partition_draws: bool) -> int:
    """Batches per Monte Carlo sample of the same-batch measurements: G = floor(n / b) disjoint
    batches of one random permutation, their mean one sample, where ``partition_draws`` and
    2 <= G <= ``PARTITION_MAX_BATCHES``; else 1 (independent batches)."""
    groups = n // batch_size
    return groups if partition_draws and 2 <= groups <= PARTITION_MAX_BATCHES else 1


def _samples_ahead(route, n, batch_size, generator, device, *, rel_se, max_samples,
                   sample=lambda forms: forms, per_group=1) -> SamplesAhead:
    """The stopping rule's ``sample_fn`` over random batches of ``batch_size``: the batches are
    drawn from ``generator`` in order, their forms computed by ``route`` (:mod:`utils.batch_forms`)
    at most ``route.per_call`` at a time, and ``sample`` maps the forms to the rule's samples.
    With ``per_group`` > 1 a sample is the mean of ``per_group`` disjoint batches of one random
    permutation (:func:`utils.estimators.draw_partitions`); ``max_samples`` counts samples."""
    def draw(m):
        if per_group == 1:
            return draw_batches(n, batch_size, m, generator, device)
        return draw_partitions(n, batch_size, m, per_group, generator, device)

    def compute(m):
        idx = draw(m)
        parts = [sample(route.forms(idx[done:done + route.per_call])) for done in range(0, idx.shape[0], route.per_call)]
        paired = isinstance(parts[0], tuple)
        columns = tuple(torch.cat(column) for column in zip(*parts)) if paired else (torch.cat(parts),)
        if per_group > 1:
            columns = tuple(column.double().reshape(m, per_group).mean(dim=1) for column in columns)
        return columns if paired else columns[0]

    return SamplesAhead(compute, rel_se=rel_se, max_samples=max_samples, min_block=-(-route.min_block // per_group),
                        max_block=max(1, route.per_call // per_group), predict=route.ahead)


def _same_batch_estimate(route, X, batch_size, generator, *, rule, min_samples, max_samples, rel_se, sample,
                         partition_draws) -> tuple:
    """``rule`` (a stopping rule of :mod:`utils.estimators`) over the samples of ``route``, with
    the limits and ``_n`` in batches whichever way they are drawn (:func:`partition_size`);
    returns (the estimate, batches computed)."""
    per_group = partition_size(X.shape[0], batch_size, partition_draws)
    limits = group_limits(min_samples, max_samples, per_group) if per_group > 1 else \
        {"min_samples": min_samples, "max_samples": max_samples}
    ahead = _samples_ahead(route, X.shape[0], batch_size, generator, X.device, rel_se=rel_se,
                           max_samples=limits["max_samples"], sample=sample, per_group=per_group)
    estimate = rule(ahead, rel_se=rel_se, **limits)
    return replace(estimate, n=estimate.n * per_group), ahead.computed * per_group


def _same_batch_samples(model, loss_fn, X, Y, batch_size, generator, train_mode, exact, **options) -> tuple:
    route = sharded.same_batch_route(model, loss_fn, X, Y, batch_size, train_mode=train_mode, exact=exact)
    return _same_batch_estimate(route, X, batch_size, generator, **options)


def step_sharpness(model, loss_fn, xb, yb, train_mode=True, exact=False) -> Estimate:
    """Step sharpness g_B^T H_B g_B / |g_B|^2 on the given batch (the one about to be stepped on).

    Column ``step_sharpness``; one HVP-equivalent, se = nan.
    """
    start = time.perf_counter()
    route = sharded.same_batch_route(model, loss_fn, xb, yb, xb.shape[0], train_mode=train_mode, exact=exact)
    quadratic, norm2 = route.forms(torch.arange(xb.shape[0], device=xb.device)[None])
    return exact_estimate((quadratic / norm2).item(), 1, time.perf_counter() - start)


def batch_sharpness(model, loss_fn, X, Y, batch_size, *, generator, min_samples=20,
                    max_samples=MAX_SAMPLES, rel_se=BATCH_SHARPNESS_REL_SE, train_mode=True, exact=False,
                    partition_draws=False) -> Estimate:
    """Batch Sharpness E_B[ g_B^T H_B g_B / |g_B|^2 ], B uniform among b-subsets of the data.

    The mean of per-batch Rayleigh quotients (H_B and g_B of the SAME batch) over independent
    random batches, drawn until SE / |mean| < ``rel_se`` (at least ``min_samples``, at most
    ``max_samples`` batches). ``partition_draws``: where the data hold G = floor(n / b) <= 8
    disjoint batches, one sample is the mean over G disjoint batches of one random permutation
    (each batch still uniform, so unbiased; the SE is over those i.i.d. means, the limits and
    ``_n`` count batches); the same for the ratio form and the Gauss–Newton form. One HVP-equivalent per batch, counted for every batch computed
    (a route that computes ahead of the rule may compute a few unused ones). Columns
    ``batch_sharpness``, ``batch_sharpness_se``, ``batch_sharpness_n``.
    """
    start = time.perf_counter()
    estimate, computed = _same_batch_samples(model, loss_fn, X, Y, batch_size, generator, train_mode, exact,
                                             rule=mean_with_stopping, min_samples=min_samples,
                                             max_samples=max_samples, rel_se=rel_se,
                                             sample=lambda terms: terms[0] / terms[1], partition_draws=partition_draws)
    return estimate.costing(computed, time.perf_counter() - start)


def gni(model, loss_fn, X, Y, batch_size, *, generator, chunk_size=None, min_samples=20,
        max_samples=MAX_SAMPLES, rel_se=GNI_REL_SE, train_mode=True, block_size=10, exact=False,
        closed_form=True) -> Estimate:
    """Gradient-Noise Interaction GNI = E_B[ g_B^T H g_B ] / |g|^2, H and g on the full data.

    For an SGD step theta' = theta - eta g_B, to second order
    E_B[L(theta')] - L(theta) = -eta |g|^2 + (eta^2 / 2) E_B[g_B^T H g_B],
    so the loss decreases in expectation iff GNI < 2 / eta.

    The numerator is a sample mean over independent random batches; |g|^2 is exact, so the
    SE is that of the mean divided by |g|^2 (and the stopping rule, on SE / |mean|, runs on the
    numerator). Stops at SE / |GNI| < ``rel_se`` (at least ``min_samples``, at most
    ``max_samples`` batches). The forms come from :func:`utils.batch_forms.noise_route`, chunked
    by ``chunk_size``: for Linear/activation chains many batch directions per pass over the
    data, otherwise ``block_size`` batch gradients per full-data Hessian pass. Columns ``gni``,
    ``gni_se``, ``gni_n``.

    Exact instead where that is cheaper (not with ``exact``, nor under train-mode BatchNorm):
    with c_b = (n - b) / (b (n - 1)) and the per-sample gradients g_i,

        GNI = (g^T H g + c_b (1/n) sum_i (g_i - g)^T H (g_i - g)) / |g|^2,

    n + 1 products, taken when n + 1 <= ``min_samples`` or when the first ``min_samples``
    batches predict more than n + 1 further ones (:mod:`utils.noise_decomposition`); then
    se = 0 and n = 0. ``closed_form=False`` always samples.
    """
    start = time.perf_counter()
    if block_size < 1:
        raise UserError(f"block_size must be positive, got {block_size}")
    n = X.shape[0]
    closed = closed_form and closed_form_applies(model, loss_fn, X, Y, train_mode=train_mode, exact=exact)
    if closed and n + 1 <= min_samples:
        return closed_form_decomposition(model, loss_fn, X, Y, chunk_size=chunk_size, train_mode=train_mode,
                                         started=start).gni(batch_size)
    route = sharded.noise_route(model, loss_fn, X, Y, batch_size, chunk_size=chunk_size, train_mode=train_mode,
                                    exact=exact, min_samples=min_samples, max_samples=max_samples,
                                    block_size=block_size)
    ahead = _samples_ahead(route, n, batch_size, generator, X.device, rel_se=rel_se,
                           max_samples=max_samples)
    if closed and closed_form_cheaper(ahead, min_samples, n + 1):
        return closed_form_decomposition(model, loss_fn, X, Y, chunk_size=chunk_size, train_mode=train_mode,
                                         spent=ahead.computed, started=start).gni(batch_size)
    numerator = mean_with_stopping(ahead, min_samples=min_samples, max_samples=max_samples, rel_se=rel_se)
    norm2 = route.norm2()
    return Estimate(numerator.value / norm2, numerator.se / norm2, numerator.n, ahead.computed,
                    time.perf_counter() - start, capped=numerator.capped)


def gni_by_batch_size(model, loss_fn, X, Y, batch_sizes, *, generator, chunk_size=None, min_samples=20,
                      max_samples=MAX_SAMPLES, rel_se=GNI_REL_SE, train_mode=True, exact=False,
                      closed_form=True) -> dict[int, Estimate]:
    """GNI(b) for every b in ``batch_sizes`` from one estimate of tr(HS):

        GNI(b) = (g^T H g + c_b tr(HS)) / |g|^2,   c_b = (n - b) / (b (n - 1)),

    S the per-sample gradient covariance (:mod:`utils.noise_decomposition`; not with BatchNorm in
    train mode). The batches are drawn at the smallest b (or n - 1 when that is n) and the
    stopping rule runs on GNI at the smallest b, where the noise term c_b tr(HS) is largest.
    Every Estimate shares the sample count, HVP count and seconds of the one decomposition.
    """
    smallest = min(batch_sizes)
    decomposition = gni_decomposition(
        model, loss_fn, X, Y, generator=generator, sample_batch=min(smallest, X.shape[0] - 1),
        target_batch=smallest, chunk_size=chunk_size, min_samples=min_samples,
        max_samples=max_samples, rel_se=rel_se, train_mode=train_mode, exact=exact, closed_form=closed_form)
    return {b: decomposition.gni(b) for b in batch_sizes}


def batch_sharpness_ratio(model, loss_fn, X, Y, batch_size, *, generator, min_samples=20,
                          max_samples=MAX_SAMPLES, rel_se=BATCH_SHARPNESS_REL_SE, train_mode=True,
                          exact=False, partition_draws=False) -> Estimate:
    """Batch Sharpness as a ratio of means, E_B[ g_B^T H_B g_B ] / E_B[ |g_B|^2 ].

    Unlike :func:`batch_sharpness` (a mean of ratios) each batch contributes in proportion to
    its squared gradient norm. Paired samples a = g_B^T H_B g_B, b = |g_B|^2 over independent
    random batches; delta-method SE, drawn until SE / |ratio| < ``rel_se`` (at least
    ``min_samples``, at most ``max_samples`` batches). One HVP-equivalent per batch computed.
    Columns ``batch_sharpness_ratio``, ``batch_sharpness_ratio_se``, ``batch_sharpness_ratio_n``.
    """
    start = time.perf_counter()
    estimate, computed = _same_batch_samples(model, loss_fn, X, Y, batch_size, generator, train_mode, exact,
                                             rule=ratio_of_means_with_stopping, min_samples=min_samples,
                                             max_samples=max_samples, rel_se=rel_se, sample=tuple,
                                             partition_draws=partition_draws)
    return estimate.costing(computed, time.perf_counter() - start)


def _top_eigen(matvec, op, *, tol, max_iter, generator, init=None):
    """Lanczos for the largest eigenvalue of ``matvec``, in the size, dtype and device of ``op``.

    The start is span(``init``) when given (see :func:`utils.eigs.lanczos`), else one random
    vector from ``generator``.
    """
    options = {"tol": tol, "init": init, "generator": generator, "dtype": op.dtype,
               "device": op.device}
    if max_iter is not None:
        options["max_iter"] = max_iter
    return eigs.lanczos(matvec, op.dim, **options)


class _BatchLoop:
    """The stopping rule's ``sample_fn`` over random batches drawn and measured one at a time:
    ``per_batch(idx)`` gives a batch's sample (a float, or a pair for a ratio of means);
    ``drawn`` counts the batches."""

    def __init__(self, per_batch, n, batch_size, generator, device):
        self.per_batch, self.n, self.batch_size = per_batch, n, batch_size
        self.generator, self.device = generator, device
        self.drawn = 0

    def __call__(self, m):
        samples = [self.per_batch(sample_batch_indices(self.n, self.batch_size, self.generator, self.device))
                   for _ in range(m)]
        self.drawn += m
        return tuple(list(column) for column in zip(*samples)) if isinstance(samples[0], tuple) else samples


def batch_lambda_max(model, loss_fn, X, Y, batch_size, *, generator, min_samples=10,
                     max_samples=100, rel_se=0.02, train_mode=True, tol=EIG_TOL,
                     max_iter=None, exact=False) -> Estimate:
    """Mean top eigenvalue of mini-batch Hessians, E_B[ lambda_max(H_B) ].

    Each random batch gets its own Lanczos solve to a relative residual ``tol``, started from
    the previous batch's top eigenvector (the batch Hessians share most of their top
    eigenspace, so this saves products; the residual test keeps it from steering the answer).
    Batches are drawn until SE / |mean| < ``rel_se`` (at least ``min_samples``, at most
    ``max_samples``). Solves that miss ``tol`` are reported in one warning with the worst
    residual. Columns ``batch_lambda_max``, ``batch_lambda_max_se``, ``batch_lambda_max_n``.
    """
    start = time.perf_counter()
    hvps, previous, missed = 0, None, []

    def top_eigenvalue(idx):
        nonlocal hvps, previous
        op = sharded.operator(HessianOperator, model, loss_fn, X[idx], Y[idx], train_mode=train_mode,
                              mode=_product_mode(exact))
        # The solve draws its random start from the same generator, between the batches.
        result = _top_eigen(op.matvec, op, tol=tol, max_iter=max_iter, generator=generator, init=previous)
        previous = result.vectors
        hvps += op.hvps
        if not result.converged:
            missed.append(float(result.residuals.max()))
        return result.values[0].item()

    batches = _BatchLoop(top_eigenvalue, X.shape[0], batch_size, generator, X.device)
    estimate = mean_with_stopping(batches, min_samples=min_samples, max_samples=max_samples, rel_se=rel_se)
    if missed:
        warnings.warn(f"batch lambda_max: {len(missed)} of {estimate.n} batch solves stopped above tol {tol:g} "
                      f"(worst relative residual {max(missed):.2e})")
    return estimate.costing(hvps, time.perf_counter() - start)


def rademacher_probe(dim: int, generator: torch.Generator, dtype, device) -> torch.Tensor:
    """A vector of independent signs +-1 with equal probability."""
    signs = torch.randint(0, 2, (dim,), generator=generator, device=generator.device)
    return (2 * signs - 1).to(device=device, dtype=dtype)


def hessian_trace(model, loss_fn, X, Y, *, generator, chunk_size=None, min_samples=10,
                  max_samples=MAX_SAMPLES, rel_se=0.01, train_mode=True, block_size=10, exact=False) -> Estimate:
    """tr(H) of the full-batch Hessian by Hutchinson's estimator with Rademacher probes.

        tr(H) = E_z[ z^T H z ],   z_j = +-1 independently,
        Var(z^T H z) = 2 sum_{j != k} H_jk^2  (zero for a diagonal H).

    ``block_size`` probes go through one full-data Hessian pass (chunked by ``chunk_size``);
    probes are drawn one at a time, so the block size never changes the estimate. Stops at
    SE / |trace| < ``rel_se`` (at least ``min_samples``, at most ``max_samples`` probes).
    Columns ``hessian_trace``, ``hessian_trace_se``, ``hessian_trace_n``.
    """
    start = time.perf_counter()
    op = sharded.operator(HessianOperator, model, loss_fn, X, Y, chunk_size=chunk_size, train_mode=train_mode,
                          mode=_product_mode(exact))

    def sample(m):
        Z = torch.stack([rademacher_probe(op.dim, generator, op.dtype, op.device) for _ in range(m)],
                        dim=1)
        return op.quadratic_forms(Z)

    estimate = mean_with_stopping(sample, min_samples=min_samples, max_samples=max_samples,
                                  rel_se=rel_se, block_size=block_size)
    return estimate.costing(op.hvps, time.perf_counter() - start)


def gn_lambda_max(model, loss_fn, X, Y, *, tol=EIG_TOL, max_iter=None, chunk_size=None,
                  train_mode=True, generator=None):
    """lambda_max(G) of the Gauss–Newton matrix on the WHOLE training set (X, Y).

        G = (2/n) sum_i J_i^T J_i                         (mse, no 1/2)
        G = (1/n) sum_i J_i^T (diag p_i - p_i p_i^T) J_i  (ce),   J_i = d f(x_i) / d theta

    (see :mod:`utils.gauss_newton`). Lanczos from a random start drawn from ``generator``;
    column ``gn_lambda_max``. Returns (EigResult, Estimate with se = nan); ``hvps`` counts
    Gauss–Newton-vector products.
    """
    start = time.perf_counter()
    op = sharded.operator(GaussNewtonOperator, model, loss_fn, X, Y, chunk_size=chunk_size, train_mode=train_mode)
    result = _top_eigen(op.matvec, op, tol=tol, max_iter=max_iter, generator=generator)
    return result, exact_estimate(result.values[0].item(), op.hvps, time.perf_counter() - start)


def gn_batch_sharpness(model, loss_fn, X, Y, batch_size, *, generator, min_samples=20,
                       max_samples=MAX_SAMPLES, rel_se=BATCH_SHARPNESS_REL_SE, train_mode=True,
                       exact=False, partition_draws=False) -> Estimate:
    """Gauss–Newton Batch Sharpness E_B[ g_B^T G_B g_B / |g_B|^2 ], G_B the batch's Gauss–Newton matrix.

    Batch Sharpness with H_B replaced by its positive semi-definite part G_B (mean of ratios,
    stopping and sample limits as in :func:`batch_sharpness`). One product per batch, counted
    for every batch computed. The terms come from :func:`utils.batch_forms.gauss_newton_route`
    (one forward-mode pass along g_B, many batches per vmapped call where the same-batch terms
    take that route); ``exact``, dropout and data split over ranks take one
    :class:`utils.gauss_newton.GaussNewtonOperator` per batch. Columns ``gn_batch_sharpness``,
    ``gn_batch_sharpness_se``, ``gn_batch_sharpness_n``.
    """
    start = time.perf_counter()
    if not (exact or sharded.is_sharded(X) or batch_forms.has_dropout(model)):
        route = batch_forms.gauss_newton_route(model, loss_fn, X, Y, batch_size, train_mode=train_mode)
    else:
        def operator_terms(idx):
            terms = []
            for rows in idx:
                op = sharded.operator(GaussNewtonOperator, model, loss_fn, X[rows], Y[rows], train_mode=train_mode)
                g = op.gradient()
                terms.append((g @ op.matvec(g), g @ g))
            return tuple(torch.stack(column) for column in zip(*terms))
        route = batch_forms.Route(operator_terms, per_call=1, min_block=1, ahead=False)
    estimate, computed = _same_batch_estimate(route, X, batch_size, generator, rule=mean_with_stopping,
                                              min_samples=min_samples, max_samples=max_samples, rel_se=rel_se,
                                              sample=lambda terms: terms[0] / terms[1],
                                              partition_draws=partition_draws)
    return estimate.costing(computed, time.perf_counter() - start)


def gradient_norms(model, loss_fn, X, Y, batch_size, *, generator, chunk_size=None,
                   min_samples=20, max_samples=MAX_SAMPLES, rel_se=0.01,
                   train_mode=True, exact=False, closed_form=True) -> tuple[Estimate, Estimate]:
    """(E_B[ |g_B|^2 ], |g|^2): mean squared mini-batch gradient norm and the full-batch one.

    Without BatchNorm, for batches of b distinct points out of n,
        E_B|g_B|^2 = |g|^2 + (n - b) / (b (n - 1)) * (1/n) sum_i |g_i - g|^2,
    so the gap measures the gradient noise. The first is a sample mean over random batches
    (stopping at SE / mean < ``rel_se``, at least ``min_samples``, at most ``max_samples``),
    the second exact (se = nan, chunked by ``chunk_size``). No HVPs. Columns
    ``grad_norm_sq_batch``, ``grad_norm_sq_batch_se``, ``grad_norm_sq_batch_n`` and
    ``grad_norm_sq_full``.

    The first is exact instead (se = 0, n = 0; not with ``exact``, nor under train-mode
    BatchNorm) when the n per-sample gradients of the formula above cost fewer per-sample
    gradients than the estimate needs: at once when n <= ``min_samples`` b, else when the first
    ``min_samples`` batches predict more than n further per-sample gradients.
    ``closed_form=False`` always samples.
    """
    start = time.perf_counter()
    n = X.shape[0]
    g = sharded.flat_grad(model, loss_fn, X, Y, chunk_size=chunk_size, train_mode=train_mode)
    full = exact_estimate((g @ g).item(), 0, time.perf_counter() - start)
    start = time.perf_counter()

    def in_closed_form():
        spread = gradient_spread(model, loss_fn, X, Y, g, train_mode=train_mode)
        value = full.value + noise_factor(n, batch_size) * spread
        return Estimate(value, 0.0, 0, 0, time.perf_counter() - start, exact=True), full

    closed = closed_form and closed_form_applies(model, loss_fn, X, Y, train_mode=train_mode, exact=exact)
    if closed and n <= min_samples * batch_size:
        return in_closed_form()

    def norm2s(idx):
        gradients = (sharded.flat_grad(model, loss_fn, X[rows], Y[rows], train_mode=train_mode) for rows in idx)
        return torch.stack([g_B @ g_B for g_B in gradients])

    route = batch_forms.Route(norm2s, per_call=max_samples, min_block=1, ahead=False)
    ahead = _samples_ahead(route, n, batch_size, generator, X.device, rel_se=rel_se, max_samples=max_samples)
    if closed and closed_form_cheaper(ahead, min_samples, n, per_sample=batch_size):
        return in_closed_form()
    batch = mean_with_stopping(ahead, min_samples=min_samples, max_samples=max_samples, rel_se=rel_se)
    return batch.costing(0, time.perf_counter() - start), full


def _single_group(optimizer) -> dict:
    if len(optimizer.param_groups) != 1:
        raise ValueError(f"expected one parameter group, got {len(optimizer.param_groups)}")
    return optimizer.param_groups[0]


def momentum_buffer(optimizer: torch.optim.SGD, model) -> torch.Tensor:
    """SGD's momentum buffer b as a flat vector over the trainable parameters (0 before step 1)."""
    pieces = []
    for p in trainable_params(model):
        buffer = optimizer.state.get(p, {}).get("momentum_buffer")
        pieces.append(torch.zeros_like(p).reshape(-1) if buffer is None else buffer.reshape(-1))
    return torch.cat(pieces).detach()


def momentum_direction(grad: torch.Tensor, buffer: torch.Tensor, momentum: float,
                       nesterov: bool) -> torch.Tensor:
    """The direction s of torch.optim.SGD's next update theta' = theta - eta s on gradient g.

        heavy ball:  s = g + mu b            (the new buffer mu b + g)
        Nesterov:    s = g + mu (mu b + g)   (look-ahead along the new buffer)

    with b the current buffer (no dampening or weight decay); b = 0 before the first step
    matches SGD, which starts its buffer at g.
    """
    new_buffer = momentum * buffer + grad
    return grad + momentum * new_buffer if nesterov else new_buffer


def momentum_sharpness(model, loss_fn, X, Y, batch_size, *, optimizer, generator, min_samples=20,
                       max_samples=MAX_SAMPLES, rel_se=BATCH_SHARPNESS_REL_SE, train_mode=True) -> Estimate:
    """Momentum sharpness E_B[ s_B^T H_B s_B ] / E_B[ s_B^T g_B ], a ratio of means.

    s_B is the direction of the update SGD with momentum would take with batch B's gradient
    (:func:`momentum_direction`, buffer and mu read from ``optimizer``). To second order the
    step theta - eta s_B changes the batch loss by -eta s_B^T g_B + (eta^2/2) s_B^T H_B s_B.
    A mean of ratios would be ill-posed: s_B^T g_B can cross zero. Delta-method SE; stopping
    and sample limits as in :func:`batch_sharpness_ratio`. One HVP per batch. Columns
    ``momentum_sharpness``, ``momentum_sharpness_se``, ``momentum_sharpness_n``.
    """
    start = time.perf_counter()
    group = _single_group(optimizer)
    if group.get("dampening", 0) != 0 or group.get("weight_decay", 0) != 0:
        raise ValueError("momentum sharpness assumes SGD without dampening and weight decay")
    buffer = momentum_buffer(optimizer, model)

    def quadratic_and_slope(idx):
        op = sharded.operator(HessianOperator, model, loss_fn, X[idx], Y[idx], train_mode=train_mode,
                              mode=PLAIN_HVP_MODE)
        g = op.gradient()
        s = momentum_direction(g, buffer.to(g), group["momentum"], group["nesterov"])
        return (s @ op.matvec(s)).item(), (s @ g).item()

    batches = _BatchLoop(quadratic_and_slope, X.shape[0], batch_size, generator, X.device)
    estimate = ratio_of_means_with_stopping(batches, min_samples=min_samples, max_samples=max_samples, rel_se=rel_se)
    return estimate.costing(batches.drawn, time.perf_counter() - start)


def adam_preconditioner(optimizer: torch.optim.Adam, model) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Adam's diagonal preconditioner as a flat vector, and the mask of the coordinates Adam has
    seen; None before the first step.

    Cohen et al. (2022, "Adaptive Gradient Methods at the Edge of Stability", Sec. 2) write
    Adam as preconditioned heavy-ball momentum: counting updates from t = 0,

        m_t = beta_1 m_{t-1} + (1 - beta_1) g_t,   theta_{t+1} = theta_t - eta P_t^{-1} m_t,
        P_t = (1 - beta_1^{t+1}) [diag(sqrt(v_t / (1 - beta_2^{t+1}))) + eps I],

    so the first moment's bias correction sits in P. After k updates (torch.optim.Adam's
    ``state["step"]`` = k, so t = k - 1) this returns P_{k-1}, the preconditioner of the last
    update Adam took, which frozen gives the heavy-ball threshold (2 + 2 beta_1) / ((1 - beta_1) eta).
    ``seen`` is v > 0: the coordinates that have had a non-zero gradient.
    """
    group = _single_group(optimizer)
    if group.get("amsgrad"):
        raise ValueError("the preconditioner of amsgrad is not supported")
    (beta1, beta2), eps = group["betas"], group["eps"]
    pieces, seen = [], []
    for p in trainable_params(model):
        state = optimizer.state.get(p, {})
        if "exp_avg_sq" not in state:
            return None
        k = float(state["step"])
        v = state["exp_avg_sq"]
        pieces.append(((1 - beta1 ** k) * (v.sqrt() / (1 - beta2 ** k) ** 0.5 + eps)).reshape(-1))
        seen.append((v > 0).reshape(-1))
    return torch.cat(pieces).detach(), torch.cat(seen)


def preconditioned_sharpness(model, loss_fn, X, Y, *, optimizer, tol=EIG_TOL, max_iter=None,
                             chunk_size=None, train_mode=True, generator=None, exact=False):
    """lambda_max(P_S^{-1/2} H_SS P_S^{-1/2}) over the coordinates S that Adam has seen, P Adam's
    preconditioner in the form of Cohen et al. (2022) (:func:`adam_preconditioner`, with the
    first moment's bias correction 1 - beta_1^k after k updates).

    The spectrum equals that of P^{-1} H, the curvature along which Adam steps; frozen, Adam is
    stable on a quadratic while it stays below (2 + 2 beta_1) / ((1 - beta_1) eta) = 38 / eta at
    beta_1 = 0.9. Coordinates whose second moment is still 0 have P = (1 - beta_1^k) eps there,
    where Adam has never stepped (torch.optim.Adam adds g^2 to v before dividing by it): with
    them the value would be set by eps, so they are left out (:func:`unseen_with_curvature` counts
    them). Lanczos from a random start in S drawn from ``generator``; column
    ``preconditioned_sharpness``. Returns (EigResult, Estimate with se = nan); raises ValueError
    before Adam's first step. Where Adam has seen no coordinate yet (every gradient so far was 0)
    the value is nan, at no product.
    """
    start = time.perf_counter()
    found = adam_preconditioner(optimizer, model)
    if found is None:
        raise ValueError("Adam has no second moments before its first step")
    op = sharded.operator(HessianOperator, model, loss_fn, X, Y, chunk_size=chunk_size, train_mode=train_mode,
                          mode=_product_mode(exact))
    P, seen = (t.to(device=op.device) for t in found)
    if not seen.any():
        nothing = torch.full((1,), math.nan, dtype=op.dtype, device=op.device)
        result = eigs.EigResult(nothing, torch.zeros(op.dim, 1, dtype=op.dtype, device=op.device), nothing, 0, 0, True)
        return result, exact_estimate(math.nan, 0, time.perf_counter() - start)
    scale = (P.to(op.dtype).rsqrt() * seen)[:, None]  # zero off S: the operator lives on S

    def matvec(V):  # the solvers pass blocks (P, m)
        return scale * op.matvec(scale * V)

    start_vector = (torch.randn(op.dim, 1, generator=generator, dtype=op.dtype, device=op.device)
                    if generator is not None else torch.ones(op.dim, 1, dtype=op.dtype, device=op.device))
    init = start_vector * seen[:, None]
    result = _top_eigen(matvec, op, tol=tol, max_iter=max_iter, generator=generator, init=init)
    return result, exact_estimate(result.values[0].item(), op.hvps, time.perf_counter() - start)


def unseen_with_curvature(model, loss_fn, X, Y, *, optimizer, generator, chunk_size=None, train_mode=True,
                          exact=False) -> Estimate:
    """The number of coordinates Adam has not seen (second moment 0) whose row of the full-batch
    Hessian is not zero: the curvature :func:`preconditioned_sharpness` leaves out.

    Row i of H is non-zero exactly when (H z)_i != 0 for a Gaussian z, with probability one, so
    one product decides every row. Column ``preconditioned_unseen``; one HVP, se = nan.
    """
    start = time.perf_counter()
    _, seen = adam_preconditioner(optimizer, model)
    op = sharded.operator(HessianOperator, model, loss_fn, X, Y, chunk_size=chunk_size, train_mode=train_mode,
                          mode=_product_mode(exact))
    z = torch.randn(op.dim, 1, generator=generator, dtype=op.dtype, device=op.device)
    rows = op.matvec(z)[:, 0] != 0
    count = int((rows & ~seen.to(rows.device)).sum())
    return exact_estimate(float(count), op.hvps, time.perf_counter() - start)


def param_distance(model, reference: torch.Tensor) -> Estimate:
    """|theta - theta_0|, the Euclidean distance of the trainable parameters to ``reference``.

    ``reference`` is a flat vector in :func:`utils.hvp.flat_params` order (the initialisation,
    or parameters loaded from a file). Column ``param_distance``; no HVPs, se = nan.
    """
    start = time.perf_counter()
    theta = flat_params(model)
    distance = torch.linalg.vector_norm(theta - reference.to(theta)).item()
    return exact_estimate(distance, 0, time.perf_counter() - start)
