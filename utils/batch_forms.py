"""Per-batch quadratic forms of the loss, by the fastest exact route for the model and device.

The Monte Carlo measurements of the gHg family (:mod:`utils.measures` draws the batches and runs
the stopping rule) need quadratic forms of batch gradients, and this module computes them:

    same-batch terms   (g_B^T H_B g_B, |g_B|^2)                    Batch Sharpness, its ratio
                                                                   form, step sharpness
    full-data forms    g_B^T H g_B, and |g|^2                      GNI
    centred forms      (g_B - g)^T H (g_B - g), g^T H g, |g|^2      tr(HS): GNI for every batch size

with g_B and H_B the gradient and Hessian of the mean loss on batch B, g and H those on all the
data. Every route gives the same numbers to round-off and draws nothing itself (the caller
passes the batches as index rows), so an estimate does not depend on the route.

Same-batch terms, by the route :func:`batch_route` names (recorded as ``batch_route`` in
``config.json``):

    stacked-gram          Linear/activation chains (:func:`utils.gram.linear_network`): stacked
                          Gram matrices, many batches per call; once the batches have asked for
                          n rows, every sample's activations and errors are computed once and
                          gathered from then on.
    vmap-taylor, taylor   on the CPU, models whose graph :mod:`utils.taylor` differentiates
                          (convolutions, Linear layers, BatchNorm, element-wise activations,
                          residual sums, pooling by averages: ``resnet``, ``resnet_bn``): one
                          forward and backward pass gives g_B and the errors at every node, one
                          forward pass along g_B the first Taylor coefficient and each node's own
                          second-order term, and g_B^T H_B g_B follows without a double backward,
                          about two gradients per batch. Vmapped over the batches of a call where
                          a batch is small (at most ``_CPU_VMAP_NUMBERS`` input numbers, b = 16 of
                          3x8x8 but not b = 8 of 3x32x32), where a single small batch is bound by
                          per-operation overhead; else a batch at a time. In train mode each
                          batch is normalised by its own statistics.
    vmap-double-backward  other models without dropout on a GPU, and on the CPU where a batch is
                          small: one double backward per batch, for all the batches of a call at
                          once under ``vmap``. BatchNorm runs there as plain tensor operations
                          (:func:`plain_batchnorm`), each batch normalised by its own statistics
                          in train mode.
                          A model vmap refuses (``.item()``, control flow on a tensor's value)
                          takes double-backward (or taylor) from its first call on, with a warning.
    r-operator            other layer chains (:func:`utils.r_operator.is_chain`, the ``cnn``
                          model) on the CPU: one primal pass per batch, and g_B^T H_B g_B as a
                          second directional derivative by forward differentiation.
    double-backward       everything else (dropout, attention on larger CPU inputs): one graph and
                          one double backward per batch.

Gauss–Newton terms (g_B^T G_B g_B, |g_B|^2) take the first Taylor coefficient J_B g_B on the CPU
wherever :mod:`utils.taylor` differentiates the model (Linear networks too); otherwise
:func:`gauss_newton_forms`, vmapped where the same-batch terms are, else one batch at a time.

Full-data and centred forms: Linear/activation chains carry many batch directions through one
pass over the data with the Gram engine; other models take Hessian-vector products on the whole
data from :class:`utils.hvp.HessianOperator` in its default mode.

``exact`` (``--exact-measurements``) is the plain route throughout: double backward per batch,
and plain double-backward Hessian products on the whole data.

The routes and the choice between them stay in one module (about 550 lines), so that the rules
above and the code that follows them are read, and tested against each other, in one place.
"""

import types
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from utils.gram import ROW_BUDGET, LinearNetwork, linear_network, squared_norm
from utils.hvp import (PLAIN_HVP_MODE, HessianOperator, flat_grad, forward_in_current_mode, model_mode, num_params,
                       params_and_data, quadratic_form_of_gradient, trainable_params)
from utils.models import BATCHNORMS, has_batchnorm
from utils.r_operator import ChainCurvature, is_chain
from utils.resources import is_out_of_memory, keep_freed_memory
from utils.taylor import plain_batchnorm_parts, taylor_program, taylor_quadratic_forms

# Samples computed ahead of the stopping rule by the Gram route: at least this many rows per stacked pass.
_MIN_ROWS_AHEAD = 256
# Numbers of per-sample quantities (beyond the inputs) kept to reuse across batches.
_CACHE_NUMBERS = 1 << 26
# Batches whose double-backward terms one call computes (setup shared, one read-back).
_GRAPHS_PER_CALL = 64
# Parameter-sized numbers per vmapped call (about 3 per batch are live at once): bounds its memory.
_VMAP_NUMBERS = 1 << 27
# Activation numbers a vmapped call may keep, and how many it keeps per input number: for the
# project's CNN on 32x32 inputs a call peaked at 2.8 GiB for 54 batches of 8, about 240 per
# input number beyond the parameter-sized vectors.
_VMAP_ACTIVATION_NUMBERS = 1 << 28
_ACTIVATIONS_PER_INPUT = 250
# Batches computed ahead of the stopping rule on the vmapped route.
_VMAP_MIN_AHEAD = 8
# Input numbers of one batch up to which the CPU takes a vmapped route: below it a batch is bound
# by per-operation overhead (ResNet-20 with BatchNorm, b = 16 of 3x8x8 = 3072 numbers: 2-3x
# faster vmapped, 32 batches a call), above it by arithmetic (b = 8 of 3x32x32: 0.85-1.3x),
# where a batch at a time keeps the smaller memory.
_CPU_VMAP_NUMBERS = 4096
# Batches per vmapped call on the CPU: more only grow the tensors past the caches.
_CPU_VMAP_PER_CALL = 32
# Batch gradients held at once by the Hessian-operator route of the centred forms.
_OPERATOR_BLOCK = 10
# Models whose forward torch.func.vmap refused (``.item()``, control flow on a tensor's value,
# in-place writes of batched values): found at their first vmapped call, then taken a batch at a
# time for the rest of the process.
_VMAP_REFUSED = weakref.WeakSet()

@dataclass
class Route:
    """How per-batch forms are computed: ``forms(idx)`` maps index rows (K, b) to the forms of
    those K batches; at most ``per_call`` batches go into one call, and at least ``min_block``
    samples are computed at once, ahead of the stopping rule when ``ahead``
    (:class:`utils.estimators.SamplesAhead`)."""

    forms: Callable
    per_call: int
    min_block: int
    ahead: bool


@dataclass
class NoiseRoute(Route):
    """A :class:`Route` of full-data forms g_B^T H g_B, with ``norm2()`` = |g|^2 (asked for after
    the forms: the Hessian-operator route gets g from the passes the forms already made)."""

    norm2: Callable[[], float]


# --- same-batch terms (g_B^T H_B g_B, |g_B|^2) -------------------------------------------------


def batch_route(model, loss_fn, X, Y, *, device=None, exact: bool = False, batch_size: int | None = None) -> str:
    """The name of the route of the same-batch terms (see the module docstring); ``device``
    defaults to the parameters' device; on the CPU the vmapped route needs ``batch_size``."""
    if exact:
        return "double-backward"
    if linear_network(model, loss_fn, X, Y) is not None:
        return "stacked-gram"
    params = trainable_params(model)
    device = torch.device(device) if device is not None else params[0].device
    if has_dropout(model):
        return "double-backward"
    if device.type == "cuda":
        return "double-backward" if model in _VMAP_REFUSED else "vmap-double-backward"
    if is_chain(model):
        return "r-operator"
    return _cpu_taylor_route(model, X, batch_size) or (
        "vmap-double-backward" if _small_on_the_cpu(X, batch_size) and model not in _VMAP_REFUSED
        else "double-backward")


def _small_on_the_cpu(X, batch_size) -> bool:
    return batch_size is not None and batch_size * X[0].numel() <= _CPU_VMAP_NUMBERS


def _cpu_taylor_route(model, X, batch_size) -> str | None:
    """``vmap-taylor`` or ``taylor`` (a batch at a time: large batches, or a model vmap refused)
    for a model on the CPU without dropout that has a :func:`utils.taylor.taylor_program`, else None."""
    if trainable_params(model)[0].device.type != "cpu" or has_dropout(model) or taylor_program(model) is None:
        return None
    return "vmap-taylor" if _small_on_the_cpu(X, batch_size) and model not in _VMAP_REFUSED else "taylor"


def has_dropout(model) -> bool:
    """Random layers draw one mask per call, which vmap refuses (and the loop would not share)."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules())


def _keep_freed_memory_on_the_cpu(model) -> None:
    """Each call of a route allocates and frees its working set anew; on the CPU glibc would hand
    it back to the system and fault it in again at the next (:func:`utils.resources.keep_freed_memory`)."""
    if trainable_params(model)[0].device.type == "cpu":
        keep_freed_memory()


def same_batch_route(model, loss_fn, X, Y, batch_size, *, train_mode=True, exact=False) -> Route:
    """The route of :func:`batch_route` for batches of ``batch_size`` rows of (X, Y): ``forms(idx)``
    returns the pair (g_B^T H_B g_B, |g_B|^2), each (K,)."""
    _keep_freed_memory_on_the_cpu(model)
    route = batch_route(model, loss_fn, X, Y, exact=exact, batch_size=batch_size)
    if route == "stacked-gram":
        return Route(_StackedTerms(linear_network(model, loss_fn, X, Y), X, Y),
                     per_call=max(1, ROW_BUDGET // (4 * batch_size)),
                     min_block=max(1, _MIN_ROWS_AHEAD // batch_size), ahead=True)
    def double_backward_terms(idx):
        return batch_quadratic_forms(model, loss_fn, X, Y, idx, train_mode=train_mode)

    if route == "vmap-double-backward":
        def vmapped_terms(idx):
            return vmapped_quadratic_forms(model, loss_fn, X, Y, idx, train_mode=train_mode)
        return _vmapped_route(_vmap_or_loop(model, vmapped_terms, double_backward_terms), model, X, batch_size)

    if route == "r-operator":
        def chain_terms(idx):
            return chain_quadratic_forms(model, loss_fn, X, Y, idx)
        return Route(chain_terms, per_call=_GRAPHS_PER_CALL, min_block=1, ahead=False)

    if route in ("taylor", "vmap-taylor"):
        return _taylor_route(model, loss_fn, X, Y, batch_size, route, train_mode=train_mode, gauss_newton=False)

    # Each batch's graph is freed before the next is built, so a call may take many batches.
    return Route(double_backward_terms, per_call=_GRAPHS_PER_CALL, min_block=1, ahead=False)


class _StackedTerms:
    """Same-batch terms of a Linear/activation chain by stacked Gram matrices.

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


def _taylor_route(model, loss_fn, X, Y, batch_size, route, *, train_mode, gauss_newton) -> Route:
    """The route of :func:`utils.taylor.taylor_quadratic_forms`: vmapped (``vmap-taylor``) or a
    batch at a time (``taylor``)."""
    def forms(idx, vectorised):
        return taylor_quadratic_forms(model, loss_fn, X, Y, idx, train_mode=train_mode, vectorised=vectorised,
                                      gauss_newton=gauss_newton)

    if route == "taylor":
        return Route(lambda idx: forms(idx, False), per_call=_GRAPHS_PER_CALL, min_block=1, ahead=False)
    return _vmapped_route(_vmap_or_loop(model, lambda idx: forms(idx, True), lambda idx: forms(idx, False)),
                          model, X, batch_size)


def _vmap_or_loop(model, vmapped: Callable, loop: Callable) -> Callable:
    """``vmapped`` forms until ``model`` is found to be one vmap refuses (its first failing call,
    then recorded in ``_VMAP_REFUSED``); from then on the same forms by ``loop``, a batch at a
    time. A user's model may branch on a tensor's value or call ``.item()``: its measurement is
    then slower, never wrong or failed (an error of the model itself comes back from the loop)."""
    def forms(*args):
        if model not in _VMAP_REFUSED:
            try:
                return vmapped(*args)
            except Exception as error:  # noqa: BLE001 - any refusal; the loop re-raises a real error
                if is_out_of_memory(error):
                    raise  # too many batches per call, not a refusal: the callers' memory handling answers it
                _VMAP_REFUSED.add(model)
                reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                warnings.warn(f"{type(model).__name__} cannot run under torch.func.vmap ({reason[:160]}); "
                              "its batches are measured one at a time", stacklevel=2)
        return loop(*args)
    return forms


def _vmapped_route(forms, model, X, batch_size) -> Route:
    """A :class:`Route` of vmapped ``forms``, as many batches per call as memory allows."""
    cap = _GRAPHS_PER_CALL if trainable_params(model)[0].device.type == "cuda" else _CPU_VMAP_PER_CALL
    per_call = max(1, min(cap, _VMAP_NUMBERS // num_params(model),
                          _VMAP_ACTIVATION_NUMBERS // (batch_size * X[0].numel() * _ACTIVATIONS_PER_INPUT)))
    return Route(forms, per_call=per_call, min_block=min(per_call, _VMAP_MIN_AHEAD), ahead=True)


def _plain_batchnorm_forward(norm, x):
    return plain_batchnorm_parts(norm, x, norm.weight, norm.bias)[0]


@contextmanager
def plain_batchnorm(model):
    """Every BatchNorm layer of ``model`` computed by plain tensor operations while inside
    (:func:`utils.taylor.plain_batchnorm_parts`). Under ``vmap`` over batches each batch keeps its own
    statistics. Same values as BatchNorm to round-off."""
    norms = [m for m in model.modules() if isinstance(m, BATCHNORMS)]
    for norm in norms:
        norm.forward = types.MethodType(_plain_batchnorm_forward, norm)
    try:
        yield
    finally:
        for norm in norms:
            del norm.forward


def batch_quadratic_forms(model, loss_fn, X, Y, idx: torch.Tensor, *, train_mode=True) -> tuple:
    """(g_B^T H_B g_B, |g_B|^2) for every batch B given as a row of ``idx`` (K, b), each (K,).

    g_B and H_B are the gradient and Hessian of the mean loss on (X[B], Y[B]); each batch takes
    one graph and one double backward, as :meth:`utils.hvp.HessianOperator.gradient_quadratic_form` does,
    with the parameters, the data conversion and the train/eval switch set up once for all K
    batches. Nothing is read back to the host, so the device can run ahead.
    """
    params, X, Y = params_and_data(model, X, Y)
    quadratics, norms = [], []
    with model_mode(model, train_mode):
        for rows in idx:
            loss = loss_fn(forward_in_current_mode(model, X[rows]), Y[rows])
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True,
                                        materialize_grads=True)
            quadratic, norm2 = quadratic_form_of_gradient(grads, params, retain_graph=False)
            quadratics.append(quadratic)
            norms.append(norm2)
    return torch.stack(quadratics).detach(), torch.stack(norms).detach()


def chain_quadratic_forms(model, loss_fn, X, Y, idx: torch.Tensor) -> tuple:
    """The same (g_B^T H_B g_B, |g_B|^2) as :func:`batch_quadratic_forms`, for layer chains
    (:func:`utils.r_operator.is_chain`): per batch one primal pass gives g_B, and g_B^T H_B g_B
    is its second directional derivative by forward differentiation, with no double backward.
    Chains have no mode-dependent layers, so there is no train/eval switch."""
    params, X, Y = params_and_data(model, X, Y)
    quadratics, norms = [], []
    for rows in idx:
        chain = ChainCurvature(model, loss_fn, X[rows], Y[rows])
        gradient = chain.gradient()
        quadratics.append(chain.quadratic_form(gradient))
        norms.append(sum((g * g).sum() for g in gradient))
    return torch.stack(quadratics).detach(), torch.stack(norms).detach()


def vmapped_quadratic_forms(model, loss_fn, X, Y, idx: torch.Tensor, *, train_mode=True) -> tuple:
    """The same (g_B^T H_B g_B, |g_B|^2) as :func:`batch_quadratic_forms`, all K batches at once.

    One ``torch.func.vmap`` over the batches of reverse-over-reverse differentiation: ``vjp``
    of ``grad L_B`` at theta returns g_B together with the map u -> H_B u, which is applied to
    g_B itself. Each batch kernel then runs once for all K batches, which pays where a single
    small batch is bound by per-operation overhead. BatchNorm runs as :func:`plain_batchnorm`,
    so in train mode each batch is normalised by its own statistics. Memory: a few
    parameter-sized vectors per batch.
    """
    names, primals, batch_loss, X, Y = _functional_batch_loss(model, loss_fn, X, Y)

    def batch_terms(xb, yb):
        gradient, hessian_times = vjp(grad(lambda v: batch_loss(v, xb, yb)), primals)
        (product,) = hessian_times(gradient)
        quadratic = sum((gradient[name] * product[name]).sum() for name in names)
        norm2 = sum((gradient[name] * gradient[name]).sum() for name in names)
        return quadratic, norm2

    with model_mode(model, train_mode), plain_batchnorm(model):
        quadratic, norm2 = vmap(batch_terms)(X[idx], Y[idx])
    return quadratic.detach(), norm2.detach()


def _functional_batch_loss(model, loss_fn, X, Y):
    """(trainable names, their values, (values, xb, yb) -> the model's outputs and mean loss on
    the batch, X, Y in the parameters' dtype) for torch.func."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    params, X, Y = params_and_data(model, X, Y)
    primals = {name: p.detach() for name, p in zip(names, params)}
    frozen = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())

    def outputs(values, xb):
        return functional_call(model, (values, frozen, buffers), (xb,))

    def batch_loss(values, xb, yb):
        return loss_fn(outputs(values, xb), yb)

    batch_loss.outputs = outputs
    return names, primals, batch_loss, X, Y


def gauss_newton_forms(model, loss_fn, X, Y, idx: torch.Tensor, *, train_mode=True, vectorised=True) -> tuple:
    """(g_B^T G_B g_B, |g_B|^2) for every batch B given as a row of ``idx`` (K, b), each (K,).

    G_B = J_B^T M_B J_B is the batch's Gauss–Newton matrix (:mod:`utils.gauss_newton`), J_B the
    Jacobian of the batch's outputs (in train-mode BatchNorm each depends on the whole batch) and
    M_B the Hessian of the mean loss in output space, so

        g_B^T G_B g_B = (J_B g_B)^T M_B (J_B g_B):

    g_B by reverse mode, J_B g_B by one forward-mode pass along it, and M_B (J_B g_B) by a
    forward-mode pass over the loss's output gradient. No second-order pass through the
    network. ``vectorised``: all K batches in one ``vmap`` call, else one at a time; BatchNorm
    runs as :func:`plain_batchnorm` either way.
    """
    names, primals, batch_loss, X, Y = _functional_batch_loss(model, loss_fn, X, Y)

    def batch_terms(xb, yb):
        gradient = grad(lambda v: batch_loss(v, xb, yb))(primals)
        outputs, along = jvp(lambda v: batch_loss.outputs(v, xb), (primals,), (gradient,))
        _, curvature = jvp(grad(lambda f: loss_fn(f, yb)), (outputs,), (along,))
        norm2 = sum((gradient[name] * gradient[name]).sum() for name in names)
        return (along * curvature).sum(), norm2

    with model_mode(model, train_mode), plain_batchnorm(model):
        if vectorised:
            quadratic, norm2 = vmap(batch_terms)(X[idx], Y[idx])
        else:
            quadratic, norm2 = (torch.stack(t) for t in zip(*(batch_terms(X[rows], Y[rows]) for rows in idx)))
    return quadratic.detach(), norm2.detach()


def gauss_newton_route(model, loss_fn, X, Y, batch_size, *, train_mode=True) -> Route:
    """The route of the Gauss–Newton terms: by the first Taylor coefficient on the CPU wherever
    :mod:`utils.taylor` differentiates the model (Linear networks included), else vmapped where
    the same-batch terms are, else a batch at a time (:func:`gauss_newton_forms`)."""
    _keep_freed_memory_on_the_cpu(model)

    def one_at_a_time(idx):
        return gauss_newton_forms(model, loss_fn, X, Y, idx, train_mode=train_mode, vectorised=False)

    taylor = _cpu_taylor_route(model, X, batch_size)
    if taylor is not None:
        return _taylor_route(model, loss_fn, X, Y, batch_size, taylor, train_mode=train_mode, gauss_newton=True)
    if batch_route(model, loss_fn, X, Y, batch_size=batch_size) == "vmap-double-backward":
        def vmapped_terms(idx):
            return gauss_newton_forms(model, loss_fn, X, Y, idx, train_mode=train_mode)
        return _vmapped_route(_vmap_or_loop(model, vmapped_terms, one_at_a_time), model, X, batch_size)

    return Route(one_at_a_time, per_call=_GRAPHS_PER_CALL, min_block=1, ahead=False)


# --- full-data forms g_B^T H g_B and centred forms -----------------------------------------------


def _data_rows(n: int, chunk_size: int | None) -> int:
    return n if chunk_size is None else max(1, min(n, chunk_size))


def _directions_per_pass(batch_size: int) -> int:
    return max(1, min(256, ROW_BUDGET // (4 * batch_size)))


class _GramDirections:
    """g_B^T H g_B of a Linear/activation chain for a stack of batch directions, in one pass over
    the data (chunks of at most ``chunk_size`` rows, fewer when many directions share a pass)."""

    def __init__(self, net: LinearNetwork, X, Y, chunk_size):
        self.net, self.X, self.Y = net, X, Y
        self.rows = _data_rows(X.shape[0], chunk_size)

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            # Many directions share a pass: fewer data rows per chunk keep rows x directions in budget.
            chunk_rows = max(1, min(self.rows, ROW_BUDGET // idx.shape[0]))
            return self.net.quadratic_forms(self.X, self.Y, self.X[idx], self.Y[idx], chunk_rows=chunk_rows)


def per_sample_gradients(model, loss_fn, X, Y, *, train_mode=True):
    """The per-sample gradients g_i = grad l_i of every row of (X, Y), as blocks (c, P) in order.

    One ``torch.func.vmap`` of ``grad`` over the rows of a block, c rows at a time so a block
    holds at most ``_VMAP_NUMBERS`` numbers (one row at a time for a model vmap refuses). Only
    where g_i is defined: not under train-mode BatchNorm (a batch of one has no statistics to
    normalise by)."""
    if train_mode and has_batchnorm(model):
        raise ValueError("per-sample gradients are not defined under train-mode BatchNorm")
    names, primals, batch_loss, X, Y = _functional_batch_loss(model, loss_fn, X, Y)

    def sample_gradient(x, y):
        gradient = grad(lambda v: batch_loss(v, x[None], y[None]))(primals)
        return torch.cat([gradient[name].reshape(-1) for name in names])

    def one_at_a_time(xs, ys):
        return torch.stack([sample_gradient(x, y) for x, y in zip(xs, ys)])

    block_gradients = _vmap_or_loop(model, vmap(sample_gradient), one_at_a_time)
    rows = max(1, _VMAP_NUMBERS // num_params(model))
    with model_mode(model, train_mode):
        for start in range(0, X.shape[0], rows):
            yield block_gradients(X[start:start + rows], Y[start:start + rows]).detach()


def _batch_gradients(model, loss_fn, X, Y, idx, train_mode) -> torch.Tensor:
    """The batch gradients g_B of the index rows ``idx`` (K, b) as the columns of a (P, K) block."""
    return torch.stack([flat_grad(model, loss_fn, X[rows], Y[rows], train_mode=train_mode) for rows in idx], dim=1)


def noise_route(model, loss_fn, X, Y, batch_size, *, chunk_size=None, train_mode=True, exact=False,
                min_samples: int, max_samples: int, block_size: int) -> NoiseRoute:
    """The route of the full-data forms g_B^T H g_B (H and g on all of (X, Y), chunked by
    ``chunk_size``) for batches of ``batch_size``: the Gram engine, many directions per pass and
    at least ``min_samples`` ahead, for Linear/activation chains; otherwise ``block_size``
    batch gradients at a time through :class:`utils.hvp.HessianOperator`."""
    _keep_freed_memory_on_the_cpu(model)
    net = None if exact else linear_network(model, loss_fn, X, Y)
    if net is not None:
        with torch.no_grad():
            norm2 = squared_norm(net.full_gradient(X, Y, _data_rows(X.shape[0], chunk_size)))
        return NoiseRoute(_GramDirections(net, X, Y, chunk_size), per_call=_directions_per_pass(batch_size),
                          min_block=min_samples, ahead=True, norm2=lambda: norm2)
    op = HessianOperator(model, loss_fn, X, Y, chunk_size=chunk_size, train_mode=train_mode,
                         mode=PLAIN_HVP_MODE if exact else None)

    def forms(idx):
        return op.quadratic_forms(_batch_gradients(model, loss_fn, X, Y, idx, train_mode))

    def norm2():
        g = op.gradient()
        return (g @ g).item()

    # The operator groups the vectors itself: every block the rule asks for is one call.
    return NoiseRoute(forms, per_call=max_samples, min_block=block_size, ahead=False, norm2=norm2)


class _GramCentredForms:
    """|g|^2, g^T H g and (g_B - g)^T H (g_B - g) for Linear/activation chains.

    (g_B - g)^T H (g_B - g) = g_B^T H g_B - 2 g_B^T (H g) + g^T H g: the first term by stacked
    batch directions, H g once by double backward and g_B^T (H g) by one product of the batch
    rows with it.
    """

    def __init__(self, net: LinearNetwork, model, loss_fn, X, Y, chunk_size):
        self.net, self.X, self.Y = net, X, Y
        self.directions = _GramDirections(net, X, Y, chunk_size)
        op = HessianOperator(model, loss_fn, X, Y, chunk_size=chunk_size)
        g = op.gradient()
        hg = op.matvec(g)
        self.norm2, self.gHg = (g @ g).item(), (g @ hg).item()
        self.hg = net.split(hg)

    def centred(self, idx: torch.Tensor) -> torch.Tensor:
        def block(rows_idx):
            cross = self.net.batch_dot(self.X[rows_idx], self.Y[rows_idx], self.hg)
            return self.directions(rows_idx) - 2 * cross + self.gHg

        step = _directions_per_pass(idx.shape[1])
        with torch.no_grad():
            return torch.cat([block(idx[i : i + step]) for i in range(0, idx.shape[0], step)])


class OperatorCentredForms:
    """The same quantities by Hessian-vector products on the whole data (any model): ``op`` a
    Hessian operator (:class:`utils.hvp.HessianOperator`, or its sum over the ranks of a launch,
    :class:`utils.sharded.ShardedOperator`) and ``batch_gradients(idx)`` the gradients of the
    batches of the index rows ``idx`` (K, b) as the columns of a (P, K) block."""

    def __init__(self, op, batch_gradients: Callable):
        self.op, self.batch_gradients = op, batch_gradients
        self.g = op.gradient()
        self.norm2 = (self.g @ self.g).item()
        self.gHg = (self.g @ op.matvec(self.g)).item()

    def centred(self, idx: torch.Tensor) -> torch.Tensor:
        def block(rows_idx):
            return self.op.quadratic_forms(self.batch_gradients(rows_idx) - self.g[:, None])

        return torch.cat([block(idx[i : i + _OPERATOR_BLOCK]) for i in range(0, idx.shape[0], _OPERATOR_BLOCK)])


def centred_forms(model, loss_fn, X, Y, *, chunk_size=None, train_mode=True, exact=False):
    """An object with ``norm2`` = |g|^2, ``gHg`` = g^T H g (floats, H and g on all of (X, Y))
    and ``centred(idx)``: (g_B - g)^T H (g_B - g) for the batches of the index rows ``idx``
    (K, b), shape (K,). The Gram engine for Linear/activation chains, else (and for ``exact``)
    Hessian-vector products of the centred batch gradients."""
    net = None if exact else linear_network(model, loss_fn, X, Y)
    if net is None:
        op = HessianOperator(model, loss_fn, X, Y, chunk_size=chunk_size, train_mode=train_mode,
                             mode=PLAIN_HVP_MODE if exact else None)
        return OperatorCentredForms(op, lambda idx: _batch_gradients(model, loss_fn, X, Y, idx, train_mode))
    return _GramCentredForms(net, model, loss_fn, X, Y, chunk_size)
