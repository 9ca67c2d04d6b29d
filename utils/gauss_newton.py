"""Gauss–Newton-vector products of the mean training loss, the positive semi-definite part of H.

With outputs f_i = f(x_i; theta) in R^C, their Jacobians J_i = d f_i / d theta (C x P) and the
mean loss L = (1/n) sum_i l(f_i, y_i), the Hessian splits as

    H = G + (1/n) sum_i sum_c (d l / d f_ic) hess f_ic,     G = (1/n) sum_i J_i^T M_i J_i,

with M_i = d^2 l / d f_i^2 the loss Hessian in output space. For the project's losses

    mse  l = |f - y|^2 (no 1/2):   M_i = 2 I,                G = (2/n) sum_i J_i^T J_i,
    ce   l = -log softmax(f)_y:    M_i = diag p_i - p_i p_i^T, G = (1/n) sum_i J_i^T (diag p_i - p_i p_i^T) J_i.

A product G v is J v (a Jacobian-vector product), then the output-space matrix, then J^T
(a vector-Jacobian product). M is applied by differentiating ``loss_fn`` twice with respect to
the outputs, so any loss_fn works and the matrices above are what it yields. J v is obtained
by reverse mode only, as d/du [ (J^T u) . v ] for a dummy u (the double-vjp trick):
forward-mode differentiation through training-mode BatchNorm is not reliable in the torch
versions this project supports, and the reverse-mode graph is reused by every vector of a
block. Data are chunked like :class:`utils.hvp.HessianOperator`: G = sum_c (n_c/n) G_c, with
BatchNorm statistics of each chunk in train mode.
"""

import torch

from utils.hvp import CurvatureOperator, chunks, flatten, forward, split


class GaussNewtonOperator(CurvatureOperator):
    """G, the Gauss–Newton matrix of the mean loss of ``model`` on (X, Y), as a linear operator.

    ``matvec(V)`` takes a flat vector (P,) or a block (P, m) and returns G V of the same shape;
    ``hvps`` counts the vectors multiplied. ``gradient()`` is grad L = (1/n) sum_i J_i^T d l_i / d f_i
    from the same graph (unchunked) or chunks. The model's parameters, buffers, ``.grad`` and
    mode are left as they were.
    """

    def _build(self, start: int, stop: int):
        """(outputs, dummy u, J^T u with graph, loss gradient in output space with graph)."""
        outputs = forward(self.model, self.X[start:stop], self.train_mode)
        u = torch.zeros_like(outputs, requires_grad=True)
        jtu = torch.autograd.grad(outputs, self.params, grad_outputs=u, create_graph=True,
                                  allow_unused=True, materialize_grads=True)
        # The loss as a function of the outputs alone: its Hessian is the block-diagonal M.
        f = outputs.detach().requires_grad_(True)
        dl_df = torch.autograd.grad(self.loss_fn(f, self.Y[start:stop]), f, create_graph=True)[0]
        return outputs, u, jtu, f, dl_df

    def _products(self, graph, V: torch.Tensor) -> torch.Tensor:
        outputs, u, jtu, f, dl_df = graph
        # Parameters that do not reach the outputs have no graph (and zero rows in G).
        live = [i for i, t in enumerate(jtu) if t.requires_grad]
        out = torch.zeros_like(V)
        if not live:
            return out
        for j in range(V.shape[1]):
            pieces = split(V[:, j], self.params)
            jv = torch.autograd.grad([jtu[i] for i in live], u, grad_outputs=[pieces[i] for i in live],
                                     retain_graph=True, allow_unused=True, materialize_grads=True)[0]
            mjv = torch.autograd.grad(dl_df, f, grad_outputs=jv, retain_graph=True, allow_unused=True,
                                      materialize_grads=True)[0]
            gv = torch.autograd.grad(outputs, self.params, grad_outputs=mjv, retain_graph=True,
                                     allow_unused=True, materialize_grads=True)
            out[:, j] = flatten(gv)
        return out

    def _chunk_graph(self, start: int, stop: int):
        """The graph of X[start:stop]; unchunked, built once and reused by every call."""
        if self.chunk_size is not None:
            return self._build(start, stop)
        if self._graph is None:
            self._graph = self._build(0, self.n)
        return self._graph

    def matvec(self, V: torch.Tensor) -> torch.Tensor:
        """G V for V of shape (P,) or (P, m)."""
        if V.shape[0] != self.dim or V.dim() not in (1, 2):
            raise ValueError(f"expected a vector (P,) or block (P, m) with P={self.dim}, "
                             f"got shape {tuple(V.shape)}")
        block = V.reshape(self.dim, -1).to(device=self.device, dtype=self.dtype)
        result = torch.zeros_like(block)
        for start, stop in chunks(self.n, self.chunk_size):
            result += (stop - start) / self.n * self._products(self._chunk_graph(start, stop), block)
        self.hvps += block.shape[1]
        return result.reshape(V.shape)

    def gradient(self) -> torch.Tensor:
        """grad L (P,), detached, as J^T dL/df on the operator's data, chunking and mode."""
        grad = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for start, stop in chunks(self.n, self.chunk_size):
            outputs, _, _, _, dl_df = self._chunk_graph(start, stop)
            g = torch.autograd.grad(outputs, self.params, grad_outputs=dl_df.detach(), retain_graph=True,
                                    allow_unused=True, materialize_grads=True)
            grad += (stop - start) / self.n * flatten(g)
        return grad
