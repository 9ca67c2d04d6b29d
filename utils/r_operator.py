"""Hessian-vector products of layer chains by Pearlmutter's R-operator, primal pass cached.

Applies to ``nn.Sequential`` chains of Conv2d (zero padding), Linear, element-wise activations
with known derivatives (:mod:`utils.activations`), MaxPool2d and Flatten, every parameter
trainable and no buffers: the ``cnn``, ``mlp`` and ``linear`` models (:func:`is_chain`).

Write z_l = W_l * h_{l-1} + c_l for the l-th layer with parameters (``*`` its linear map:
convolution or matrix product, ``^T`` its adjoint, ``(x)`` the pairing that gives its weight
gradient), h_0 for the data, f for the output and L = loss_fn(f, Y). For a direction
V = (V_l, c_l) let R{.} = d/dt at theta + t V. One primal pass at theta stores each layer's input
h_{l-1}, the activations' derivatives at their inputs z and the pooling indices, and one backward
pass stores delta_l = dL/dz_l (and e = dL/dh after activations with act'' != 0). Then

    R z_l = V_l * h_{l-1} + c_l + W_l * R h_{l-1}         (R h_0 = 0: the data do not move)
    R h   = act'(z) R z after an activation, R h at the same argmax after max pooling
    R (dL/df) = (d^2 L / df^2) R f                         (torch.func on the loss alone)
    R (dL/dh_{l-1}) = V_l^T delta_l + W_l^T R delta_l
    R (dL/dz) = act'(z) R (dL/dh) + act''(z) R z e        before an activation
    (H V)_{W_l} = R delta_l (x) h_{l-1} + delta_l (x) R h_{l-1},     (H V)_{c_l} = sum R delta_l

so each product pays only the tangent half of a forward-over-reverse product: the primal forward
and backward are paid once per operator, and the first layer, whose input is data, skips half of
its terms. The same cache gives grad L (delta_l (x) h_{l-1}) without another pass.
"""

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, jvp, vmap

from utils.activations import activate, activation_name


def quiet_jvp(fn, primals, tangents):
    """``torch.func.jvp``, without the FutureWarning about ``torch.jit.script`` that torch's own
    forward-mode decompositions raise when the first one in a process loads them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
        return jvp(fn, primals, tangents)


def is_chain(model: nn.Module) -> bool:
    """Whether ``model`` is a chain this module differentiates (see the module docstring)."""
    if not isinstance(model, nn.Sequential) or any(True for _ in model.buffers()):
        return False
    if not all(p.requires_grad for p in model.parameters()):
        return False
    # Every parameter belongs to one layer, in order (none of the container's own, none shared).
    if [id(p) for p in model.parameters()] != [id(p) for m in model for p in m.parameters()]:
        return False
    parametrised = 0
    for module in model:
        if type(module) is nn.Conv2d:
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                return False
            parametrised += 1
        elif type(module) is nn.Linear:
            parametrised += 1
        elif type(module) not in (nn.MaxPool2d, nn.Flatten) and activation_name(module) is None:
            return False
    return parametrised > 0


class _Layer:
    """A Conv2d or Linear layer with its input h and its error delta = dL/dz at theta."""

    def __init__(self, module, inputs, first: bool):
        self.module, self.inputs, self.first = module, inputs, first
        # A copy: the cache is a snapshot at theta even if the parameters change in place later.
        self.weight = module.weight.detach().clone()
        self.has_bias = module.bias is not None
        self.delta = None

    def apply(self, h, weight, bias):
        m = self.module
        if isinstance(m, nn.Linear):
            return F.linear(h, weight, bias)
        return F.conv2d(h, weight, bias, m.stride, m.padding, m.dilation, m.groups)

    def adjoint(self, weight, error):
        """weight^T error: the error at the layer's input."""
        m = self.module
        if isinstance(m, nn.Linear):
            return error @ weight
        return torch.nn.grad.conv2d_input(self.inputs.shape, weight, error, m.stride, m.padding,
                                          m.dilation, m.groups)

    def weight_pairing(self, error, inputs):
        """error (x) inputs: the weight gradient that ``error`` at the output and ``inputs`` give."""
        m = self.module
        if isinstance(m, nn.Linear):
            return error.reshape(-1, error.shape[-1]).T @ inputs.reshape(-1, inputs.shape[-1])
        return torch.nn.grad.conv2d_weight(inputs, self.weight.shape, error, m.stride, m.padding,
                                           m.dilation, m.groups)

    def bias_sum(self, error):
        if isinstance(self.module, nn.Linear):
            return error.reshape(-1, error.shape[-1]).sum(0)
        return error.sum(dim=(0, 2, 3))


class _Activation:
    def __init__(self, d1, d2):
        self.d1, self.d2 = d1, d2
        self.after = None  # e = dL/dh, kept only where act'' != 0


class _MaxPool:
    def __init__(self, indices, input_shape):
        self.indices, self.input_shape = indices, input_shape

    def forward(self, h):
        return h.flatten(-2).gather(-1, self.indices.flatten(-2)).view(self.indices.shape)

    def backward(self, error):
        *leading, rows, cols = self.input_shape
        zeros = torch.zeros(*leading, rows * cols, dtype=error.dtype, device=error.device)
        return zeros.scatter_add(-1, self.indices.flatten(-2), error.flatten(-2)).view(self.input_shape)


class _Reshape:
    def __init__(self, module, input_shape):
        self.module, self.input_shape = module, input_shape


class ChainCurvature:
    """The Hessian of L = loss_fn(model(X), Y) for a chain (:func:`is_chain`), primal cached.

    ``product(tangents)`` takes V as tensors shaped like the parameters (in
    ``model.parameters()`` order) and returns H V the same way; it is made of ``torch.func``-
    compatible operations, so ``vmap`` carries blocks of vectors through it (:meth:`products`).
    """

    def __init__(self, model: nn.Sequential, loss_fn, X: torch.Tensor, Y: torch.Tensor):
        if not is_chain(model):
            raise ValueError("the R-operator takes nn.Sequential chains of Conv2d, Linear, activations, "
                             "MaxPool2d and Flatten with every parameter trainable")
        self.loss_fn, self.Y = loss_fn, Y
        self.steps, wanted, owners = [], [], []  # tensors whose dL/d. is kept, and who keeps it
        with torch.enable_grad():
            h = X
            for module in model:
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    layer = _Layer(module, h.detach(), first=not any(isinstance(s, _Layer) for s in self.steps))
                    bias = None if module.bias is None else module.bias.detach()
                    h = layer.apply(h, layer.weight, bias)
                    if not h.requires_grad:  # the first layer: its output is where theta enters
                        h.requires_grad_(True)
                    self.steps.append(layer)
                    wanted.append(h)
                    owners.append((layer, "delta"))
                elif isinstance(module, nn.MaxPool2d):
                    shape = h.shape
                    h, indices = F.max_pool2d(h, module.kernel_size, module.stride, module.padding,
                                              module.dilation, ceil_mode=module.ceil_mode, return_indices=True)
                    self.steps.append(_MaxPool(indices, shape))
                elif isinstance(module, nn.Flatten):
                    self.steps.append(_Reshape(module, h.shape))
                    h = module(h)
                else:
                    with torch.no_grad():
                        _, d1, d2 = activate(activation_name(module), h)
                    step = _Activation(d1, d2)
                    # Out of place: an in-place activation would overwrite z, whose dL/dz is kept.
                    h = module(h.clone()) if getattr(module, "inplace", False) else module(h)
                    self.steps.append(step)
                    if d2 is not None and h.requires_grad:
                        wanted.append(h)
                        owners.append((step, "after"))
            self.output = h.detach()
            wanted.append(h)
            owners.append((self, "output_error"))
            loss = loss_fn(h, Y)
            errors = torch.autograd.grad(loss, wanted)
        for (step, name), error in zip(owners, errors):
            setattr(step, name, error)

    def _layers(self):
        return [step for step in self.steps if isinstance(step, _Layer)]

    def gradient(self) -> list[torch.Tensor]:
        """grad L per parameter, from the cached errors and inputs."""
        pieces = []
        for layer in self._layers():
            pieces.append(layer.weight_pairing(layer.delta, layer.inputs))
            if layer.has_bias:
                pieces.append(layer.bias_sum(layer.delta))
        return pieces

    def _output_curvature(self, tangent):
        """(d^2 L / df^2) tangent at the cached output."""
        return quiet_jvp(grad(lambda f: self.loss_fn(f, self.Y)), (self.output,), (tangent,))[1]

    def product(self, tangents: list[torch.Tensor]) -> list[torch.Tensor]:
        """H V, for V and the result given per parameter."""
        directions, remaining = [], iter(tangents)
        for layer in self._layers():
            directions.append((next(remaining), next(remaining) if layer.has_bias else None))
        moving, inputs_moving, zs = None, [], []  # R h (None while it is zero)
        for step, direction in _with_directions(self.steps, directions):
            if isinstance(step, _Layer):
                inputs_moving.append(moving)
                z_dot = step.apply(step.inputs, *direction)
                moving = z_dot if moving is None else z_dot + step.apply(moving, step.weight, None)
            elif moving is None:
                continue
            elif isinstance(step, _Activation):
                zs.append(moving)
                moving = step.d1 * moving
            elif isinstance(step, _MaxPool):
                moving = step.forward(moving)
            else:
                moving = step.module(moving)
        error_dot = self._output_curvature(moving)
        products = []
        for step, direction in reversed(list(_with_directions(self.steps, directions))):
            if isinstance(step, _Layer):
                moved_inputs = inputs_moving.pop()
                weight = step.weight_pairing(error_dot, step.inputs)
                if moved_inputs is not None:
                    weight = weight + step.weight_pairing(step.delta, moved_inputs)
                products[:0] = [weight, step.bias_sum(error_dot)] if step.has_bias else [weight]
                if step.first:
                    break
                error_dot = step.adjoint(direction[0], step.delta) + step.adjoint(step.weight, error_dot)
            elif isinstance(step, _Activation):
                z_dot = zs.pop()
                error_dot = step.d1 * error_dot
                if step.d2 is not None:
                    error_dot = error_dot + step.d2 * z_dot * step.after
            elif isinstance(step, _MaxPool):
                error_dot = step.backward(error_dot)
            else:
                error_dot = error_dot.reshape(step.input_shape)
        return products

    def quadratic_form(self, tangents: list[torch.Tensor]) -> torch.Tensor:
        """V^T H V = d^2/dt^2 L(theta + t V), by second-order forward differentiation alone.

        With dots for d/dt: zdot_l = V_l * h + c_l + W_l * hdot, zddot_l = 2 V_l * hdot + W_l * hddot,
        hdot = act' zdot, hddot = act' zddot + act'' zdot^2 (pooling and Flatten act on both), and
        V^T H V = fdot^T (d^2 L / df^2) fdot + (dL/df) . fddot. Per layer four applications of a
        linear map (one on the first layer) instead of the six of :meth:`product`.
        """
        first, second = None, None  # hdot, hddot (None while zero)
        remaining = iter(tangents)
        for step in self.steps:
            if isinstance(step, _Layer):
                weight_dot = next(remaining)
                bias_dot = next(remaining) if step.has_bias else None
                z_dot = step.apply(step.inputs, weight_dot, bias_dot)
                z_ddot = None
                if first is not None:
                    z_dot = z_dot + step.apply(first, step.weight, None)
                    z_ddot = 2 * step.apply(first, weight_dot, None)
                if second is not None:
                    z_ddot = z_ddot + step.apply(second, step.weight, None)
                first, second = z_dot, z_ddot
            elif first is None:
                continue
            elif isinstance(step, _Activation):
                new_second = None if second is None else step.d1 * second
                if step.d2 is not None:
                    curvature = step.d2 * first * first
                    new_second = curvature if new_second is None else new_second + curvature
                first, second = step.d1 * first, new_second
            elif isinstance(step, _MaxPool):
                first, second = step.forward(first), None if second is None else step.forward(second)
            else:
                first, second = step.module(first), None if second is None else step.module(second)
        form = (first * self._output_curvature(first)).sum()
        return form if second is None else form + (self.output_error * second).sum()

    def quadratic_forms(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        """V^T H V for m vectors at once (stacked as in :meth:`products`), shape (m,)."""
        return vmap(self.quadratic_form)(blocks)

    def products(self, blocks: list[torch.Tensor]) -> list[torch.Tensor]:
        """H V for m vectors at once, each parameter's tangents stacked along a first axis of m."""
        return vmap(self.product)(blocks)


def _with_directions(steps, directions):
    """(step, its direction (V_l, c_l) for a layer, else None) along the chain."""
    remaining = iter(directions)
    for step in steps:
        yield step, next(remaining) if isinstance(step, _Layer) else None
