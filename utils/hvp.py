"""Exact Hessian-vector products of the mean training loss, shared by every curvature measurement.

For a model with trainable parameters theta (flattened, length P) and data (X, Y) of n samples,

    L(theta) = loss_fn(model(X), Y)            (mean over the n samples),
    H v      = d/d theta [ grad L(theta) . v ]  (double backward, exact).

On the whole training set the data are processed in chunks of ``chunk_size`` samples so that
memory stays bounded: L = sum_c (n_c/n) L_c, grad L = sum_c (n_c/n) grad L_c and
H = sum_c (n_c/n) H_c.

Four exact modes compute the same H V (to round-off); the operator takes the fastest one for
the model and device unless told otherwise (:func:`default_hvp_mode`):

    double-backward          the graph of grad L is built once (create_graph) and every vector
                             is one backward pass through it with the graph retained; chunked,
                             the graph is rebuilt per chunk for every block of vectors.
    double-backward-batched  the same graph; a block of vectors goes through it in groups of
                             8 by one batched backward (``is_grads_batched``).
    forward-over-reverse     ``torch.func.jvp`` of ``torch.func.grad``: no retained graph, every
                             product one forward-mode pass over the gradient computation; a
                             block goes through ``vmap`` in groups of 8. Not for BatchNorm.
    r-operator               Pearlmutter's R-operator on a cached primal forward and backward
                             pass (:mod:`utils.r_operator`): each product is only the tangent
                             half of forward-over-reverse. Layer chains only (Conv2d, Linear,
                             activations, MaxPool2d, Flatten); one vector at a time on the CPU,
                             groups of 8 through ``vmap`` on a GPU. ``quadratic_forms`` (v^T H v,
                             for GNI and the Hessian trace) skips the backward half altogether.

The default is the mode that ``benchmarks/bench_measurements.py`` measures fastest (its output
and docs/performance.md give the figures): the R-operator for convolutional chains
(the ``cnn`` model) on either device, double backward for other models on the CPU, batched
double backward for networks without convolutions on a GPU, and forward-over-reverse for other
convolutional networks without BatchNorm on a GPU. (``torch.func.linearize`` applies a product
about as fast as the R-operator on a GPU but takes longer to trace than a whole lambda_max solve
saves.)

The train/eval mode is explicit because BatchNorm makes the loss (and its Hessian) depend on
it; it is applied during the forward passes only, the previous mode of every submodule is
restored afterwards, and running statistics are left alone (training-mode BatchNorm stops
tracking them, anything else works on copies), so a measurement never changes the model's
parameters, buffers, ``.grad`` or mode. With BatchNorm in train mode the statistics are those
of each chunk, so chunked and unchunked operators differ there.

The operator is a snapshot at the parameters it was built at; autograd refuses to use a
retained graph after the parameters are modified in place.
"""

from contextlib import contextmanager

import torch
from torch.func import functional_call, grad, vmap

from utils.models import has_batchnorm
from utils.r_operator import ChainCurvature, is_chain, quiet_jvp

HVP_MODES = ("double-backward", "double-backward-batched", "forward-over-reverse", "r-operator")
PLAIN_HVP_MODE = "double-backward"  # one backward per vector through the retained graph
_VECTORS_PER_PASS = 8  # vectors per batched backward or vmap call: bounds the extra memory


def default_hvp_mode(model: torch.nn.Module, device) -> str:
    """The fastest exact product mode measured for this kind of model on this device.

    ``r-operator`` for convolutional layer chains (:func:`utils.r_operator.is_chain`). Else on
    the CPU ``double-backward``; on CUDA ``forward-over-reverse`` for convolutional networks
    without BatchNorm and ``double-backward-batched`` otherwise (see the module docstring).
    """
    convolutional = any(isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)) for m in model.modules())
    if convolutional and is_chain(model):
        return "r-operator"
    if torch.device(device).type != "cuda":
        return "double-backward"
    if convolutional and not has_batchnorm(model):
        return "forward-over-reverse"
    return "double-backward-batched"


def measurement_hvp_mode(model: torch.nn.Module, device, *, exact: bool) -> str:
    """The mode a measurement's Hessian products take: plain double backward for
    ``--exact-measurements``, else :func:`default_hvp_mode` (what run records report)."""
    return PLAIN_HVP_MODE if exact else default_hvp_mode(model, device)


def trainable_params(model: torch.nn.Module) -> list[torch.Tensor]:
    """The parameters that require grad, in ``model.parameters()`` order."""
    return [p for p in model.parameters() if p.requires_grad]


def num_params(model: torch.nn.Module) -> int:
    """P, the length of the flat parameter vector."""
    return sum(p.numel() for p in trainable_params(model))


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    """The trainable parameters concatenated into one detached vector of length P."""
    return torch.cat([p.detach().reshape(-1) for p in trainable_params(model)])


@contextmanager
def model_mode(model: torch.nn.Module, train_mode: bool):
    """Put ``model`` in train (or eval) mode, restoring every submodule's own flag on exit."""
    previous = [(module, module.training) for module in model.modules()]
    model.train(train_mode)
    try:
        yield
    finally:
        for module, training in previous:
            module.training = training


_RUNNING_STATISTICS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)


def forward(model: torch.nn.Module, X: torch.Tensor, train_mode: bool) -> torch.Tensor:
    """model(X) in the given mode, leaving the model's buffers (running statistics) untouched."""
    with model_mode(model, train_mode):
        return forward_in_current_mode(model, X)


def forward_in_current_mode(model: torch.nn.Module, X: torch.Tensor) -> torch.Tensor:
    """model(X) in the mode the model is in, leaving its buffers untouched (see :func:`forward`)."""
    owners = [m for m in model.modules() if next(m.buffers(recurse=False), None) is not None]
    if not owners:
        return model(X)
    if all(type(m) in _RUNNING_STATISTICS and m.training for m in owners):
        # A training-mode BatchNorm that does not track statistics normalises by the batch's
        # own statistics, as before, and neither reads nor writes its buffers, so the per-batch
        # loops of small batches need no copies.
        with _statistics_not_tracked(owners):
            return model(X)
    # Elsewhere buffers may be written (running statistics) or kept by the graph (eval-mode
    # BatchNorm): the forward pass gets copies, so the operator is a snapshot of them too.
    with _buffers_replaced_by_copies(owners):
        return model(X)


@contextmanager
def _statistics_not_tracked(norms: list[torch.nn.Module]):
    """BatchNorm layers that neither update nor count running statistics while inside."""
    tracking = [m.track_running_stats for m in norms]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, flag in zip(norms, tracking):
            m.track_running_stats = flag


@contextmanager
def _buffers_replaced_by_copies(owners: list[torch.nn.Module]):
    """Each module's buffers swapped for clones while inside, the originals put back after.

    Swapping per module (``model.modules()`` lists a shared module once) keeps a module that
    appears twice in the model from being swapped twice and restored to a clone, which
    ``torch.func.functional_call`` does with such modules."""
    originals = [(m, dict(m.named_buffers(recurse=False))) for m in owners]
    for m, buffers in originals:
        for name, buffer in buffers.items():
            setattr(m, name, buffer.clone())
    try:
        yield
    finally:
        for m, buffers in originals:
            for name, buffer in buffers.items():
                setattr(m, name, buffer)


def as_model_data(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Floating data in the parameters' dtype (float64 models get float64 inputs); labels kept."""
    if t.is_floating_point():
        return t.to(device=device, dtype=dtype)
    return t.to(device=device)


def params_and_data(model, X, Y) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(the trainable parameters, X and Y as :func:`as_model_data` for them)."""
    params = trainable_params(model)
    dtype, device = params[0].dtype, params[0].device
    return params, as_model_data(X, dtype, device), as_model_data(Y, dtype, device)


def split(v: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """A flat vector of length P as views shaped like ``params`` (the inverse of :func:`flatten`)."""
    return [piece.view_as(p) for piece, p in zip(v.split([p.numel() for p in params]), params)]


def flatten(tensors) -> torch.Tensor:
    """Per-parameter tensors concatenated into one flat vector, in parameter order."""
    return torch.cat([t.reshape(-1) for t in tensors])


def _split_block(block: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """A (P, m) block as per-parameter tensors of shape (*param.shape, m)."""
    sizes = [p.numel() for p in params]
    return [piece.reshape(*p.shape, block.shape[1]) for piece, p in zip(block.split(sizes), params)]


def chunks(n: int, chunk_size: int | None):
    """(start, stop) of consecutive slices of range(n) of at most ``chunk_size`` (one slice for None)."""
    size = n if chunk_size is None else chunk_size
    for start in range(0, n, size):
        yield start, min(start + size, n)


def flat_grad(model, loss_fn, X, Y, *, chunk_size=None, train_mode=True) -> torch.Tensor:
    """grad L as a flat vector of length P (chunked like :class:`HessianOperator`)."""
    params, X, Y = params_and_data(model, X, Y)
    n = X.shape[0]
    grad = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
    for start, stop in chunks(n, chunk_size):
        chunk_loss = loss_fn(forward(model, X[start:stop], train_mode), Y[start:stop])
        g = torch.autograd.grad(chunk_loss, params, allow_unused=True, materialize_grads=True)
        grad += (stop - start) / n * flatten(g)
    return grad


def quadratic_form_of_gradient(grads, params, *, retain_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(g^T H g, |g|^2) from gradients ``grads`` of a loss w.r.t. ``params`` built with
    create_graph=True: one double backward with g itself as the vector, parameter by
    parameter (no flat copies of length P). Both are 0-dim tensors on the device."""
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    detached = [g.detach() for g in grads]
    norm2 = sum((g * g).sum() for g in detached)
    if not live:
        return torch.zeros_like(norm2), norm2
    products = torch.autograd.grad([grads[i] for i in live], params, grad_outputs=[detached[i] for i in live],
                                   retain_graph=retain_graph, allow_unused=True, materialize_grads=True)
    return sum((g * h).sum() for g, h in zip(detached, products)), norm2


class CurvatureOperator:
    """What every curvature operator on (model, loss_fn, X, Y) holds: the trainable parameters
    (flattened in ``model.parameters()`` order, ``dim`` of them), the data in the parameters'
    dtype and device, the chunking (None: one graph for all n samples), the train/eval mode of
    the products and the count of vectors multiplied (``hvps``).
    """

    def __init__(self, model, loss_fn, X, Y, *, chunk_size=None, train_mode=True):
        self.model, self.loss_fn = model, loss_fn
        self.params = trainable_params(model)
        self.dim = sum(p.numel() for p in self.params)
        self.dtype, self.device = self.params[0].dtype, self.params[0].device
        self.X = as_model_data(X, self.dtype, self.device)
        self.Y = as_model_data(Y, self.dtype, self.device)
        self.n = self.X.shape[0]
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.chunk_size = None if chunk_size is None or chunk_size >= self.n else chunk_size
        self.train_mode = bool(train_mode)
        self.hvps = 0
        self._graph = None


class HessianOperator(CurvatureOperator):
    """H, the Hessian of the mean loss of ``model`` on (X, Y), as a symmetric linear operator.

    ``matvec(V)`` takes a flat vector (P,) or a block (P, m) and returns H V of the same shape;
    ``hvps`` counts the vectors multiplied (a block of m counts m). ``gradient()`` is computed
    on the same data with the same chunking and mode. ``chunk_size=None`` (or
    >= n) keeps one graph for the whole data; otherwise chunks of ``chunk_size`` samples are
    processed one at a time. ``mode`` is one of :data:`HVP_MODES`, by default
    :func:`default_hvp_mode` of the model and its device.
    """

    def __init__(self, model, loss_fn, X, Y, *, chunk_size=None, train_mode=True, mode=None):
        super().__init__(model, loss_fn, X, Y, chunk_size=chunk_size, train_mode=train_mode)
        self.mode = mode or default_hvp_mode(model, self.device)
        if self.mode not in HVP_MODES:
            raise ValueError(f"unknown HVP mode {self.mode!r}; choose one of {', '.join(HVP_MODES)}")
        if self.mode == "forward-over-reverse" and has_batchnorm(model):
            raise ValueError("forward-over-reverse products do not support BatchNorm; use double-backward")
        if self.mode == "r-operator" and not is_chain(model):
            raise ValueError("r-operator products take chains of Conv2d, Linear, activations, MaxPool2d and "
                             "Flatten only; use double-backward")
        self._grad = None
        self._chain = None

    def _build(self, start: int, stop: int):
        """The gradients of the loss on X[start:stop], their graph kept for double backward."""
        loss = self.loss_fn(forward(self.model, self.X[start:stop], self.train_mode), self.Y[start:stop])
        return torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True, materialize_grads=True)

    def _full_graph(self):
        if self._graph is None:
            self._graph = self._build(0, self.n)
        return self._graph

    def _products(self, grads, V: torch.Tensor) -> torch.Tensor:
        """Columns of H_c V by backward passes through the retained graph of ``grads``."""
        # Gradient entries that do not depend on theta (e.g. a bias feeding a linear loss)
        # have a zero Hessian row and no graph to differentiate.
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        if not live:
            return torch.zeros_like(V)
        outputs = [grads[i] for i in live]
        batched = self.mode == "double-backward-batched"
        step = _VECTORS_PER_PASS if batched else 1
        columns = []
        for j in range(0, V.shape[1], step):
            block = V[:, j : j + step]
            pieces = [p.movedim(-1, 0) for p in _split_block(block, self.params)]
            if batched and block.shape[1] > 1:
                hv = torch.autograd.grad(outputs, self.params, grad_outputs=[pieces[i] for i in live],
                                         retain_graph=True, allow_unused=True, materialize_grads=True,
                                         is_grads_batched=True)
                # Parameters the outputs do not reach come back as unbatched zeros.
                width = block.shape[1]
                columns.append(torch.cat([(h if h.dim() > p.dim() else h.expand(width, *p.shape)).reshape(width, -1)
                                          for h, p in zip(hv, self.params)], dim=1).T)
            else:
                hv = torch.autograd.grad(outputs, self.params, grad_outputs=[pieces[i][0] for i in live],
                                         retain_graph=True, allow_unused=True, materialize_grads=True)
                columns.append(flatten(hv).unsqueeze(1))
        return columns[0] if len(columns) == 1 else torch.cat(columns, dim=1)

    def _forward_over_reverse(self, start: int, stop: int, V: torch.Tensor) -> torch.Tensor:
        """Columns of H_c V on X[start:stop] by jvp of the gradient, vmapped over groups."""
        names = [name for name, p in self.model.named_parameters() if p.requires_grad]
        primals = {name: p.detach() for name, p in zip(names, self.params)}
        X, Y = self.X[start:stop], self.Y[start:stop]

        def loss_of(values):
            return self.loss_fn(functional_call(self.model, values, (X,)), Y)

        def product(tangents):
            return flatten(quiet_jvp(grad(loss_of), (primals,), (tangents,))[1].values())

        out = torch.empty_like(V)
        with model_mode(self.model, self.train_mode):
            for j in range(0, V.shape[1], _VECTORS_PER_PASS):
                block = V[:, j : j + _VECTORS_PER_PASS]
                pieces = [p.movedim(-1, 0) for p in _split_block(block, self.params)]
                if block.shape[1] == 1:
                    out[:, j] = product({name: piece[0] for name, piece in zip(names, pieces)})
                else:
                    out[:, j : j + block.shape[1]] = vmap(product)(dict(zip(names, pieces))).T
        return out

    def _chain_of(self, start: int, stop: int) -> ChainCurvature:
        """The R-operator's primal cache on X[start:stop] (kept when it covers all the data)."""
        if self._chain is not None and (start, stop) == (0, self.n):
            return self._chain
        with model_mode(self.model, self.train_mode):
            chain = ChainCurvature(self.model, self.loss_fn, self.X[start:stop], self.Y[start:stop])
        if (start, stop) == (0, self.n):
            self._chain = chain
        return chain

    def _column_groups(self, V: torch.Tensor):
        """(first column, per-parameter tangents stacked along a first axis) for the R-operator:
        one column at a time on the CPU, groups of 8 (through ``vmap``) on a GPU."""
        step = _VECTORS_PER_PASS if self.device.type == "cuda" else 1
        for j in range(0, V.shape[1], step):
            yield j, [p.movedim(-1, 0) for p in _split_block(V[:, j : j + step], self.params)]

    def _r_operator(self, chain: ChainCurvature, V: torch.Tensor) -> torch.Tensor:
        """Columns of H_c V."""
        out = torch.empty_like(V)
        for j, pieces in self._column_groups(V):
            width = pieces[0].shape[0]
            if width == 1:
                out[:, j] = flatten(chain.product([piece[0] for piece in pieces]))
            else:
                products = chain.products(pieces)
                out[:, j : j + width] = torch.cat([h.reshape(width, -1) for h in products], 1).T
        return out

    def _r_operator_forms(self, chain: ChainCurvature, V: torch.Tensor) -> torch.Tensor:
        """v^T H_c v for the columns of V."""
        forms = [chain.quadratic_form([piece[0] for piece in pieces]).reshape(1) if pieces[0].shape[0] == 1
                 else chain.quadratic_forms(pieces) for _, pieces in self._column_groups(V)]
        return torch.cat(forms) if forms else V.new_zeros(0)

    def _through_chains(self, per_chain, shape) -> torch.Tensor:
        """sum_c (n_c/n) per_chain(chain of chunk c), over the R-operator's primal caches."""
        result = torch.zeros(shape, dtype=self.dtype, device=self.device)
        # The chunks' primal passes give the gradient too: the first pass keeps it for gradient().
        with_gradient = self._grad is None
        grad = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for start, stop in chunks(self.n, self.chunk_size):
            chain = self._chain_of(start, stop)
            weight = (stop - start) / self.n
            result += weight * per_chain(chain)
            if with_gradient:
                grad += weight * flatten(chain.gradient())
        if with_gradient:
            self._grad = grad
        return result

    def quadratic_forms(self, V: torch.Tensor) -> torch.Tensor:
        """v^T H v for every column v of V (P, m), shape (m,); ``hvps`` counts m.

        The R-operator mode takes each as a second directional derivative by forward
        differentiation (two thirds of a product's work); other modes from :meth:`matvec`.
        """
        if V.dim() != 2 or V.shape[0] != self.dim:
            raise ValueError(f"expected a block (P, m) with P={self.dim}, got shape {tuple(V.shape)}")
        if self.mode != "r-operator":
            return (V * self.matvec(V)).sum(dim=0)
        block = V.to(device=self.device, dtype=self.dtype)
        forms = self._through_chains(lambda chain: self._r_operator_forms(chain, block), (block.shape[1],))
        self.hvps += block.shape[1]
        return forms

    def matvec(self, V: torch.Tensor) -> torch.Tensor:
        """H V for V of shape (P,) or (P, m)."""
        if V.shape[0] != self.dim or V.dim() not in (1, 2):
            raise ValueError(f"expected a vector (P,) or block (P, m) with P={self.dim}, "
                             f"got shape {tuple(V.shape)}")
        block = V.reshape(self.dim, -1).to(device=self.device, dtype=self.dtype)
        if self.mode == "r-operator":
            result = self._through_chains(lambda chain: self._r_operator(chain, block), block.shape)
        elif self.mode == "forward-over-reverse":
            result = torch.zeros_like(block)
            for start, stop in chunks(self.n, self.chunk_size):
                result += (stop - start) / self.n * self._forward_over_reverse(start, stop, block)
        elif self.chunk_size is None:
            result = self._products(self._full_graph(), block)
        else:
            result = self._chunked_products(block)
        self.hvps += block.shape[1]
        return result.reshape(V.shape)

    def _chunked_products(self, block: torch.Tensor) -> torch.Tensor:
        result = torch.zeros_like(block)
        grad = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for start, stop in chunks(self.n, self.chunk_size):
            grads = self._build(start, stop)
            weight = (stop - start) / self.n
            result += weight * self._products(grads, block)
            grad += weight * flatten(grads).detach()
        # The gradient comes for free from the chunk graphs; keep it for gradient().
        self._grad = grad
        return result

    def gradient(self) -> torch.Tensor:
        """grad L (P,), detached, on the operator's data, chunking and mode."""
        if self._grad is None:
            if self.mode == "r-operator":
                self._through_chains(lambda chain: 0.0, ())
            elif self.chunk_size is None and self.mode != "forward-over-reverse":
                self._grad = flatten(self._full_graph()).detach()
            else:
                self._grad = flat_grad(self.model, self.loss_fn, self.X, self.Y, chunk_size=self.chunk_size,
                                       train_mode=self.train_mode)
        return self._grad.clone()

    def gradient_quadratic_form(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(g^T H g, |g|^2) for the operator's own gradient g, as 0-dim tensors (one HVP).

        Unchunked, g and H g come from one graph parameter by parameter, with no flat copies
        of length P: on small batches of large networks those copies cost as much as the
        products themselves. The results stay on the device (no synchronisation), so many
        batches can be stacked before they are read.
        """
        if self.mode == "r-operator":
            g = self.gradient()
            return self.quadratic_forms(g[:, None])[0], g @ g
        if self.chunk_size is not None:
            g = self.gradient()
            return g @ self.matvec(g), g @ g
        self.hvps += 1
        return quadratic_form_of_gradient(self._full_graph(), self.params, retain_graph=True)
