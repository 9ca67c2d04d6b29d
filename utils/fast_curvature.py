"""Fast curvature measurements for networks of Linear layers and element-wise activations.

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

Every function here returns the same numbers as the double-backward path of :mod:`utils.measures`
to round-off, draws the same random batches from the same generator in the same order and
applies the same stopping rule, so an estimate is reproduced by the exact path. Models of other
shapes (convolutions, BatchNorm, frozen parameters), other losses and soft ce targets are not
chains in this sense (:func:`linear_network` returns None): the per-batch measurements then run
one double backward per batch as the exact path does (:func:`utils.hvp.batch_quadratic_forms`,
many batches per call); on a GPU and without BatchNorm, the same double backward for all the
batches of a call at once under ``vmap`` (:func:`utils.hvp.vmapped_quadratic_forms`); and for
convolutional layer chains on the CPU, a primal pass and a second-order forward pass per batch
(:func:`utils.hvp.chain_quadratic_forms`); see :func:`batch_route`. GNI is left to the exact
path there. The chains have no mode-dependent layers, so train/eval mode matters only on that
general route.
"""

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from utils.activations import activate, activation_name
from utils.estimators import (BATCH_SHARPNESS_REL_SE, GNI_REL_SE, MAX_SAMPLES, Estimate, mean_with_stopping,
                              ratio_of_means_with_stopping, sample_batch_indices)
from utils.hvp import (PLAIN_HVP_MODE, HessianOperator, batch_quadratic_forms, chain_quadratic_forms, flat_grad,
                       num_params, trainable_params, vmapped_quadratic_forms)
from utils.losses import ce_loss, mse_loss
from utils.models import has_batchnorm
from utils.r_operator import is_chain

# Rows (samples x directions) processed at once: bounds the memory of the stacked tensors.
_ROW_BUDGET = 1 << 14
# Samples computed ahead of the stopping rule: at least this many rows per stacked pass.
_MIN_ROWS_AHEAD = 256
# Numbers of per-sample quantities (beyond the inputs) kept to reuse across batches.
_CACHE_NUMBERS = 1 << 26
# Batches whose double-backward terms one call computes (setup shared, one read-back).
_GRAPHS_PER_CALL = 64
# Parameter-sized numbers per vmapped call (about 3 per batch are live at once): bounds its memory.
_VMAP_NUMBERS = 1 << 27
# Activation numbers a vmapped call may keep, and how many it keeps per input number: for the
# project's CNN on 32x32 inputs an H200 peaked at 2.8 GiB for 54 batches of 8, about 240 per
# input number beyond the parameter-sized vectors.
_VMAP_ACTIVATION_NUMBERS = 1 << 28
_ACTIVATIONS_PER_INPUT = 250
# Batches computed ahead of the stopping rule on the vmapped route.
_VMAP_MIN_AHEAD = 8
# Parameter-sized vectors held at once by the exact path.
_EXACT_BLOCK = 10


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
    """The fast view of (model, loss_fn) on data (X, Y), or None if the fast path does not apply.

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
            d1, d2 = rows.first[l - 1], rows.second[l - 1]
            hdot = d1 * zdot
            hddot = _plus(None if d2 is None else d2 * zdot * zdot,
                          None if zddot is None else d1 * zddot)
            weight = self.layers[l].weight
            cross = hdot @ inputs[l].mT  # hdot_i . h_j within each batch
            zdot = grams[l] @ deltas[l] + hdot @ weight.T
            zddot = _plus(2 * (cross @ deltas[l]), None if hddot is None else hddot @ weight.T)
        per_row = self._curvature(rows.probs, zdot)
        if zddot is not None:
            per_row = per_row + (rows.loss_grad * zddot).sum(-1)
        return per_row.sum(1) / b, norm2

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
        rows = max(1, _ROW_BUDGET // K) if chunk_rows is None else chunk_rows
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
            d1, d2 = derivatives[l - 1]
            hdot = d1 * zdot
            hddot = _plus(None if d2 is None else d2 * zdot * zdot,
                          None if zddot is None else d1 * zddot)
            weight = self.layers[l].weight
            zdot = gram_part(l, inputs[l], True) + hdot @ weight.T
            zddot = _plus(2 * gram_part(l, hdot, False),
                          None if hddot is None else hddot @ weight.T)
        per_row = self._curvature(probs, zdot)
        if zddot is not None:
            per_row = per_row + (loss_grad * zddot).sum(-1)
        return per_row.sum(-1)


# --- measurements ----------------------------------------------------------------------------


class _SamplesAhead:
    """A ``sample_fn`` for the stopping rules that computes samples in large stacked blocks.

    ``compute(m)`` draws the next m batches from the generator and returns their m samples (a
    tensor, or a pair of tensors for a ratio of means). The rule still sees the samples one by
    one in the order drawn, so the estimate is the one a one-batch-at-a-time loop gives; only
    the block sizes change. Each block is sized from the samples so far, to reach the count at
    which the relative SE (~ 1/sqrt(k)) is predicted to pass ``rel_se`` (at least
    ``min_block``), so few samples are computed and not used; ``predict=False`` computes only
    what the rule asks for. ``rule_samples`` maps the stored columns to the samples the rule
    sees when those differ (for the prediction only).
    """

    def __init__(self, compute, *, rel_se: float, max_samples: int, min_block: int,
                 predict: bool = True, rule_samples=None):
        self.compute, self.rel_se, self.max_samples = compute, rel_se, max_samples
        self.min_block = max(1, min_block)
        self.predict = predict
        # The rule may run on a transform of the stored samples (x -> a + c x); predict on it.
        self.rule_samples = rule_samples or (lambda columns: columns)
        self.columns = None
        self.used = 0

    @property
    def computed(self) -> int:
        return 0 if self.columns is None else len(self.columns[0])

    def _next_block(self, wanted: int) -> int:
        k = self.computed
        block = max(wanted - k, self.min_block)
        if self.predict and k >= 2 and self.rel_se > 0:
            relative = _relative_se(self.rule_samples(self.columns))
            if np.isfinite(relative):
                block = max(block, math.ceil(1.1 * k * (relative / self.rel_se) ** 2) - k)
        return min(block, self.max_samples - k)

    def __call__(self, m: int):
        wanted = self.used + m
        while self.computed < wanted:
            new = self.compute(self._next_block(wanted))
            new = [_as_numpy(c) for c in (new if isinstance(new, tuple) else (new,))]
            self.columns = new if self.columns is None else [
                np.concatenate([old, more]) for old, more in zip(self.columns, new)]
        out = [c[self.used : wanted] for c in self.columns]
        self.used = wanted
        return out[0] if len(out) == 1 else tuple(out)


def _relative_se(columns) -> float:
    """SE / |estimate| of a sample mean (one column) or a ratio of means (two, delta method)."""
    k = len(columns[0])
    with np.errstate(all="ignore"):
        if len(columns) == 1:
            x = columns[0]
            return float(x.std(ddof=1) / math.sqrt(k) / abs(x.mean()))
        a, b = columns
        ratio = a.mean() / b.mean()
        return float((a - ratio * b).std(ddof=1) / math.sqrt(k) / abs(b.mean() * ratio))


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy().reshape(-1)


def _draw(n: int, b: int, m: int, generator, device) -> torch.Tensor:
    """m batches (m, b) drawn one after another, exactly as the one-batch loops draw them."""
    return torch.stack([sample_batch_indices(n, b, generator, device) for _ in range(m)])


def _require(model, loss_fn, X, Y) -> LinearNetwork:
    net = linear_network(model, loss_fn, X, Y)
    if net is None:
        raise ValueError("the fast path needs a Sequential of Linear layers and element-wise "
                         "activations with an mse or ce loss; use utils.measures instead")
    return net


def _in_blocks(compute, m: int, most: int, dim: int = 0) -> torch.Tensor:
    """compute(k) over consecutive blocks of at most ``most`` samples, concatenated."""
    parts = [compute(min(most, m - done)) for done in range(0, m, most)]
    return torch.cat(parts, dim=dim)


def batch_terms(model, loss_fn, X, Y, idx: torch.Tensor, train_mode=True):
    """(g_B^T H_B g_B, |g_B|^2) for the batches given as index rows ``idx`` (K, b), each (K,)."""
    return _batch_route(model, loss_fn, X, Y, idx.shape[1], train_mode).terms(idx)


BATCH_ROUTES = ("stacked-gram", "vmap-double-backward", "r-operator", "double-backward")


def batch_route(model, loss_fn, X, Y, *, device=None, exact: bool = False) -> str:
    """How the per-batch terms g_B^T H_B g_B and |g_B|^2 of Batch Sharpness are computed.

    ``stacked-gram``: stacked Gram matrices, for Linear/activation chains (:func:`linear_network`).
    ``vmap-double-backward``: :func:`utils.hvp.vmapped_quadratic_forms`, all batches of a call
    at once, for other models without BatchNorm on a GPU, where one small batch is bound by
    kernel launches (CNN, b = 8, H200: 7x the one-batch loop). ``r-operator``: on the CPU, for
    other layer chains (:func:`utils.r_operator.is_chain`, the ``cnn`` model), one primal pass
    per batch and g_B^T H_B g_B by forward differentiation (:func:`utils.hvp.chain_quadratic_forms`;
    CNN on 32x32 inputs: 1.6x the loop, where vmap takes twice as long as the loop).
    ``double-backward``: one batch at a time (:func:`utils.hvp.batch_quadratic_forms`), for
    everything else (BatchNorm, ResNets on the CPU) and for ``exact``. ``device`` defaults to
    the parameters' device.
    """
    if exact:
        return "double-backward"
    if linear_network(model, loss_fn, X, Y) is not None:
        return "stacked-gram"
    params = trainable_params(model)
    device = torch.device(device) if device is not None else params[0].device
    if device.type == "cuda" and not has_batchnorm(model) and not _has_dropout(model):
        return "vmap-double-backward"
    if is_chain(model):
        return "r-operator"
    return "double-backward"


def _has_dropout(model) -> bool:
    """Random layers draw one mask per call, which vmap refuses (and the loop would not share)."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules())


@dataclass
class _BatchRoute:
    """How per-batch terms are computed: ``terms(idx)`` maps index rows (K, b) to the pair
    (g_B^T H_B g_B, |g_B|^2), each (K,); ``per_call`` batches go into one call and, when
    ``ahead``, at least ``min_block`` samples are computed ahead of the stopping rule."""

    terms: object
    per_call: int
    min_block: int
    ahead: bool


def _batch_route(model, loss_fn, X, Y, batch_size, train_mode) -> _BatchRoute:
    """The route of :func:`batch_route` with its block sizes."""
    route = batch_route(model, loss_fn, X, Y)
    if route == "stacked-gram":
        return _BatchRoute(_StackedTerms(linear_network(model, loss_fn, X, Y), X, Y),
                           per_call=max(1, _ROW_BUDGET // (4 * batch_size)),
                           min_block=max(1, _MIN_ROWS_AHEAD // batch_size), ahead=True)
    if route == "vmap-double-backward":
        per_call = max(1, min(_GRAPHS_PER_CALL, _VMAP_NUMBERS // num_params(model),
                              _VMAP_ACTIVATION_NUMBERS // (batch_size * X[0].numel() * _ACTIVATIONS_PER_INPUT)))

        def vmapped_terms(idx):
            return vmapped_quadratic_forms(model, loss_fn, X, Y, idx, train_mode=train_mode)
        return _BatchRoute(vmapped_terms, per_call=per_call, min_block=min(per_call, _VMAP_MIN_AHEAD), ahead=True)

    if route == "r-operator":
        def chain_terms(idx):
            return chain_quadratic_forms(model, loss_fn, X, Y, idx)
        return _BatchRoute(chain_terms, per_call=_GRAPHS_PER_CALL, min_block=1, ahead=False)

    def double_backward_terms(idx):
        return batch_quadratic_forms(model, loss_fn, X, Y, idx, train_mode=train_mode)
    # Each batch's graph is freed before the next is built, so a call may take many batches.
    return _BatchRoute(double_backward_terms, per_call=_GRAPHS_PER_CALL, min_block=1, ahead=False)


class _StackedTerms:
    """Per-batch terms of a Linear/activation chain by stacked Gram matrices.

    A sample's activations and errors do not depend on the batch it is drawn in, so once the
    batches have asked for as many rows as the data hold, the per-sample quantities of all n
    samples are computed once (when they fit in ``_CACHE_NUMBERS``) and every later batch
    gathers its rows: the products with the first, widest layer are then not repeated.
    """

    def __init__(self, net: LinearNetwork, X, Y):
        self.net, self.X, self.Y = net, X, Y
        self.rows_asked = 0
        self.cache = None
        widths = [layer.weight.shape[0] for layer in net.layers]
        per_sample = 4 * sum(widths) + 2 * widths[-1]
        self.cacheable = X.shape[0] * per_sample <= _CACHE_NUMBERS

    def __call__(self, idx: torch.Tensor):
        with torch.no_grad():
            self.rows_asked += idx.numel()
            if self.cache is None and self.cacheable and self.rows_asked >= self.X.shape[0]:
                self.cache = self.net.sample_rows(self.X, self.Y)
            if self.cache is None:
                return self.net.batch_terms(self.X[idx], self.Y[idx])
            return self.net.batch_terms_of(self.cache.map(lambda t: t[idx]))


def _batch_samples(model, loss_fn, X, Y, batch_size, generator, train_mode, *, rel_se,
                   max_samples, pair: bool) -> "_SamplesAhead":
    """Samples of random batches for a stopping rule: Rayleigh quotients, or the pair of terms."""
    n = X.shape[0]
    route = _batch_route(model, loss_fn, X, Y, batch_size, train_mode)

    def compute(m):
        def block(k):
            quadratic, norm2 = route.terms(_draw(n, batch_size, k, generator, X.device))
            return torch.stack([quadratic, norm2]) if pair else quadratic / norm2
        out = _in_blocks(block, m, route.per_call, dim=1 if pair else 0)
        return (out[0], out[1]) if pair else out

    return _SamplesAhead(compute, rel_se=rel_se, max_samples=max_samples,
                         min_block=route.min_block, predict=route.ahead)


def batch_sharpness(model, loss_fn, X, Y, batch_size, *, generator, min_samples=20,
                    max_samples=MAX_SAMPLES, rel_se=BATCH_SHARPNESS_REL_SE, train_mode=True) -> Estimate:
    """Batch Sharpness E_B[ g_B^T H_B g_B / |g_B|^2 ], by stacked Gram matrices where possible.

    The same estimator, batches and stopping rule as :func:`utils.measures.batch_sharpness`
    (mean of per-batch Rayleigh quotients until SE / |mean| < ``rel_se``). Linear/activation
    chains use stacked Gram matrices; other models one double backward per batch on
    per-parameter tensors. ``hvps`` counts the per-batch quadratic forms computed.
    """
    start = time.perf_counter()
    ahead = _batch_samples(model, loss_fn, X, Y, batch_size, generator, train_mode, rel_se=rel_se,
                           max_samples=max_samples, pair=False)
    estimate = mean_with_stopping(ahead, min_samples=min_samples, max_samples=max_samples,
                                  rel_se=rel_se)
    return Estimate(estimate.value, estimate.se, estimate.n, ahead.computed,
                    time.perf_counter() - start)


def batch_sharpness_ratio(model, loss_fn, X, Y, batch_size, *, generator, min_samples=20,
                          max_samples=MAX_SAMPLES, rel_se=BATCH_SHARPNESS_REL_SE, train_mode=True) -> Estimate:
    """E_B[ g_B^T H_B g_B ] / E_B[ |g_B|^2 ], by stacked Gram matrices where possible.

    The same estimator, batches and stopping rule as
    :func:`utils.measures.batch_sharpness_ratio` (ratio of means, delta-method SE); routes as
    :func:`batch_sharpness`.
    """
    start = time.perf_counter()
    ahead = _batch_samples(model, loss_fn, X, Y, batch_size, generator, train_mode, rel_se=rel_se,
                           max_samples=max_samples, pair=True)
    estimate = ratio_of_means_with_stopping(ahead, min_samples=min_samples,
                                            max_samples=max_samples, rel_se=rel_se)
    return Estimate(estimate.value, estimate.se, estimate.n, ahead.computed,
                    time.perf_counter() - start)


def step_sharpness(model, loss_fn, xb, yb, train_mode=True) -> Estimate:
    """g_B^T H_B g_B / |g_B|^2 on the given batch; se = nan, one HVP-equivalent."""
    start = time.perf_counter()
    route = _batch_route(model, loss_fn, xb, yb, xb.shape[0], train_mode)
    quadratic, norm2 = route.terms(torch.arange(xb.shape[0], device=xb.device)[None])
    return Estimate((quadratic / norm2).item(), math.nan, 1, 1, time.perf_counter() - start)


def _gather(X, Y, idx):
    return X[idx], Y[idx]


def _data_rows(n: int, chunk_size: int | None) -> int:
    return n if chunk_size is None else max(1, min(n, chunk_size))


def _directions_per_pass(batch_size: int) -> int:
    return max(1, min(256, _ROW_BUDGET // (4 * batch_size)))


def gni(model, loss_fn, X, Y, batch_size, *, generator, chunk_size=None, min_samples=20,
        max_samples=MAX_SAMPLES, rel_se=GNI_REL_SE) -> Estimate:
    """GNI = E_B[ g_B^T H g_B ] / |g|^2 with many batch directions per pass over the data.

    The same estimator, batches and stopping rule as :func:`utils.measures.gni`; each sample
    g_B^T H g_B is a second directional derivative of the full loss, computed for a stack of
    batches in one pass over the data (chunks of at most ``chunk_size`` rows).
    """
    start = time.perf_counter()
    net = _require(model, loss_fn, X, Y)
    n = X.shape[0]
    rows = _data_rows(n, chunk_size)

    with torch.no_grad():
        gradient = net.full_gradient(X, Y, rows)
        norm2 = _norm2(gradient)

        def compute(m):
            def block(k):
                idx = _draw(n, batch_size, k, generator, X.device)
                return net.quadratic_forms(X, Y, *_gather(X, Y, idx), chunk_rows=_chunk_rows(rows, k))
            return _in_blocks(block, m, _directions_per_pass(batch_size))

        ahead = _SamplesAhead(compute, rel_se=rel_se, max_samples=max_samples,
                              min_block=min_samples)
        numerator = mean_with_stopping(ahead, min_samples=min_samples, max_samples=max_samples,
                                       rel_se=rel_se)
    return Estimate(numerator.value / norm2, numerator.se / norm2, numerator.n, ahead.computed,
                    time.perf_counter() - start)


def _chunk_rows(data_rows: int, directions: int) -> int:
    """Data rows per chunk so that rows x directions stays within the row budget."""
    return max(1, min(data_rows, _ROW_BUDGET // directions))


def _norm2(gradient) -> float:
    return float(sum((w * w).sum() + (0 if c is None else (c * c).sum()) for w, c in gradient))


# --- GNI for every batch size ----------------------------------------------------------------


def noise_factor(n: int, b: int) -> float:
    """c_b = (n - b) / (b (n - 1)): Cov(g_B) = c_b S for b distinct points out of n."""
    return (n - b) / (b * (n - 1))


@dataclass
class NoiseDecomposition:
    """The batch-size dependence of GNI through the per-sample gradient covariance S.

    With g_i the gradient of sample i, S = (1/n) sum_i (g_i - g)(g_i - g)^T, and B uniform among
    the b-subsets (no replacement), E[g_B] = g and Cov(g_B) = c_b S, c_b = (n - b) / (b (n - 1)),
    hence exactly

        E_B[ g_B^T H g_B ] = g^T H g + c_b tr(H S),
        GNI(b)             = (g^T H g + c_b tr(H S)) / |g|^2.

    ``grad_norm2`` = |g|^2 and ``gHg`` = g^T H g are exact; ``trace_HS`` is a Monte Carlo
    estimate with standard error ``trace_HS_se`` from ``samples`` random batches of size
    ``sample_batch``, each giving the unbiased (g_B - g)^T H (g_B - g) / c_{sample_batch}.
    The identity needs g_B = (1/b) sum_{i in B} g_i, which train-mode BatchNorm breaks.
    """

    num_data: int
    sample_batch: int
    grad_norm2: float
    gHg: float
    trace_HS: float
    trace_HS_se: float
    samples: int
    hvps: int
    seconds: float

    def gni(self, batch_size: int) -> Estimate:
        """GNI at batch size b; its SE is c_b SE(tr(HS)) / |g|^2 (g^T H g and |g|^2 are exact)."""
        c = noise_factor(self.num_data, batch_size)
        value = (self.gHg + c * self.trace_HS) / self.grad_norm2
        return Estimate(value, c * self.trace_HS_se / self.grad_norm2, self.samples, self.hvps,
                        self.seconds)


def gni_decomposition(model, loss_fn, X, Y, *, generator, sample_batch: int,
                      target_batch: int | None = None, chunk_size=None, min_samples=20,
                      max_samples=MAX_SAMPLES, rel_se=GNI_REL_SE, train_mode=True,
                      exact=False) -> NoiseDecomposition:
    """Estimate tr(HS) once, giving GNI for every batch size (see :class:`NoiseDecomposition`).

    Random batches of ``sample_batch`` points (1 <= sample_batch < n) are drawn from
    ``generator`` until GNI at ``target_batch`` (default ``sample_batch``) has SE / |GNI| <
    ``rel_se`` (at least ``min_samples``, at most ``max_samples`` batches). Networks of Linear
    layers and element-wise activations use stacked Gram products, others exact Hessian-vector
    products on the whole data in the model's default mode (``exact``: plain double backward),
    chunked by ``chunk_size``.
    """
    start = time.perf_counter()
    n = X.shape[0]
    if not 1 <= sample_batch < n:
        raise ValueError(f"sample_batch must be in [1, n) = [1, {n}), got {sample_batch}")
    if train_mode and has_batchnorm(model):
        # Train-mode BatchNorm couples the samples of a batch: g_B is not a mean of g_i.
        raise ValueError("the identity needs per-sample gradients; with BatchNorm in train mode "
                         "measure GNI per batch size with utils.measures.gni")
    target_batch = sample_batch if target_batch is None else target_batch
    forms = _centred_forms(model, loss_fn, X, Y, chunk_size, train_mode, exact)
    c_sample, c_target = noise_factor(n, sample_batch), noise_factor(n, target_batch)

    def compute(m):
        idx = _draw(n, sample_batch, m, generator, X.device)
        return forms.centred(idx) / c_sample

    def gni_samples_of(trace_samples):
        return (forms.gHg + c_target * trace_samples) / forms.norm2

    ahead = _SamplesAhead(compute, rel_se=rel_se, max_samples=max_samples, min_block=min_samples,
                          rule_samples=lambda columns: [gni_samples_of(columns[0])])

    def gni_samples(m):
        return gni_samples_of(ahead(m))

    estimate = mean_with_stopping(gni_samples, min_samples=min_samples, max_samples=max_samples,
                                  rel_se=rel_se)
    used = ahead.columns[0][: estimate.n]
    return NoiseDecomposition(n, sample_batch, forms.norm2, forms.gHg, float(used.mean()),
                              float(used.std(ddof=1) / math.sqrt(len(used))), estimate.n,
                              ahead.computed + 1, time.perf_counter() - start)


def gni_by_batch_size(model, loss_fn, X, Y, batch_sizes, *, generator, chunk_size=None,
                      min_samples=20, max_samples=MAX_SAMPLES, rel_se=GNI_REL_SE, train_mode=True,
                      exact=False) -> dict[int, Estimate]:
    """GNI(b) for every b in ``batch_sizes`` from one estimate of tr(HS).

    The batches are drawn at the smallest b (or n - 1 when that is n) and the stopping rule
    runs on GNI at the smallest b, where the noise term c_b tr(HS) is largest. Every Estimate
    shares the sample count, HVP count and seconds of the one decomposition.
    """
    n = X.shape[0]
    smallest = min(batch_sizes)
    decomposition = gni_decomposition(
        model, loss_fn, X, Y, generator=generator, sample_batch=min(smallest, n - 1),
        target_batch=smallest, chunk_size=chunk_size, min_samples=min_samples,
        max_samples=max_samples, rel_se=rel_se, train_mode=train_mode, exact=exact)
    return {b: decomposition.gni(b) for b in batch_sizes}


class _FastCentredForms:
    """|g|^2, g^T H g and (g_B - g)^T H (g_B - g) for Linear/activation chains.

    (g_B - g)^T H (g_B - g) = g_B^T H g_B - 2 g_B^T (H g) + g^T H g: the first term by
    stacked batch directions, H g once by double backward and g_B^T (H g) by one product of
    the batch rows with it.
    """

    def __init__(self, net: LinearNetwork, model, loss_fn, X, Y, chunk_size):
        self.net, self.X, self.Y = net, X, Y
        self.rows = _data_rows(X.shape[0], chunk_size)
        op = HessianOperator(model, loss_fn, X, Y, chunk_size=chunk_size)
        g = op.gradient()
        hg = op.matvec(g)
        self.norm2, self.gHg = (g @ g).item(), (g @ hg).item()
        self.hg = net.split(hg)

    def centred(self, idx: torch.Tensor) -> torch.Tensor:
        def block(rows_idx):
            batch_X, batch_Y = self.X[rows_idx], self.Y[rows_idx]
            quadratic = self.net.quadratic_forms(self.X, self.Y, batch_X, batch_Y,
                                                 chunk_rows=_chunk_rows(self.rows, len(rows_idx)))
            return quadratic - 2 * self.net.batch_dot(batch_X, batch_Y, self.hg) + self.gHg

        step = _directions_per_pass(idx.shape[1])
        with torch.no_grad():
            return torch.cat([block(idx[i : i + step]) for i in range(0, idx.shape[0], step)])


class _ExactCentredForms:
    """The same quantities by full-batch Hessian-vector products (any model) in ``mode``
    (None: :func:`utils.hvp.default_hvp_mode`)."""

    def __init__(self, model, loss_fn, X, Y, chunk_size, train_mode, mode):
        self.model, self.loss_fn, self.X, self.Y = model, loss_fn, X, Y
        self.train_mode = train_mode
        self.op = HessianOperator(model, loss_fn, X, Y, chunk_size=chunk_size,
                                  train_mode=train_mode, mode=mode)
        self.g = self.op.gradient()
        self.norm2 = (self.g @ self.g).item()
        self.gHg = (self.g @ self.op.matvec(self.g)).item()

    def centred(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._block(idx[i : i + _EXACT_BLOCK])
                          for i in range(0, idx.shape[0], _EXACT_BLOCK)])

    def _block(self, idx: torch.Tensor) -> torch.Tensor:
        V = torch.stack([flat_grad(self.model, self.loss_fn, self.X[rows], self.Y[rows],
                                   train_mode=self.train_mode) - self.g for rows in idx], dim=1)
        return self.op.quadratic_forms(V)


def _centred_forms(model, loss_fn, X, Y, chunk_size, train_mode, exact):
    net = None if exact else linear_network(model, loss_fn, X, Y)
    if net is None:
        return _ExactCentredForms(model, loss_fn, X, Y, chunk_size, train_mode, PLAIN_HVP_MODE if exact else None)
    return _FastCentredForms(net, model, loss_fn, X, Y, chunk_size)
