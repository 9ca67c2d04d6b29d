"""The Gram engine: exact curvature terms of networks of Linear layers and element-wise activations.

The ``mlp`` and ``linear`` models are chains

    z_l = W_l h_{l-1} + c_l,   h_l = act(z_l)   (l = 1..L, no activation after layer L),

with h_0 the flattened input and f = z_L the output. For the mean loss of a batch B of b rows,
L_B = (1/b) sum_i l(f_i, y_i), back-propagation gives the errors delta_{l,i} = dL_B/dz_{l,i} and

    grad_{W_l} L_B = sum_i delta_{l,i} h_{l-1,i}^T,     grad_{c_l} L_B = sum_i delta_{l,i}.

Everything the measurements need follows from b x b Gram matrices, so no parameter-sized
vector is ever formed:

    |g_B|^2 = sum_l sum_ij (delta_{l,i} . delta_{l,j}) (h_{l-1,i} . h_{l-1,j} + 1)

(the +1 is the bias; dropped for a layer without one), and v^T H u-type quadratic forms are
second directional derivatives, carried forward through the layers. Along a direction
V = (V_l, C_l), with theta(t) = theta + t V, a dot for d/dt and two dots for d^2/dt^2 at t = 0:

    zdot_l  = V_l h_{l-1} + C_l + W_l hdot_{l-1},     zddot_l = 2 V_l hdot_{l-1} + W_l hddot_{l-1},
    hdot_l  = act'(z_l) zdot_l,                       hddot_l = act''(z_l) zdot_l^2 + act'(z_l) zddot_l,
    V^T H_D V = d^2/dt^2 L_D(theta(t)) = (1/|D|) sum_i [ fdot_i^T (d^2 l/df^2) fdot_i + (dl/df)^T fddot_i ]

for the mean loss L_D over any rows D. When V = g_B, the products with V_l are Gram products,
V_l h + C_l = sum_j delta_{l,j} (h_{l-1,j} . h + 1) and V_l hdot = sum_j delta_{l,j} (h_{l-1,j} . hdot),
so a batch costs b x b (or |D| x b) Gram matrices plus products with the weights W_l. Many
batches are stacked so that every product with a weight matrix is one large matrix multiply.
For the paper's MLP the 3072 x 512 input layer then appears in one forward product and one
b x b Gram matrix per batch, instead of the six parameter-sized products of a double-backward
Hessian-vector product.

The activations' derivatives are listed in :mod:`utils.activations`. Losses: mse
l = |f - y|^2 has dl/df = 2 (f - y) and d^2l/df^2 = 2 I; ce with p = softmax(f) has
dl/df = p - e_y and d^2l/df^2 = diag(p) - p p^T.

This module only evaluates; which batches, and which route for other models, is decided by
:mod:`utils.batch_forms`. The products agree with double-backward Hessian-vector products to
round-off (``tests/test_gram.py`` checks them against dense float64 Hessians).
"""

from dataclasses import dataclass

import torch
from torch import nn

from utils.activations import activate, activation_name
from utils.losses import ce_loss, mse_loss

# Rows (samples x directions) processed at once: bounds the memory of the stacked tensors.
ROW_BUDGET = 1 << 14


@dataclass
class _Layer:
    weight: torch.Tensor  # (d_out, d_in)
    bias: torch.Tensor | None  # (d_out,)
    activation: str | None  # applied after this layer; None for the output layer


def _layers_of(model: nn.Module) -> list[_Layer] | None:
    """The (Linear, activation) chain of a Sequential model, or None if it is not one."""
    if not isinstance(model, nn.Sequential):
        return None
    modules = list(model)
    if modules and isinstance(modules[0], nn.Flatten):
        if modules[0].start_dim != 1 or modules[0].end_dim != -1:
            return None
        modules = modules[1:]
    # Linear (act Linear)*: linear layers at even positions, activations at odd ones.
    if len(modules) % 2 == 0:
        return None
    layers = []
    for i in range(0, len(modules), 2):
        linear = modules[i]
        if type(linear) is not nn.Linear:
            return None
        activation = None
        if i + 1 < len(modules):
            activation = activation_name(modules[i + 1])
            if activation is None:
                return None
        bias = None if linear.bias is None else linear.bias.detach()
        layers.append(_Layer(linear.weight.detach(), bias, activation))
    return layers


def linear_network(model, loss_fn, X, Y) -> "LinearNetwork | None":
    """The Gram engine's view of (model, loss_fn) on data (X, Y), or None where it does not apply.

    Applies to ``nn.Sequential([Flatten,] Linear, act, Linear, ..., Linear)`` with act among
    relu, tanh, silu and exact gelu, every parameter trainable, no buffers, loss mse (targets
    of the outputs' size) or ce with integer labels, and inputs that flatten to the first
    layer's width.
    """
    layers = _layers_of(model)
    if layers is None or any(True for _ in model.buffers()):
        return None
    if not all(p.requires_grad for p in model.parameters()):
        return None
    if loss_fn is mse_loss:
        loss = "mse"
    elif loss_fn is ce_loss and not Y.is_floating_point() and Y.dim() == 1:
        loss = "ce"
    else:
        return None
    flat_inputs = X[0].numel() if isinstance(model[0], nn.Flatten) else X.shape[-1]
    if X.dim() < 2 or (X.dim() != 2 and not isinstance(model[0], nn.Flatten)):
        return None
    if flat_inputs != layers[0].weight.shape[1]:
        return None
    outputs = layers[-1].weight.shape[0]
    # mse_loss broadcasts outputs (n, C) against targets; only (n, C) targets mean one per output.
    if loss == "mse" and tuple(Y.shape[1:]) != (outputs,):
        return None
    return LinearNetwork(layers, loss)


def _plus(a, b):
    """a + b where None stands for an exact zero."""
    if a is None:
        return b
    return a if b is None else a + b


def _through_activation(d1, d2, zdot, zddot):
    """(hdot, hddot) = (act' zdot, act'' zdot^2 + act' zddot), with None for an exact zero."""
    hdot = d1 * zdot
    hddot = _plus(None if d2 is None else d2 * zdot * zdot, None if zddot is None else d1 * zddot)
    return hdot, hddot


@dataclass
class _Rows:
    """Per-sample quantities of a set of rows: layer inputs h_{l-1}, act' and act'' of the
    hidden layers (None where zero), dl/df, softmax(f) for ce (else None) and the errors
    delta_l of l itself, each with the rows first."""

    inputs: list
    first: list
    second: list
    loss_grad: torch.Tensor
    probs: torch.Tensor | None
    deltas: list

    def map(self, fn) -> "_Rows":
        """The same quantities with ``fn`` applied to every tensor."""
        def each(t):
            return None if t is None else fn(t)
        return _Rows([each(t) for t in self.inputs], [each(t) for t in self.first],
                     [each(t) for t in self.second], each(self.loss_grad), each(self.probs),
                     [each(t) for t in self.deltas])


class LinearNetwork:
    """A Linear/activation chain with its loss, evaluated with Gram matrices (see the module doc)."""

    def __init__(self, layers: list[_Layer], loss: str):
        self.layers, self.loss = layers, loss
        self.dtype, self.device = layers[0].weight.dtype, layers[0].weight.device

    # --- building blocks -----------------------------------------------------------------------

    def _inputs(self, X: torch.Tensor) -> torch.Tensor:
        """Rows of h_0: X flattened per sample, in the parameters' dtype and device."""
        return X.reshape(X.shape[0], -1).to(device=self.device, dtype=self.dtype)

    def _targets(self, Y: torch.Tensor, rows: int) -> torch.Tensor:
        if self.loss == "ce":
            return Y.reshape(rows).to(self.device)
        return Y.reshape(rows, -1).to(device=self.device, dtype=self.dtype)

    def _forward(self, h: torch.Tensor):
        """Layer inputs h_0..h_{L-1}, (act', act'') of each hidden layer, and the output f."""
        inputs, derivatives = [], []
        for layer in self.layers:
            inputs.append(h)
            z = h @ layer.weight.T
            if layer.bias is not None:
                z = z + layer.bias
            if layer.activation is None:
                return inputs, derivatives, z
            h, d1, d2 = activate(layer.activation, z)
            derivatives.append((d1, d2))
        raise AssertionError("the last layer has no activation")

    def _loss_terms(self, f: torch.Tensor, y: torch.Tensor):
        """Per-row dl/df and what d^2 l / df^2 needs: softmax(f) for ce, None for mse."""
        if self.loss == "mse":
            return 2 * (f - y), None
        p = torch.softmax(f, dim=-1)
        grad = p.clone()
        grad[torch.arange(f.shape[0], device=f.device), y] -= 1
        return grad, p

    def _second_derivative(self, probs, loss_grad, fdot, fddot) -> torch.Tensor:
        """Per row fdot^T (d^2 l / df^2) fdot + (dl/df)^T fddot (``fddot`` None: zero)."""
        per_row = self._curvature(probs, fdot)
        return per_row if fddot is None else per_row + (loss_grad * fddot).sum(-1)

    def _curvature(self, probs, fdot: torch.Tensor) -> torch.Tensor:
        """fdot^T (d^2 l / df^2) fdot over the last axis (``probs`` from :meth:`_loss_terms`)."""
        if probs is None:
            return 2 * (fdot * fdot).sum(-1)
        pf = probs * fdot
        return (pf * fdot).sum(-1) - pf.sum(-1) ** 2

    def _backward(self, derivatives, error: torch.Tensor) -> list[torch.Tensor]:
        """delta_l = dL/dz_l for every layer, from delta_L = ``error``."""
        deltas = [error]
        for layer, (d1, _) in zip(reversed(self.layers[1:]), reversed(derivatives)):
            deltas.insert(0, (deltas[0] @ layer.weight) * d1)
        return deltas

    def _gram(self, layer: _Layer, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """h_i . h'_j (+ 1 with a bias) for batched rows left (K, r, d) and right (K, s, d)."""
        gram = left @ right.mT
        return gram + 1 if layer.bias is not None else gram

    # --- per-batch quantities ---------------------------------------------------------------

    def sample_rows(self, X: torch.Tensor, Y: torch.Tensor) -> "_Rows":
        """Everything per sample that a batch needs: it does not depend on the batch.

        The errors are those of l itself (delta_L = dl/df); a batch of b rows scales them by 1/b.
        """
        inputs, derivatives, f = self._forward(self._inputs(X))
        loss_grad, probs = self._loss_terms(f, self._targets(Y, X.shape[0]))
        return _Rows(inputs, [d1 for d1, _ in derivatives], [d2 for _, d2 in derivatives],
                     loss_grad, probs, self._backward(derivatives, loss_grad))

    def batch_terms(self, X: torch.Tensor, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(g_B^T H_B g_B, |g_B|^2) of K batches X (K, b, ...), Y (K, b, ...), each shaped (K,)."""
        K, b = X.shape[0], X.shape[1]
        rows = self.sample_rows(X.reshape(K * b, *X.shape[2:]), Y.reshape(K * b, *Y.shape[2:]))
        return self.batch_terms_of(rows.map(lambda t: t.reshape(K, b, *t.shape[1:])))

    def batch_terms_of(self, rows: "_Rows") -> tuple[torch.Tensor, torch.Tensor]:
        """(g_B^T H_B g_B, |g_B|^2) of K batches whose sample rows come stacked (K, b, ...)."""
        b = rows.loss_grad.shape[1]
        deltas = [d / b for d in rows.deltas]
        inputs = rows.inputs
        grams = [self._gram(layer, h, h) for layer, h in zip(self.layers, inputs)]
        norm2 = sum(((d @ d.mT) * gram).sum((1, 2)) for d, gram in zip(deltas, grams))
        zdot, zddot = grams[0] @ deltas[0], None
        for l in range(1, len(self.layers)):
            hdot, hddot = _through_activation(rows.first[l - 1], rows.second[l - 1], zdot, zddot)
            weight = self.layers[l].weight
            cross = hdot @ inputs[l].mT  # hdot_i . h_j within each batch
            zdot = grams[l] @ deltas[l] + hdot @ weight.T
            zddot = _plus(2 * (cross @ deltas[l]), None if hddot is None else hddot @ weight.T)
        return self._second_derivative(rows.probs, rows.loss_grad, zdot, zddot).sum(1) / b, norm2

    def full_gradient(self, X, Y, chunk_rows: int):
        """grad L on all of (X, Y) as per-layer (grad W_l, grad c_l or None)."""
        n = X.shape[0]
        grads = [[torch.zeros_like(layer.weight),
                  None if layer.bias is None else torch.zeros_like(layer.bias)]
                 for layer in self.layers]
        for start in range(0, n, chunk_rows):
            stop = min(start + chunk_rows, n)
            inputs, derivatives, f = self._forward(self._inputs(X[start:stop]))
            loss_grad, _ = self._loss_terms(f, self._targets(Y[start:stop], stop - start))
            for grad, h, delta in zip(grads, inputs, self._backward(derivatives, loss_grad / n)):
                grad[0] += delta.T @ h
                if grad[1] is not None:
                    grad[1] += delta.sum(0)
        return grads

    def split(self, flat: torch.Tensor) -> list:
        """A flat parameter vector (in ``model.parameters()`` order) as per-layer (V_l, c_l)."""
        pieces, start = [], 0
        for layer in self.layers:
            weight = flat[start : start + layer.weight.numel()].view_as(layer.weight)
            start += layer.weight.numel()
            bias = None
            if layer.bias is not None:
                bias = flat[start : start + layer.bias.numel()]
                start += layer.bias.numel()
            pieces.append((weight, bias))
        return pieces

    def _batch_factors(self, batch_X, batch_Y):
        """Layer inputs and errors (each (K, b, d)) of K batches: g_{B_k} in factored form."""
        K, b = batch_X.shape[0], batch_X.shape[1]
        rows = self.sample_rows(batch_X.reshape(K * b, *batch_X.shape[2:]),
                                batch_Y.reshape(K * b, *batch_Y.shape[2:]))
        inputs = [h.reshape(K, b, -1) for h in rows.inputs]
        return inputs, [d.reshape(K, b, -1) / b for d in rows.deltas]

    def batch_dot(self, batch_X, batch_Y, vector: list) -> torch.Tensor:
        """g_{B_k}^T v for K batches and v given per layer as (V_l, c_l or None); shape (K,).

        sum_l sum_j delta_{l,j}^T (V_l h_{l-1,j} + c_l): one product of the batch rows with v.
        """
        inputs, deltas = self._batch_factors(batch_X, batch_Y)
        total = 0
        for (weight, bias), h, delta in zip(vector, inputs, deltas):
            applied = h @ weight.T
            if bias is not None:
                applied = applied + bias
            total = total + (applied * delta).sum((1, 2))
        return total

    def quadratic_forms(self, X, Y, batch_X, batch_Y, chunk_rows: int | None = None) -> torch.Tensor:
        """g_{B_k}^T H g_{B_k} for K batches (K, b, ...), H on all of (X, Y); shape (K,).

        The data are processed in chunks of at most ``chunk_rows`` rows; every chunk carries
        all K directions forward at once.
        """
        K = batch_X.shape[0]
        n = X.shape[0]
        inputs_B, deltas_B = self._batch_factors(batch_X, batch_Y)
        rows = max(1, ROW_BUDGET // K) if chunk_rows is None else chunk_rows
        total = torch.zeros(K, dtype=self.dtype, device=self.device)
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            total += self._chunk_forms(X[start:stop], Y[start:stop], inputs_B, deltas_B) / n
        return total

    def _chunk_forms(self, X, Y, inputs_B, deltas_B) -> torch.Tensor:
        """sum over the chunk's rows of the per-row second derivative, for every direction."""
        m = X.shape[0]
        K, b = deltas_B[0].shape[0], deltas_B[0].shape[1]
        inputs, derivatives, f = self._forward(self._inputs(X))
        loss_grad, probs = self._loss_terms(f, self._targets(Y, m))

        def gram_part(l, left, with_bias):
            """sum_j delta^{B_k}_{l,j} (h^{B_k}_{l-1,j} . left_i (+ 1)) for every direction k."""
            if left.dim() == 2:  # rows shared by all directions: one product with all batches
                gram = (left @ inputs_B[l].reshape(K * b, -1).T).reshape(m, K, b).transpose(0, 1)
            else:
                gram = left @ inputs_B[l].mT
            if with_bias and self.layers[l].bias is not None:
                gram = gram + 1
            return gram @ deltas_B[l]

        zdot, zddot = gram_part(0, inputs[0], True), None
        for l in range(1, len(self.layers)):
            hdot, hddot = _through_activation(*derivatives[l - 1], zdot, zddot)
            weight = self.layers[l].weight
            zdot = gram_part(l, inputs[l], True) + hdot @ weight.T
            zddot = _plus(2 * gram_part(l, hdot, False),
                          None if hddot is None else hddot @ weight.T)
        return self._second_derivative(probs, loss_grad, zdot, zddot).sum(-1)


def squared_norm(pieces: list) -> float:
    """|v|^2 of a vector given per layer as (V_l, c_l or None), e.g. :meth:`LinearNetwork.full_gradient`."""
    return float(sum((w * w).sum() + (0 if c is None else (c * c).sum()) for w, c in pieces))
