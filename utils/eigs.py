"""Eigen-solvers for the top of a symmetric spectrum, driven only by a block product V -> H V.

Every solver takes ``matvec``, a function mapping a block V of shape (P, m) (m vectors as
columns) to H V of the same shape, for a symmetric H that is never formed (in this project the
loss Hessian, one data pass per call). Cost is counted in Hessian-vector products (HVPs): the
sum of m over all calls. The solvers hand ``matvec`` whole blocks wherever the algorithm allows,
so one data pass can serve several vectors.

Stopping rule, shared by all solvers: a Ritz pair (theta, x) with ||x|| = 1 is converged when

    ||H x - theta x|| <= tol * |theta|.

Then some eigenvalue of H lies within tol * |theta| of theta, and within (tol * |theta|)^2 / gap
when theta is separated by ``gap`` from the rest of the spectrum. A solver stops when all wanted
pairs pass this test, never on the change of an estimate between iterations. The returned
residuals are these relative norms for the returned vectors, computed from products the solver
already holds (no extra HVPs). When ``max_iter`` runs out first, the best pairs come back with
``converged=False`` and the residuals reached; nothing is raised.

Solvers:
    lanczos          algebraically largest k eigenvalues; Krylov/Rayleigh-Ritz with full
                     re-orthogonalisation, thick restarts and a block warm start. The method of
                     choice for lambda_max.
    lobpcg           algebraically largest k eigenvalues by block locally optimal iteration;
                     block products, useful for k > 1.
    power_iteration  largest-MAGNITUDE eigenvalue, for comparison only.

Random vectors come from the ``generator`` argument (a fixed-seed generator when it is None),
never from the global RNG, so results are reproducible.

The module is a little over 500 lines because the three solvers share the stopping rule, the
start blocks and the orthogonalisation helpers at its end; splitting them would put the rule
in one file and the code that applies it in another.
"""

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from utils.errors import UserError

MatVec = Callable[[torch.Tensor], torch.Tensor]
# The default relative residual of every solve (--eig-tol): eigenvalues to about 0.1 %, or far
# better when the top one is separated from the rest (see the stopping rule above).
EIG_TOL = 1e-3
# The solvers by their --eig-method names.
EIG_METHODS = ("lanczos", "lobpcg", "power")
_CHUNK = 1 << 12  # rows per partial product in _inner


@dataclass
class EigResult:
    """Outcome of an eigen-solve.

    values: (k,) eigenvalue estimates, descending. vectors: (P, k) unit Ritz vectors, column i
    belongs to values[i]. residuals: (k,) relative residuals ||H v - lambda v|| / |lambda|.
    iterations: solver iterations. matvecs: HVPs used (vectors multiplied by H).
    converged: every residual is within the tolerance.
    """

    values: torch.Tensor
    vectors: torch.Tensor
    residuals: torch.Tensor
    iterations: int
    matvecs: int
    converged: bool


class _CountedProduct:
    """``matvec`` with a count of the vectors it has multiplied."""

    def __init__(self, matvec: MatVec):
        self._matvec = matvec
        self.count = 0

    def __call__(self, block: torch.Tensor) -> torch.Tensor:
        product = self._matvec(block)
        if product.shape != block.shape:
            raise ValueError(f"matvec returned shape {tuple(product.shape)} for a block of shape {tuple(block.shape)}")
        self.count += block.shape[1]
        return product


def lanczos(
    matvec: MatVec,
    dim: int,
    *,
    k: int = 1,
    tol: float = EIG_TOL,
    max_iter: int = 300,
    init: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    max_basis: int = 64,
) -> EigResult:
    """Algebraically largest ``k`` eigenpairs of the symmetric H behind ``matvec``.

    Algorithm. An orthonormal basis Q of a search space is kept together with its products
    H Q; the projected matrix T = Q^T H Q gives Ritz pairs (theta_i, x_i = Q s_i) by a dense
    eigen-solve (Rayleigh-Ritz). Each iteration appends the residual r = H x - theta x of the
    leading unconverged Ritz pair, re-orthogonalised against Q (full re-orthogonalisation; r
    is orthogonal to span(Q) up to rounding, so one Gram-Schmidt pass restores it), and
    multiplies it by H: one HVP per iteration. From a single start vector q_1 this is the
    Lanczos process with full re-orthogonalisation: x lies in the Krylov space K_m(H, q_1), so
    H x - theta x adds exactly the next Krylov direction, and T is the tridiagonal Lanczos
    matrix up to rounding. Because H Q is held explicitly, the residual of every Ritz pair,
    H x - theta x = (H Q) s - theta Q s, is the true residual (what the Lanczos estimate
    |beta_m s_{m,i}| approximates), at no HVP cost.

    Start. Cold (``init`` None): one random vector, i.e. plain Lanczos. Warm (``init`` a
    (P, r) block, typically the eigenvectors of the previous measurement): the start space is
    span(init), multiplied by H in one block call (r HVPs); its Rayleigh-Ritz step resolves
    how the old eigenvectors rotated among themselves, and the Krylov steps that follow start
    from the residual of its best Ritz vector. A single previous top vector is usually the
    cheapest start; several previous eigenvectors pay off when the top of the spectrum is a
    tight cluster whose eigenvectors rotate within it between measurements. No random vector
    is added: with residual stopping it cannot reveal an eigenvalue that the start misses (the
    solve stops as soon as the start's best pair is accurate), and it costs an HVP.

    Cost besides the HVPs: about five passes over the basis per iteration (Ritz vector,
    residual, re-orthogonalisation, the new column of T), on vectors stored as contiguous
    rows. Inner products over the dim entries go through :func:`_inner`, whose float64
    accumulation keeps float32 solves accurate to well below the tolerance at dim ~ 1e6.

    Restart. When the basis reaches ``max_basis`` vectors it is compressed to the leading half
    of its Ritz vectors (thick restart); Q and H Q are rotated together, so no HVP is spent and
    memory stays at 2 * max_basis vectors of length P (storage grows by doubling up to that).

    Stopping rule: all top-k Ritz pairs satisfy ||H x - theta x|| <= tol * |theta|, or the
    Krylov space is the whole space, or ``max_iter`` expansion steps were taken (then
    ``converged`` is False). Enough steps are always taken to have k Ritz pairs.

    Breakdown (the new direction lies in span(Q), e.g. an invariant Krylov space or k larger
    than that space) is handled by continuing with a random direction orthogonal to Q; when
    the basis fills the whole space (dim small) the Ritz pairs are the exact eigenpairs.

    Tensors are created with ``init``'s dtype and device when ``init`` is given, else with
    ``dtype`` and ``device``.
    """
    _check_arguments(dim, k, tol, max_iter)
    init, generator, dtype, device = _setup(dim, init, generator, dtype, device)
    product = _CountedProduct(matvec)
    capacity = min(dim, max(max_basis, 2 * k + 2))
    # Vectors are stored as rows, so appending one and every pass over the basis touch
    # contiguous memory; basis_rows[:size].T is the (dim, size) matrix Q.
    basis_rows = torch.empty(0, dim, dtype=dtype, device=device)
    product_rows = torch.empty(0, dim, dtype=dtype, device=device)
    projected = torch.zeros(capacity, capacity, dtype=torch.float64, device=device)

    def append(block: torch.Tensor, size: int) -> int:
        """Add orthonormal columns ``block`` (orthogonal to the basis) and their products."""
        nonlocal basis_rows, product_rows
        width = block.shape[1]
        block_products = product(block)
        if size + width > basis_rows.shape[0]:
            # Storage grows by doubling, so short solves never hold max_basis vectors.
            rows = min(capacity, max(size + width, 2 * basis_rows.shape[0], 16))
            basis_rows, product_rows = _grown(basis_rows, size, rows), _grown(product_rows, size, rows)
        basis_rows[size : size + width] = block.T
        product_rows[size : size + width] = block_products.T
        new = slice(size, size + width)
        # One pass over the basis: Q^T (H q) is the new column of T = Q^T H Q.
        cross = _inner(basis_rows[:size].T, block_products)
        projected[:size, new] = cross
        projected[new, :size] = cross.T
        projected[new, new] = _symmetric(_inner(block, block_products))
        return size + width

    start = _start_block(dim, init, 1 if init is None else 0, capacity, generator, dtype, device)
    size = append(start, 0)
    iterations = 0
    while True:
        thetas, coefficients = _descending_eigh(projected[:size, :size])
        wanted = min(k, size)
        ritz_coefficients = coefficients[:, :wanted].to(dtype)
        vectors = basis_rows[:size].T @ ritz_coefficients
        residual_vectors = product_rows[:size].T @ ritz_coefficients - vectors * thetas[:wanted].to(dtype)
        residuals = _relative(residual_vectors, thetas[:wanted])
        unconverged = torch.nonzero(residuals > tol).flatten()
        converged = size >= k and unconverged.numel() == 0
        if converged or size == dim or (iterations >= max_iter and size >= k):
            break
        if unconverged.numel() > 0:
            # A Ritz residual is orthogonal to span(Q) up to rounding: one pass restores it.
            direction = _orthonormalize_once(residual_vectors[:, unconverged[:1]], basis_rows[:size])
        else:
            direction = _orthonormalize(_random_block(dim, 1, generator, dtype, device), basis_rows[:size].T)
        if direction.shape[1] == 0:
            direction = _random_direction(basis_rows[:size].T, generator)
        if size == capacity:
            keep = max(k + 1, capacity // 2)
            kept = coefficients[:, :keep].to(dtype)
            basis_rows[:keep] = kept.T @ basis_rows[:size]
            product_rows[:keep] = kept.T @ product_rows[:size]
            projected.zero_()
            projected[:keep, :keep] = torch.diag(thetas[:keep])
            size = keep
        size = append(direction, size)
        iterations += 1
    return EigResult(
        values=thetas[:wanted].to(dtype),
        vectors=vectors,
        residuals=residuals,
        iterations=iterations,
        matvecs=product.count,
        converged=converged,
    )


def lobpcg(
    matvec: MatVec,
    dim: int,
    *,
    k: int = 1,
    tol: float = EIG_TOL,
    max_iter: int = 300,
    init: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    block_size: Optional[int] = None,
) -> EigResult:
    """Algebraically largest ``k`` eigenpairs by LOBPCG (locally optimal block iteration).

    Algorithm (Knyazev 2001, with an orthonormal basis as in Hetmaniuk & Lehoucq 2006). The
    block X of ``block_size`` (default k) Ritz vectors, its products A X, the previous search
    directions P and A P are kept. Each iteration:
        R = A X - X diag(theta)                 residuals, free from the stored A X;
        W = R for the unconverged columns       made orthonormal to [X, P];
        A W = matvec(W)                         the only HVPs of the iteration (one block);
        Rayleigh-Ritz on S = [X, P, W] with A S = [A X, A P, A W]: the top block_size Ritz
        vectors become the new X, and their component in [P, W] the new P.
    A X and A P are never recomputed: the same linear combinations that form the new X and P
    (and that orthonormalise P against X) are applied to the stored products. Rayleigh-Ritz
    keeps the ALGEBRAICALLY largest Ritz values, so a large negative eigenvalue is never
    mistaken for the top. Converged columns drop out of W (soft locking) and stop costing HVPs.
    Columns of P or W that are numerically dependent on the rest are dropped.

    Start: span of ``init`` (P, r) completed by random vectors to block_size columns, or
    block_size + 1 random vectors from a cold start; multiplied in one block call, its top
    block_size Ritz vectors become X and any others the first P.

    Stopping rule: all top-k Ritz pairs satisfy ||A x - theta x|| <= tol * |theta|; otherwise
    after ``max_iter`` iterations (or when no new direction is left) ``converged`` is False.
    Tensors take ``init``'s dtype and device when it is given, else ``dtype`` and ``device``.
    """
    _check_arguments(dim, k, tol, max_iter)
    init, generator, dtype, device = _setup(dim, init, generator, dtype, device)
    width = min(dim, max(k, block_size or k))
    product = _CountedProduct(matvec)
    # Cold, one spare random vector seeds P (fewer HVPs in total); warm, init alone is better.
    n_random = width + 1 if init is None else max(0, width - _init_width(init))
    start = _start_block(dim, init, n_random, dim, generator, dtype, device)
    start_products = product(start)
    thetas, coefficients = _descending_eigh(_symmetric(_inner(start, start_products)))
    coefficients = coefficients.to(dtype)
    x, ax = start @ coefficients[:, :width], start_products @ coefficients[:, :width]
    p, ap = start @ coefficients[:, width:], start_products @ coefficients[:, width:]
    thetas = thetas[:width]
    iterations = 0
    while True:
        residual_vectors = ax - x * thetas.to(dtype)
        residuals = _relative(residual_vectors, thetas)
        converged = bool((residuals[:k] <= tol).all())
        if converged or iterations >= max_iter:
            break
        p, ap = _orthonormalize_with_products(p, ap, x, ax)
        w = _orthonormalize(residual_vectors[:, residuals > tol], torch.cat([x, p], dim=1))
        if w.shape[1] == 0:
            break
        aw = product(w)
        search, search_products = torch.cat([x, p, w], dim=1), torch.cat([ax, ap, aw], dim=1)
        all_thetas, coefficients = _descending_eigh(_symmetric(_inner(search, search_products)))
        coefficients = coefficients[:, :width].to(dtype)
        x, ax = search @ coefficients, search_products @ coefficients
        p, ap = search[:, width:] @ coefficients[width:], search_products[:, width:] @ coefficients[width:]
        thetas = all_thetas[:width]
        iterations += 1
    return EigResult(
        values=thetas[:k].to(dtype),
        vectors=x[:, :k],
        residuals=residuals[:k],
        iterations=iterations,
        matvecs=product.count,
        converged=converged,
    )


def power_iteration(
    matvec: MatVec,
    dim: int,
    *,
    tol: float = EIG_TOL,
    max_iter: int = 1000,
    init: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
    device="cpu",
) -> EigResult:
    """Power iteration: the eigenvalue of LARGEST MAGNITUDE, which may be negative.

    This is not lambda_max when H has a negative eigenvalue larger in magnitude than its top
    positive one (common early in training); use :func:`lanczos` for the algebraically largest
    eigenvalue. Kept for comparison with the literature, which often uses it.

    Iteration: v <- H v / ||H v|| from ``init`` (its first column) or a random vector. The
    estimate is the signed Rayleigh quotient rho = v^T H v; it stops when
    ||H v - rho v|| <= tol * |rho|, both from the same product H v, so each iteration costs
    one HVP. Convergence is linear with ratio |lambda_2| / |lambda_1| (in magnitude), which
    is why it needs far more HVPs than Lanczos.
    """
    _check_arguments(dim, 1, tol, max_iter)
    init, generator, dtype, device = _setup(dim, init, generator, dtype, device)
    product = _CountedProduct(matvec)
    if init is not None:
        vector = init.reshape(dim, -1)[:, :1].clone()
    else:
        vector = _random_block(dim, 1, generator, dtype, device)
    vector = vector / _norms(vector).to(dtype)
    iterations = 0
    while True:
        image = product(vector)
        rho64 = _inner(vector, image).reshape(1)
        rho = rho64.to(dtype).reshape(())
        residual = _relative(image - rho * vector, rho64)
        iterations += 1
        converged = bool(residual[0] <= tol)
        norm = _norms(image)[0].to(dtype)
        if converged or iterations >= max_iter or norm == 0:
            break
        vector = image / norm
    return EigResult(
        values=rho.reshape(1),
        vectors=vector,
        residuals=residual,
        iterations=iterations,
        matvecs=product.count,
        converged=converged,
    )


def _check_arguments(dim: int, k: int, tol: float, max_iter: int) -> None:
    if not 1 <= k <= dim:
        raise UserError(f"cannot compute {k} eigenvalues of a {dim}-dimensional operator; ask for between 1 and {dim}")
    if not tol > 0:
        raise UserError(f"eigen-solver tolerance must be positive, got {tol}")
    if max_iter < 1:
        raise UserError(f"eigen-solver max_iter must be at least 1, got {max_iter}")


def _setup(dim: int, init: Optional[torch.Tensor], generator, dtype: torch.dtype, device) -> tuple:
    """(init, generator, dtype, device) for a solve: an empty init counts as none, the dtype
    and device follow init when it is given, and a missing generator becomes a fixed-seed one
    (drawn from for the whole solve, so successive random vectors differ)."""
    if init is not None and init.numel() == 0:
        init = None
    if init is not None and init.shape[0] != dim:
        raise ValueError(f"init has {init.shape[0]} rows for a {dim}-dimensional operator")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    if init is not None:
        return init, generator, init.dtype, init.device
    return init, generator, dtype, torch.device(device)


def _descending_eigh(matrix: torch.Tensor) -> tuple:
    """Eigenvalues (descending) and eigenvectors of a small symmetric matrix, in float64."""
    values, vectors = torch.linalg.eigh(matrix.double())
    return values.flip(0), vectors.flip(1)


def _relative(residual_vectors: torch.Tensor, thetas: torch.Tensor) -> torch.Tensor:
    """||r_i|| / |theta_i| for the columns r_i of ``residual_vectors`` (0 for an exact pair)."""
    norms = _norms(residual_vectors)
    return torch.where(norms == 0, torch.zeros_like(norms), norms / thetas.abs())


def _random_block(dim: int, width: int, generator: torch.Generator, dtype, device) -> torch.Tensor:
    """Gaussian (dim, width) block drawn from ``generator`` on its own device."""
    block = torch.randn(dim, width, generator=generator, dtype=dtype, device=generator.device)
    return block.to(device)


def _random_direction(basis: torch.Tensor, generator) -> torch.Tensor:
    """A unit random vector orthogonal to the orthonormal columns of ``basis`` (fewer than dim)."""
    dim = basis.shape[0]
    while True:
        direction = _orthonormalize(_random_block(dim, 1, generator, basis.dtype, basis.device), basis)
        if direction.shape[1] == 1:
            return direction


def _init_width(init: Optional[torch.Tensor]) -> int:
    if init is None:
        return 0
    return 1 if init.dim() == 1 else init.shape[1]


def _start_block(dim: int, init: Optional[torch.Tensor], n_random: int, max_size: int, generator, dtype,
                 device) -> torch.Tensor:
    """Orthonormal start block: the columns of ``init`` (as many as fit in ``max_size`` next to
    ``n_random``) and ``n_random`` random vectors; columns lost to linear dependence are
    replaced by random ones."""
    max_size = min(max_size, dim)
    if init is None:
        columns = torch.empty(dim, 0, dtype=dtype, device=device)
    else:
        columns = init.reshape(dim, -1)[:, : max(0, max_size - n_random)]
    n_random = min(n_random, max_size - columns.shape[1])
    size = columns.shape[1] + n_random
    block = _orthonormalize(torch.cat([columns, _random_block(dim, n_random, generator, dtype, device)], dim=1))
    while block.shape[1] < size:
        block = torch.cat([block, _random_direction(block, generator)], dim=1)
    return block


def _grown(buffer: torch.Tensor, used: int, rows: int) -> torch.Tensor:
    """A taller copy of ``buffer`` holding its first ``used`` rows."""
    taller = torch.empty(rows, buffer.shape[1], dtype=buffer.dtype, device=buffer.device)
    taller[:used] = buffer[:used]
    return taller


def _inner(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """A^T B in float64 for tall blocks A (dim, a) and B (dim, b).

    Single-precision matrix products over very long columns lose digits (about 1e-3
    relative at dim ~ 2e6 on the CPU, which would put a floor under the residuals), so for
    low-precision dtypes the products of chunks of ``_CHUNK`` rows are summed in float64.
    """
    if A.dtype == torch.float64:
        return A.T @ B
    dim = A.shape[0]
    chunks = dim // _CHUNK
    whole = chunks * _CHUNK
    out = torch.zeros(A.shape[1], B.shape[1], dtype=torch.float64, device=A.device)
    if chunks:
        a = A[:whole].reshape(chunks, _CHUNK, A.shape[1]).transpose(1, 2)
        out += (a @ B[:whole].reshape(chunks, _CHUNK, B.shape[1])).double().sum(0)
    if whole < dim:
        out += (A[whole:].T @ B[whole:]).double()
    return out


def _norms(block: torch.Tensor) -> torch.Tensor:
    """Column norms of a tall block, in float64 (a sum of squares keeps its digits)."""
    return (block * block).sum(dim=0).double().sqrt()


def _symmetric(matrix: torch.Tensor) -> torch.Tensor:
    return 0.5 * (matrix + matrix.T)


def _orthonormalize(block: torch.Tensor, basis: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Orthonormal columns spanning ``block`` minus its part in span(``basis``) (orthonormal).

    Classical Gram-Schmidt against ``basis`` and modified Gram-Schmidt within the block, each
    done twice so the result is orthogonal to working precision. A column keeping less than
    100 eps of its norm carries no new direction and is dropped.
    """
    eps = torch.finfo(block.dtype).eps
    return _gram_schmidt(block, None, basis, None, 100 * eps)[0]


def _orthonormalize_once(column: torch.Tensor, basis_rows: torch.Tensor) -> torch.Tensor:
    """``column`` (dim, 1), already orthogonal to the rows of ``basis_rows`` up to rounding,
    made orthogonal to working precision by one Gram-Schmidt pass and normalised; (dim, 0)
    when nothing of it is left (more than 100 eps of its norm must remain)."""
    norm = _norms(column)[0]
    if basis_rows.shape[0] > 0:
        column = column - basis_rows.T @ _inner(basis_rows.T, column).to(column.dtype)
    kept = _norms(column)[0]
    if not kept > 100 * torch.finfo(column.dtype).eps * norm:
        return column[:, :0]
    return column / kept.to(column.dtype)


def _orthonormalize_with_products(block, block_products, basis, basis_products) -> tuple:
    """:func:`_orthonormalize` applied to ``block`` and, with the same linear combinations, to
    its stored products A block (using A basis), so that A block stays known without HVPs.

    A column that keeps less than eps^(1/3) of its norm is dropped: its product, formed by
    cancellation, would carry a relative error of eps / (kept fraction)."""
    eps = torch.finfo(block.dtype).eps
    return _gram_schmidt(block, block_products, basis, basis_products, eps ** (1 / 3))


def _gram_schmidt(block, block_products, basis, basis_products, keep_ratio) -> tuple:
    original_norms = _norms(block)
    if basis is not None and basis.shape[1] > 0:
        for _ in range(2):
            overlap = _inner(basis, block).to(block.dtype)
            block = block - basis @ overlap
            if block_products is not None:
                block_products = block_products - basis_products @ overlap
    columns, column_products = [], []
    for j in range(block.shape[1]):
        column = block[:, j : j + 1]
        column_product = block_products[:, j : j + 1] if block_products is not None else None
        for _ in range(2):
            for i, previous in enumerate(columns):
                overlap = _inner(previous, column).to(column.dtype)
                column = column - previous * overlap
                if column_product is not None:
                    column_product = column_product - column_products[i] * overlap
        norm = _norms(column)[0]
        if norm > keep_ratio * original_norms[j] and norm > 0:
            columns.append(column / norm.to(column.dtype))
            if column_product is not None:
                column_products.append(column_product / norm.to(column.dtype))
    empty = block[:, :0]
    block = torch.cat(columns, dim=1) if columns else empty
    if block_products is None:
        return block, None
    return block, torch.cat(column_products, dim=1) if column_products else empty
