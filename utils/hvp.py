"""Exact Hessian-vector products of the mean training loss, shared by every curvature measurement.

For a model with trainable parameters theta (flattened, length P) and data (X, Y) of n samples,

    L(theta) = loss_fn(model(X), Y)            (mean over the n samples),
    H v      = d/d theta [ grad L(theta) . v ]  (double backward, exact).

On the whole training set the data are processed in chunks of ``chunk_size`` samples so that
memory stays bounded: L = sum_c (n_c/n) L_c, grad L = sum_c (n_c/n) grad L_c and
H = sum_c (n_c/n) H_c. Unchunked, the graph of grad L is built once and reused by every
product; chunked, it is rebuilt per chunk for every block of vectors. A block of m vectors
goes through one graph as m backward passes with the graph retained. This is the fastest exact
mode for every model measured (``benchmarks/bench_measurements.py`` on two CPU cores; one
full-batch product on a new vector, in full-batch gradients): MLP 3072-512-512-10, n = 2048:
double backward 1.25, ``is_grads_batched`` blocks of 8 1.72 per vector, ``torch.func``
forward-over-reverse ``jvp(grad)`` 3.22; CNN, n = 512: 2.67, 3.49 and 4.02. Building the
shared graph costs 1.4 (MLP) and 1.7 (CNN) gradients once.

The train/eval mode is explicit because BatchNorm makes the loss (and its Hessian) depend on
it; it is applied during the forward passes only, the previous mode of every submodule is
restored afterwards, and the running statistics are updated on copies, so a measurement never
changes the model's parameters, buffers, ``.grad`` or mode. With BatchNorm in train mode the
statistics are those of each chunk, so chunked and unchunked operators differ there.

The operator is a snapshot at the parameters it was built at; autograd refuses to use a
retained graph after the parameters are modified in place.
"""

from contextlib import contextmanager

import torch
from torch.func import functional_call


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


def forward(model: torch.nn.Module, X: torch.Tensor, train_mode: bool) -> torch.Tensor:
    """model(X) in the given mode, updating running statistics on copies of the buffers."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    with model_mode(model, train_mode):
        if not buffers:
            return model(X)
        return functional_call(model, buffers, (X,))


def as_model_data(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Floating data in the parameters' dtype (float64 models get float64 inputs); labels kept."""
    if t.is_floating_point():
        return t.to(device=device, dtype=dtype)
    return t.to(device=device)


def split(v: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """A flat vector of length P as views shaped like ``params`` (the inverse of :func:`flatten`)."""
    return [piece.view_as(p) for piece, p in zip(v.split([p.numel() for p in params]), params)]


def flatten(tensors) -> torch.Tensor:
    """Per-parameter tensors concatenated into one flat vector, in parameter order."""
    return torch.cat([t.reshape(-1) for t in tensors])


def chunks(n: int, chunk_size: int | None):
    """(start, stop) of consecutive slices of range(n) of at most ``chunk_size`` (one slice for None)."""
    size = n if chunk_size is None else chunk_size
    for start in range(0, n, size):
        yield start, min(start + size, n)


def flat_grad(model, loss_fn, X, Y, *, chunk_size=None, train_mode=True) -> torch.Tensor:
    """grad L as a flat vector of length P (chunked like :class:`HessianOperator`)."""
    return _loss_and_grad(model, loss_fn, X, Y, chunk_size=chunk_size, train_mode=train_mode)[1]


def _loss_and_grad(model, loss_fn, X, Y, *, chunk_size, train_mode):
    params = trainable_params(model)
    X = as_model_data(X, params[0].dtype, params[0].device)
    Y = as_model_data(Y, params[0].dtype, params[0].device)
    n = X.shape[0]
    loss, grad = 0.0, torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype,
                                  device=params[0].device)
    for start, stop in chunks(n, chunk_size):
        chunk_loss = loss_fn(forward(model, X[start:stop], train_mode), Y[start:stop])
        g = torch.autograd.grad(chunk_loss, params, allow_unused=True, materialize_grads=True)
        weight = (stop - start) / n
        loss += weight * chunk_loss.item()
        grad += weight * flatten(g)
    return loss, grad


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
    ``hvps`` counts the vectors multiplied (a block of m counts m). ``gradient()`` and ``loss()``
    are computed on the same data with the same chunking and mode. ``chunk_size=None`` (or
    >= n) keeps one graph for the whole data; otherwise chunks of ``chunk_size`` samples are
    processed one at a time.
    """

    def __init__(self, model, loss_fn, X, Y, *, chunk_size=None, train_mode=True):
        super().__init__(model, loss_fn, X, Y, chunk_size=chunk_size, train_mode=train_mode)
        self._loss = None
        self._grad = None

    def _build(self, start: int, stop: int):
        """(loss, grads that depend on theta, their parameter indices) on X[start:stop]."""
        loss = self.loss_fn(forward(self.model, self.X[start:stop], self.train_mode),
                            self.Y[start:stop])
        grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True,
                                    materialize_grads=True)
        return loss, grads

    def _full_graph(self):
        if self._graph is None:
            self._graph = self._build(0, self.n)
            self._loss = self._graph[0].item()
            self._grad = flatten(self._graph[1]).detach()
        return self._graph

    def _products(self, grads, V: torch.Tensor) -> torch.Tensor:
        """Columns of H_c V by one backward pass per column through the retained graph."""
        # Gradient entries that do not depend on theta (e.g. a bias feeding a linear loss)
        # have a zero Hessian row and no graph to differentiate.
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        out = torch.zeros_like(V)
        if not live:
            return out
        outputs = [grads[i] for i in live]
        for j in range(V.shape[1]):
            pieces = split(V[:, j], self.params)
            hv = torch.autograd.grad(outputs, self.params, grad_outputs=[pieces[i] for i in live],
                                     retain_graph=True, allow_unused=True, materialize_grads=True)
            out[:, j] = flatten(hv)
        return out

    def matvec(self, V: torch.Tensor) -> torch.Tensor:
        """H V for V of shape (P,) or (P, m)."""
        if V.shape[0] != self.dim or V.dim() not in (1, 2):
            raise ValueError(f"expected a vector (P,) or block (P, m) with P={self.dim}, "
                             f"got shape {tuple(V.shape)}")
        block = V.reshape(self.dim, -1).to(device=self.device, dtype=self.dtype)
        if self.chunk_size is None:
            result = self._products(self._full_graph()[1], block)
        else:
            result = self._chunked_products(block)
        self.hvps += block.shape[1]
        return result.reshape(V.shape)

    def _chunked_products(self, block: torch.Tensor) -> torch.Tensor:
        result = torch.zeros_like(block)
        loss, grad = 0.0, torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for start, stop in chunks(self.n, self.chunk_size):
            chunk_loss, grads = self._build(start, stop)
            weight = (stop - start) / self.n
            result += weight * self._products(grads, block)
            loss += weight * chunk_loss.item()
            grad += weight * flatten(grads).detach()
        # The gradient comes for free from the chunk graphs; keep it for gradient()/loss().
        self._loss, self._grad = loss, grad
        return result

    def _ensure_loss_and_grad(self):
        if self._grad is not None:
            return
        if self.chunk_size is None:
            self._full_graph()
        else:
            self._loss, self._grad = _loss_and_grad(
                self.model, self.loss_fn, self.X, self.Y,
                chunk_size=self.chunk_size, train_mode=self.train_mode)

    def gradient(self) -> torch.Tensor:
        """grad L (P,), detached, on the operator's data, chunking and mode."""
        self._ensure_loss_and_grad()
        return self._grad.clone()

    def loss(self) -> float:
        """L on the operator's data, chunking and mode."""
        self._ensure_loss_and_grad()
        return self._loss
