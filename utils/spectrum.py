"""The Hessian's spectrum beyond its top: lambda_min, the eigenvalue density, the curvature of
each layer, and how much of the gradient lies in the top eigenspace.

H is the full-batch Hessian of the mean training loss (:class:`utils.hvp.HessianOperator`), of
size P, with eigenvalues lambda_1 >= ... >= lambda_P and unit eigenvectors u_i. Every function
counts its Hessian-vector products and wall time, draws its randomness from the generator it is
given, and leaves the model as it found it (the operator guarantees this).

    lambda_min          min_{|v|=1} v^T H v, by Lanczos on a shifted H
    spectral density    phi = (1/P) sum_i delta(lambda_i), by stochastic Lanczos quadrature
    layer sharpness     lambda_max(H_kk) and tr(H_kk) of each diagonal block of H
    gradient overlap    |P_k g|^2 / |g|^2 with P_k the projector on span(u_1 ... u_k)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from utils import eigs, sharded
from utils.eigs import EIG_TOL
from utils.estimators import MAX_SAMPLES, Estimate, exact_estimate, mean_with_stopping, sample_batch_indices
from utils.hvp import PLAIN_HVP_MODE, HessianOperator

# Stochastic Lanczos quadrature: probes and Lanczos steps per probe (--density-probes,
# --density-steps). 64 steps resolve the isolated outliers at the top and bottom of a Hessian
# spectrum to many digits and the bulk to about 1/64 of the spectrum's width; 8 probes give
# density_trace an SE of a third of one probe's spread at 8 * 64 = 512 products.
DENSITY_PROBES = 8
DENSITY_STEPS = 64
DENSITY_GRID = 1000  # points of the density/step_<N>.csv grid
DENSITY_WIDTH = 0.01  # Gaussian kernel width of the grid density, relative to the span of the nodes
# Memory for the Lanczos bases of one group of probes (bytes); probes beyond it run in groups.
_BASIS_BUDGET = 1 << 30


def _operator(model, loss_fn, X, Y, chunk_size, train_mode, exact) -> HessianOperator:
    return sharded.operator(HessianOperator, model, loss_fn, X, Y, chunk_size=chunk_size, train_mode=train_mode,
                           mode=PLAIN_HVP_MODE if exact else None)


def _solver_options(op, tol, max_iter, generator, init=None) -> dict:
    options = {"tol": tol, "generator": generator, "dtype": op.dtype, "device": op.device, "init": init}
    if max_iter is not None:
        options["max_iter"] = max_iter
    return options


# --- lambda_min -------------------------------------------------------------------------------


def lambda_min(model, loss_fn, X, Y, *, tol=EIG_TOL, lambda_max=None, max_iter=None, chunk_size=None,
               train_mode=True, generator=None, exact=False):
    """lambda_min = min_{|v|=1} v^T H v, the smallest (most negative) eigenvalue of the full-batch H.

    Lanczos on the shifted operator s I - H with s = max(lambda_max, 0): its largest eigenvalue is
    s - lambda_min, its Krylov spaces are those of H (a shift changes none) and its residuals
    ||H x - theta x|| are those of H. The solver's rule on s I - H stops at

        ||H x - lambda_min x|| <= (tol / 2) (s - lambda_min) <= tol * max(|lambda_min|, lambda_max),

    the rule asked of lambda_min: relative to |lambda_min| alone it would never be met when
    lambda_min is near 0 or below float32's resolution of H. ``lambda_max`` (a solve of the same
    step) saves the solve of the top, else it is solved here to ``tol`` and its products counted.
    Column ``lambda_min``. Returns (EigResult of H with residuals relative to
    max(|lambda_min|, lambda_max), Estimate with se = nan).
    """
    start = time.perf_counter()
    op = _operator(model, loss_fn, X, Y, chunk_size, train_mode, exact)
    if lambda_max is None:
        lambda_max = eigs.lanczos(op.matvec, op.dim, **_solver_options(op, tol, max_iter, generator)).values[0].item()
    shift = max(float(lambda_max), 0.0)

    def shifted(V):
        return shift * V - op.matvec(V)

    result = eigs.lanczos(shifted, op.dim, **_solver_options(op, tol / 2, max_iter, generator))
    top = result.values[0].item()
    value = shift - top
    scale = max(abs(value), float(lambda_max))
    residuals = result.residuals * abs(top) / scale if scale > 0 else result.residuals
    found = eigs.EigResult(torch.tensor([value], dtype=torch.float64), result.vectors, residuals, result.iterations,
                           op.hvps, bool((residuals <= tol).all()))
    return found, exact_estimate(value, op.hvps, time.perf_counter() - start)


# --- gradient overlap -------------------------------------------------------------------------


def top_eigenvectors(model, loss_fn, X, Y, k, *, tol=EIG_TOL, chunk_size=None, train_mode=True, generator=None,
                     exact=False):
    """The top-k eigenpairs of the full-batch H by Lanczos: (EigResult, products)."""
    op = _operator(model, loss_fn, X, Y, chunk_size, train_mode, exact)
    return eigs.lanczos(op.matvec, op.dim, k=k, **_solver_options(op, tol, None, generator)), op.hvps


def projected_fraction(vectors: torch.Tensor, g: torch.Tensor) -> float:
    """|V^T g|^2 / |g|^2 for orthonormal columns V: the share of |g|^2 in span(V)."""
    coefficients = vectors.to(g).T @ g
    return (coefficients @ coefficients / (g @ g)).item()


def gradient_overlap(model, loss_fn, X, Y, batch_size, *, k, generator, vectors=None, tol=EIG_TOL, chunk_size=None,
                     min_samples=20, max_samples=MAX_SAMPLES, rel_se=0.01, train_mode=True, exact=False):
    """The fraction of the gradient inside the top-k eigenspace of the full-batch H
    (Gur-Ari et al. 2018, "Gradient descent happens in a tiny subspace"):

        full    |P_k g|^2 / |g|^2,                 P_k = sum_{i <= k} u_i u_i^T,
        batch   E_B[ |P_k g_B|^2 / |g_B|^2 ],       B uniform among b-subsets of the data,

    the second a mean over random batches drawn until SE / mean < ``rel_se`` (at least
    ``min_samples``, at most ``max_samples``). ``vectors`` (P, >= k) are top eigenvectors already
    solved at these parameters (lambda_max with --num-eigenvalues >= k); without them Lanczos
    finds the top k to ``tol`` and its products are counted in the full overlap. The eigen-solve
    takes its random start from a seed drawn first from ``generator``, solved or not, so the
    batches are the same either way. No products besides the solve; one gradient per batch.
    Columns ``grad_overlap_full`` and ``grad_overlap_batch`` (``_se``, ``_n``).
    Returns (full Estimate, batch Estimate).
    """
    start = time.perf_counter()
    solver_seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device))
    hvps = 0
    if vectors is None or vectors.shape[1] < k:
        solver_generator = torch.Generator(device=generator.device).manual_seed(solver_seed)
        result, hvps = top_eigenvectors(model, loss_fn, X, Y, k, tol=tol, chunk_size=chunk_size,
                                        train_mode=train_mode, generator=solver_generator, exact=exact)
        vectors = result.vectors
    vectors = vectors[:, :k]
    g = sharded.flat_grad(model, loss_fn, X, Y, chunk_size=chunk_size, train_mode=train_mode)
    full = exact_estimate(projected_fraction(vectors, g), hvps, time.perf_counter() - start)
    start = time.perf_counter()

    def batches(m):
        return [projected_fraction(vectors, sharded.flat_grad(model, loss_fn, X[idx], Y[idx], train_mode=train_mode))
                for idx in (sample_batch_indices(X.shape[0], batch_size, generator, X.device) for _ in range(m))]

    batch = mean_with_stopping(batches, min_samples=min_samples, max_samples=max_samples, rel_se=rel_se)
    return full, batch.costing(0, time.perf_counter() - start)


# --- layer sharpness --------------------------------------------------------------------------


LAYER_GROUPINGS = ("tensor", "module")


def parameter_groups(model, by: str = "tensor") -> list[tuple[str, slice]]:
    """The diagonal blocks of H: (name, rows of the flat parameter vector) for every trainable
    parameter tensor (its ``named_parameters`` name) or, ``by="module"``, every module that owns
    trainable parameters (the name without the parameter's own, such as ``0`` for ``0.weight``
    and ``0.bias``; a module's own parameters are consecutive in the flat vector)."""
    if by not in LAYER_GROUPINGS:
        raise ValueError(f"unknown grouping {by!r}; choose one of {', '.join(LAYER_GROUPINGS)}")
    groups: dict[str, list[int]] = {}
    offset = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = name if by == "tensor" else (name.rpartition(".")[0] or name)
        bounds = groups.setdefault(key, [offset, offset])
        bounds[1] = offset + p.numel()
        offset += p.numel()
    return [(name, slice(first, last)) for name, (first, last) in groups.items()]


@dataclass
class LayerCurvature:
    """lambda_max and Hutchinson trace of each diagonal block: ``names`` in parameter order,
    ``lambda_max`` and ``converged`` per block, ``trace`` and ``trace_se`` over ``probes``
    shared probes, and the products and seconds of the whole measurement."""

    names: list[str]
    lambda_max: list[float]
    converged: list[bool]
    trace: list[float]
    trace_se: list[float]
    probes: int
    hvps: int
    seconds: float


def layer_sharpness(model, loss_fn, X, Y, *, generator, groups=None, tol=EIG_TOL, max_iter=None, chunk_size=None,
                    min_samples=10, max_samples=MAX_SAMPLES, rel_se=0.01, block_size=10, train_mode=True,
                    exact=False) -> LayerCurvature:
    """lambda_max(H_kk) and tr(H_kk) of every diagonal block H_kk of the full-batch Hessian, one
    block per group of :func:`parameter_groups` (default: per parameter tensor).

        lambda_max(H_kk) = max_{|v_k|=1} v_k^T H_kk v_k,   by Lanczos on v_k -> (H [v_k; 0])_k,
        tr(H_kk) = E_z[ z_k^T (H z)_k ],                    z Rademacher on all P coordinates,

    the traces by Hutchinson with the same probes for every block (one product per probe serves
    them all; z_k^T (H z)_k is unbiased for tr(H_kk) because E[z z^T] = I). Probes are drawn
    until the SE of their sum, Hutchinson's tr(H), is below ``rel_se`` of it (at least
    ``min_samples``, at most ``max_samples``); each block's SE is over the same probes. One
    product per Lanczos step of each block and per probe. Columns ``layer_lambda_max/<name>``,
    ``layer_trace/<name>`` and ``layer_trace_se/<name>``.
    """
    start = time.perf_counter()
    op = _operator(model, loss_fn, X, Y, chunk_size, train_mode, exact)
    groups = groups or parameter_groups(model)
    tops, converged = [], []
    for _, rows in groups:
        def block_product(V, rows=rows):
            embedded = torch.zeros(op.dim, V.shape[1], dtype=V.dtype, device=V.device)
            embedded[rows] = V
            return op.matvec(embedded)[rows]

        size = rows.stop - rows.start
        result = eigs.lanczos(block_product, size, **_solver_options(op, tol, max_iter, generator))
        tops.append(result.values[0].item())
        converged.append(bool(result.converged))
    forms = []

    def probes(m):
        Z = (2 * torch.randint(0, 2, (op.dim, m), generator=generator, device=generator.device) - 1).to(op.device, op.dtype)
        products = Z * op.matvec(Z)
        per_block = torch.stack([products[rows].sum(dim=0) for _, rows in groups], dim=1)
        forms.append(per_block.detach().cpu().double().numpy())
        return per_block.sum(dim=1)

    total = mean_with_stopping(probes, min_samples=min_samples, max_samples=max_samples, rel_se=rel_se,
                               block_size=block_size)
    samples = np.concatenate(forms)[: total.n]
    se = samples.std(axis=0, ddof=1) / math.sqrt(total.n) if total.n > 1 else np.full(len(groups), math.nan)
    return LayerCurvature([name for name, _ in groups], tops, converged, samples.mean(axis=0).tolist(), se.tolist(),
                          total.n, op.hvps, time.perf_counter() - start)


# --- spectral density -------------------------------------------------------------------------


def lanczos_quadrature(matvec, probes: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss quadrature of v^T f(H) v for each column of ``probes`` (P, p) by ``steps`` Lanczos
    steps from v = probe / |probe|, the probes run side by side (one block product per step).

    The tridiagonal T = Q^T H Q of the Krylov basis Q (fully re-orthogonalised) has eigenpairs
    (theta_j, s_j); then v^T f(H) v ~ sum_j tau_j f(theta_j) with tau_j = s_{1j}^2, exact for
    polynomials f of degree < 2 * steps. Returns (nodes, weights) of shape (p, steps) in float64;
    a probe whose Krylov space closes early (an invariant subspace, the exact measure) has zero
    weights on its unused nodes. Exactly p * steps products.
    """
    p, dim = probes.shape[1], probes.shape[0]
    # Each probe's basis vectors are consecutive rows, so its re-orthogonalisation is two
    # matrix-vector products over contiguous memory: 5 to 7 times faster on a CPU than a loop
    # over the vectors, or than one batched product over the probes.
    basis = torch.empty(p, steps, dim, dtype=probes.dtype, device=probes.device)
    q = (probes / torch.linalg.vector_norm(probes, dim=0)).T.contiguous()
    alphas, betas = [], []
    previous, beta = torch.zeros_like(q), torch.zeros(p, dtype=q.dtype, device=q.device)
    sizes = torch.full((p,), steps, dtype=torch.long)
    scale = torch.zeros(p, dtype=torch.float64)
    for j in range(steps):
        basis[:, j] = q
        w = matvec(q.T.contiguous()).detach().T.contiguous()
        alpha = (q * w).sum(dim=1)
        w -= alpha[:, None] * q + beta[:, None] * previous
        for i in range(p):
            Q = basis[i, : j + 1]
            for _ in range(2):  # classical Gram-Schmidt twice is enough (Giraud et al. 2005)
                w[i] = torch.addmv(w[i], Q.T, torch.mv(Q, w[i]), alpha=-1)
        beta = torch.linalg.vector_norm(w, dim=1)
        alphas.append(alpha)
        betas.append(beta)
        scale = torch.maximum(scale, alpha.abs().double().cpu() + beta.double().cpu())
        closed = (beta.double().cpu() <= 1e3 * torch.finfo(q.dtype).eps * scale) & (sizes == steps)
        sizes[closed] = j + 1
        alive = (sizes == steps).to(q.device)[:, None]
        previous, q = q, torch.where(alive, w / torch.where(alive, beta[:, None], torch.ones_like(w)),
                                     torch.zeros_like(w))
        beta = beta * alive[:, 0]
    alphas = torch.stack(alphas).double().cpu()
    betas = torch.stack(betas).double().cpu()
    nodes = torch.zeros(p, steps, dtype=torch.float64)
    weights = torch.zeros(p, steps, dtype=torch.float64)
    for i in range(p):
        m = int(sizes[i])
        T = torch.diag(alphas[:m, i]) + torch.diag(betas[: m - 1, i], 1) + torch.diag(betas[: m - 1, i], -1)
        theta, S = torch.linalg.eigh(T)
        nodes[i, :m], weights[i, :m] = theta, S[0] ** 2
        nodes[i, m:] = theta[-1]
    return nodes, weights


@dataclass
class SpectralDensity:
    """The stochastic Lanczos quadrature measure (1/p) sum_i sum_j tau_ij delta(theta_ij) of the
    Hessian's eigenvalues, ``nodes`` and ``weights`` (p, m), for a Hessian of size ``dim``."""

    nodes: torch.Tensor
    weights: torch.Tensor
    dim: int
    hvps: int
    seconds: float

    @property
    def probes(self) -> int:
        return self.nodes.shape[0]

    def trace(self) -> Estimate:
        """tr(H) = P E[v^T H v] from the nodes, P sum_j tau_ij theta_ij per probe: exactly
        Hutchinson's z^T H z on these probes (the quadrature is exact for f(x) = x), with the SE
        of the mean over the p probes."""
        per_probe = self.dim * (self.weights * self.nodes).sum(dim=1)
        se = per_probe.std().item() / math.sqrt(self.probes) if self.probes > 1 else math.nan
        return Estimate(per_probe.mean().item(), se, self.probes, self.hvps, self.seconds)

    def mass_above(self, threshold: float) -> float:
        """The estimated fraction of the P eigenvalues above ``threshold`` (nan for a nan threshold)."""
        if math.isnan(threshold):
            return math.nan
        return ((self.nodes > threshold) * self.weights).sum().item() / self.probes

    def on_grid(self, points: int = DENSITY_GRID, width: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(eigenvalue, density): the measure smoothed by a Gaussian kernel of standard deviation
        ``width`` (default :data:`DENSITY_WIDTH` of the span of the nodes) on ``points`` equally
        spaced eigenvalues, 5 widths beyond the extreme nodes; the density integrates to 1."""
        nodes, weights = self.nodes.numpy().ravel(), self.weights.numpy().ravel() / self.probes
        low, high = float(nodes.min()), float(nodes.max())
        width = width or DENSITY_WIDTH * max(high - low, abs(high), 1e-12)
        grid = np.linspace(low - 5 * width, high + 5 * width, points)
        kernel = np.exp(-0.5 * ((grid[:, None] - nodes[None, :]) / width) ** 2) / (width * math.sqrt(2 * math.pi))
        return grid, kernel @ weights

    def grid_csv(self, step: int | None = None) -> str:
        """The density on its grid as CSV (eigenvalue,density); with ``step``, a first column
        ``step`` records the checkpoint measured, for a file whose name does not say it."""
        grid, density = self.on_grid()
        first, head = ("", "") if step is None else (f"{step},", "step,")
        return f"{head}eigenvalue,density\n" + "".join(f"{first}{x!r},{y!r}\n" for x, y in zip(grid.tolist(), density.tolist()))

    def nodes_csv(self) -> str:
        rows = [f"{i},{self.nodes[i, j].item()!r},{self.weights[i, j].item()!r}\n"
                for i in range(self.probes) for j in range(self.nodes.shape[1])]
        return "probe,node,weight\n" + "".join(rows)


def spectral_density(model, loss_fn, X, Y, *, generator, probes=DENSITY_PROBES, steps=DENSITY_STEPS, chunk_size=None,
                     train_mode=True, exact=False) -> SpectralDensity:
    """The eigenvalue density phi(t) = (1/P) sum_i delta(t - lambda_i) of the full-batch H by
    stochastic Lanczos quadrature (Ubaru, Chen and Saad 2017; Ghorbani, Krishnan and Xiao 2019):

        phi ~ (1/p) sum_{i=1}^p sum_{j=1}^m tau_ij delta(t - theta_ij),

    the Gauss quadrature (:func:`lanczos_quadrature`) of m = ``steps`` Lanczos steps from each of
    p = ``probes`` Rademacher probes z_i / sqrt(P), drawn from ``generator``. Since E[v v^T] = I / P,
    v^T f(H) v is unbiased for (1/P) tr f(H) = int f dphi. Exactly p * min(m, P) products, the
    probes in groups whose Lanczos bases fit in 1 GiB. Columns ``density_trace`` (with ``_se``,
    ``_n``: Hutchinson on these probes) and ``density_mass_above``; files
    ``density/step_<N>.csv`` and ``density/step_<N>_nodes.csv``.
    """
    start = time.perf_counter()
    op = _operator(model, loss_fn, X, Y, chunk_size, train_mode, exact)
    steps = min(steps, op.dim)
    Z = (2 * torch.randint(0, 2, (op.dim, probes), generator=generator, device=generator.device) - 1).to(op.device, op.dtype)
    group = max(1, min(probes, _BASIS_BUDGET // (steps * op.dim * Z.element_size())))
    parts = [lanczos_quadrature(op.matvec, Z[:, first:first + group], steps) for first in range(0, probes, group)]
    nodes, weights = (torch.cat(column) for column in zip(*parts))
    return SpectralDensity(nodes, weights, op.dim, op.hvps, time.perf_counter() - start)


def wasserstein_1(nodes_a, weights_a, nodes_b, weights_b) -> float:
    """W_1 = int |F_a(t) - F_b(t)| dt between two discrete probability measures on the line
    (weights normalised to sum 1), F their cumulative distribution functions."""
    a, b = np.asarray(nodes_a, float).ravel(), np.asarray(nodes_b, float).ravel()
    wa, wb = np.asarray(weights_a, float).ravel(), np.asarray(weights_b, float).ravel()
    points = np.concatenate([a, b])
    order = np.argsort(points, kind="stable")
    mass = np.concatenate([wa / wa.sum(), -wb / wb.sum()])[order]
    return float(np.sum(np.abs(np.cumsum(mass)[:-1]) * np.diff(points[order])))
