"""Same-batch quadratic forms of a traced network from its first Taylor coefficient and its errors.

For parameters theta, a direction V and the batch loss L(theta) = loss(f(theta)), write dots for
d/dt at theta + t V and M = d^2 loss / df^2 at the output. Then

    V^T H V = d^2/dt^2 L(theta + t V) = fdot^T M fdot + (d loss / df) . fddot.

The model's graph (``torch.fx``) is a sequence of nodes u = phi(inputs, own parameters). Each
node's second coefficient is its own term t_u (its second derivative along the path with the
inputs' second coefficients set to zero) plus its linearisation applied to the inputs' second
coefficients, so fddot is the sum of the own terms carried to the output by the linearised
network, and

    (d loss / df) . fddot = sum_u <dL/du, t_u>,

with dL/du the errors that the backward pass of the gradient computes anyway. The first
coefficients follow node by node from the values the gradient's forward pass kept:

    Conv2d / Linear  z = W * h + c:  zdot = V * h + C + W * hdot,      t = 2 V * hdot
    activation       h = act(z):     hdot = act' zdot,                  t = act'' zdot^2
    BatchNorm, batch statistics (train mode, or no running statistics): with n = (x - mean) s the
                     normalised input, s = (var + eps)^(-1/2), means over the batch's rows and
                     positions, u = s (xdot - mean xdot) and a = mean(n u):
                     ndot = u - a n,   own nddot = n (3 a^2 - mean(u^2)) - 2 a u,
                     ydot = gamma ndot + gammadot n + betadot,   t = gamma nddot + 2 gammadot ndot
    BatchNorm, running statistics (eval mode): ydot = gamma s xdot + gammadot n + betadot,
                     t = 2 gammadot s xdot
    additions, subtractions, scaling by constants, slicing, zero padding, means, sums, average
    pooling and reshaping: linear, no own term.

(BatchNorm's terms follow from var = mean(c^2), c = x - mean x: sdot / s = -a and
sddot / s = 3 a^2 - mean(u^2) - mean(n w) with w = s (xddot - mean xddot), whose last part
belongs to the linearisation.) The data do not move (hdot = 0 at the input); running statistics
are read, never written. Beyond the gradient, a Conv2d or Linear layer costs three applications
of its map (V * h, W * hdot, V * hdot; one on a layer whose input is data), against the six of
a Hessian-vector product by double backward.

:func:`taylor_program` returns None for a model with a node outside these rules (a traced branch
on a value, max pooling, attention, a parameter used outside its module, a hook, ...): the
callers then take another route.
"""

import math
import operator
import warnings
import weakref

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from utils.activations import activate, activation_name
from utils.hvp import model_mode, params_and_data
from utils.models import BATCHNORMS
from utils.r_operator import quiet_jvp

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LAYERS = (*_CONVOLUTIONS, nn.Linear)
_RESHAPING_MODULES = (nn.Identity, nn.Flatten, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                      nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
# Maps linear in their one argument from the graph (the others are constants of the graph).
_LINEAR_FUNCTIONS = {operator.getitem, operator.neg, operator.mul, operator.truediv, F.pad, torch.flatten,
                     torch.reshape, torch.mean, torch.sum, torch.transpose, torch.permute, F.avg_pool1d,
                     F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d}
_LINEAR_METHODS = {"flatten", "view", "reshape", "mean", "sum", "transpose", "permute", "squeeze", "unsqueeze",
                   "contiguous", "__getitem__", "neg"}
_ACTIVATION_FUNCTIONS = {torch.relu: "relu", F.relu: "relu", torch.tanh: "tanh", F.silu: "silu"}
_PROGRAMS = weakref.WeakKeyDictionary()


class TaylorProgram:
    """The graph of a model, and how each node's value, first coefficient and own second-order
    term are computed, for one batch (under ``torch.func.vmap`` for many)."""

    def __init__(self, model: nn.Module, graph: fx.Graph):
        self.nodes = [node for node in graph.nodes if node.op != "output"]
        self.output = next(node for node in graph.nodes if node.op == "output").args[0]
        # Without the root module: the program is cached per model in a weak dictionary, whose
        # values must not keep the model alive.
        self.modules = {name: module for name, module in model.named_modules() if name}
        # A parameter shared by two modules has one name (its first), under which its value and
        # direction come: both uses then move together.
        canonical = {id(p): name for name, p in model.named_parameters()}
        self.parameter_names = {target: [canonical.get(id(getattr(module, attr, None))) for attr in ("weight", "bias")]
                                for target, module in self.modules.items()}
        self._shapes = {}

    def output_shapes(self, values: dict, x: torch.Tensor) -> dict:
        """Node name -> the shape of its output on a batch shaped like ``x`` (one pass per shape)."""
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self._shapes:
            with torch.no_grad():
                _, cache = self.primal(values, x)
            self._shapes[key] = {name: value.shape for name, value in cache.items()}
        return self._shapes[key]

    def source_nodes(self) -> list[str]:
        """Names of the nodes that may have an own term (layers, BatchNorm, activations other
        than relu), whose errors :meth:`first_and_curvature` needs."""
        def has_source(node):
            if node.op == "call_module":
                module = self.modules[node.target]
                return isinstance(module, _LAYERS + BATCHNORMS) or activation_name(module) not in (None, "relu")
            return node.op == "call_function" and _ACTIVATION_FUNCTIONS.get(node.target) not in (None, "relu")
        return [node.name for node in self.nodes if has_source(node)]

    def primal(self, values: dict, x: torch.Tensor, probes: dict | None = None):
        """(output, cache) of one batch ``x``: the model's output at parameters ``values`` (name ->
        tensor, as ``torch.func.functional_call`` takes them; the others at the model's own) and,
        by node name, every node's value and each BatchNorm's normalised input and scale.

        ``probes`` (node name -> zeros of its output's shape) are added to those nodes' outputs,
        so that the gradient with respect to a probe is dL/d(that node's output).
        """
        probes = probes or {}
        cache = {}
        for node in self.nodes:
            if node.op == "placeholder":
                value = x
            elif node.op == "call_module":
                module = self.modules[node.target]
                inputs = cache[node.args[0].name]
                parameters = self._parameters(values, node.target)
                if isinstance(module, _LAYERS):
                    value = _apply(module, inputs, *parameters)
                elif isinstance(module, BATCHNORMS):
                    value, normalised, scale = plain_batchnorm_parts(module, inputs, *parameters)
                    cache[node.name + ":normalised"], cache[node.name + ":scale"] = normalised, scale
                else:
                    value = module(inputs)
            else:
                value = _call(node, cache)
            cache[node.name] = value + probes[node.name] if node.name in probes else value
        return cache[self.output.name], cache

    def first_coefficient(self, values: dict, cache: dict, tangents: dict) -> torch.Tensor:
        """fdot: the derivative of the batch's output along ``tangents`` (name -> direction; a
        parameter without one stays fixed), from the :meth:`primal` ``cache`` at ``values``."""
        return self._propagate(values, cache, tangents, errors=None)[0]

    def first_and_curvature(self, values: dict, cache: dict, tangents: dict, errors: dict):
        """(fdot, (d loss / df) . fddot) along ``tangents``, the second as sum_u <dL/du, t_u> over
        the nodes' own terms (module docstring), ``errors`` giving dL/du by node name for
        :meth:`source_nodes` (a node without one has no moving input)."""
        return self._propagate(values, cache, tangents, errors)

    def _propagate(self, values, cache, tangents, errors):
        firsts, paired = {}, None
        for node in self.nodes:
            if node.op == "placeholder":
                firsts[node] = None
                continue
            if node.op == "call_module":
                first, own = self._module_terms(node, values, cache, tangents, firsts, errors is not None)
            else:
                first, own = _function_terms(node, cache, firsts, errors is not None)
            if own is not None:
                term = (errors[node.name] * own).sum()  # torch.dot runs as a slow bmm under vmap
                paired = term if paired is None else paired + term
            firsts[node] = first
        first = firsts[self.output]
        if first is None:  # nothing moves the output
            first = torch.zeros_like(cache[self.output.name])
        return first, (first.new_zeros(()) if paired is None else paired)

    def _parameters(self, values, target):
        module = self.modules[target]
        return [values.get(name, getattr(module, attr, None)) if name is not None else getattr(module, attr, None)
                for name, attr in zip(self.parameter_names[target], ("weight", "bias"))]

    def _directions(self, tangents, target):
        return [None if name is None else tangents.get(name) for name in self.parameter_names[target]]

    def _module_terms(self, node, values, cache, tangents, firsts, own_terms):
        module = self.modules[node.target]
        argument = node.args[0]
        inputs, first = cache[argument.name], firsts[argument]
        if isinstance(module, _LAYERS):
            weight, bias = self._parameters(values, node.target)
            weight_dot, bias_dot = self._directions(tangents, node.target)
            z_dot = None if weight_dot is None else _apply(module, inputs, weight_dot, None)
            if first is not None:
                z_dot = _plus(z_dot, _apply(module, first, weight, bias_dot))
            elif bias_dot is not None:
                z_dot = _plus(z_dot, _bias_like(bias_dot, cache[node.name], isinstance(module, nn.Linear)))
            own = None
            if own_terms and first is not None and weight_dot is not None:
                own = _apply(module, first, 2 * weight_dot, None)  # the factor on the small weight tensor
            return z_dot, own
        if isinstance(module, BATCHNORMS):
            weight, _ = self._parameters(values, node.target)
            return _batchnorm_terms(module, cache[node.name + ":normalised"], cache[node.name + ":scale"], first,
                                    weight, *self._directions(tangents, node.target), own_terms)
        name = activation_name(module)
        if name is not None:
            return _activation_terms(name, inputs, first, own_terms)
        return (None if first is None else module(first)), None


def taylor_program(model: nn.Module) -> TaylorProgram | None:
    """The :class:`TaylorProgram` of ``model``, or None where it has a node outside the module
    docstring's rules, cannot be traced, traces differently in train and eval mode, or has
    hooks (its own or global ones). Traced once per model and structure: a module or parameter
    swapped, tied or hooked later is traced anew."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return None
    structure = (tuple((name, id(m), len(m._forward_hooks), len(m._forward_pre_hooks))
                       for name, m in model.named_modules()),
                 tuple((name, id(p)) for name, p in model.named_parameters(remove_duplicate=False)))
    cached = _PROGRAMS.get(model)
    if cached is None or cached[0] != structure:
        _PROGRAMS[model] = cached = (structure, _traced_program(model))
    return cached[1]


def taylor_quadratic_forms(model, loss_fn, X, Y, idx: torch.Tensor, *, train_mode=True, vectorised=True,
                           gauss_newton=False) -> tuple:
    """(g_B^T H_B g_B, |g_B|^2) for every batch B given as a row of ``idx`` (K, b), each (K,), for
    a model with a :func:`taylor_program`; with ``gauss_newton`` g_B^T G_B g_B = fdot^T M fdot in
    place of the first (G_B = J_B^T M J_B, :mod:`utils.gauss_newton`).

    Per batch one forward and backward pass gives g_B and the errors dL/du; then

        g_B^T H_B g_B = fdot^T M fdot + sum_u <dL/du, t_u>

    with the first coefficient fdot along g_B and the nodes' own terms t_u (module docstring).
    BatchNorm normalises each batch by its own statistics in train mode. ``vectorised``: all K
    batches in one ``torch.func.vmap`` call (the errors as gradients of zero probes added to the
    nodes' outputs), else one batch at a time by autograd.
    """
    program = taylor_program(model)
    if program is None:
        raise ValueError(f"{type(model).__name__} is outside the rules of utils.taylor (see taylor_program)")
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    params, X, Y = params_and_data(model, X, Y)
    primals = {name: p.detach() for name, p in zip(names, params)}
    sources = [] if gauss_newton else program.source_nodes()

    def forms(gradient, errors, cache, yb):
        with torch.no_grad():
            if gauss_newton:
                first, paired = program.first_coefficient(primals, cache, gradient), 0
            else:
                first, paired = program.first_and_curvature(primals, cache, gradient, errors)
            output = cache[program.output.name]
            _, curvature = quiet_jvp(grad(lambda f: loss_fn(f, yb)), (output,), (first,))
            norm2 = sum((gradient[name] * gradient[name]).sum() for name in names)
            return (first * curvature).sum() + paired, norm2

    def vmapped_terms(xb, yb, shapes):
        def loss_and_cache(values, probes):
            output, cache = program.primal(values, xb, probes)
            return loss_fn(output, yb), cache
        probes = {name: xb.new_zeros(shape) for name, shape in shapes.items()}
        (gradient, errors), cache = grad(loss_and_cache, argnums=(0, 1), has_aux=True)(primals, probes)
        return forms(gradient, errors, cache, yb)

    def one_batch(xb, yb):
        values = {name: p.detach().requires_grad_() for name, p in primals.items()}
        with torch.enable_grad():
            output, cache = program.primal(values, xb)
            moving = [name for name in sources if cache[name].requires_grad]
            grads = torch.autograd.grad(loss_fn(output, yb), [*values.values(), *(cache[n] for n in moving)],
                                        allow_unused=True, materialize_grads=True)
        gradient, errors = dict(zip(values, grads)), dict(zip(moving, grads[len(values):]))
        return forms(gradient, errors, {name: value.detach() for name, value in cache.items()}, yb)

    with model_mode(model, train_mode):
        if vectorised:
            shapes = {name: program.output_shapes(primals, X[idx[0]])[name] for name in sources}
            quadratic, norm2 = vmap(lambda xb, yb: vmapped_terms(xb, yb, shapes))(X[idx], Y[idx])
        else:
            quadratic, norm2 = (torch.stack(t) for t in zip(*(one_batch(X[rows], Y[rows]) for rows in idx)))
    return quadratic.detach(), norm2.detach()


def _traced_program(model: nn.Module) -> TaylorProgram | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graphs = []
            for training in (True, False):  # a forward that branches on self.training has no one graph
                with model_mode(model, training):
                    graphs.append(fx.symbolic_trace(model))
    except Exception:  # noqa: BLE001 - any model fx cannot trace takes another route
        return None
    if graphs[0].code != graphs[1].code:
        return None
    graph = graphs[0].graph
    modules = dict(model.named_modules())
    if any(m._forward_hooks or m._forward_pre_hooks for m in modules.values()):
        return None  # hooks would be skipped by the program's own layers
    called = set()
    for node in graph.nodes:
        if node.op == "output":
            if not isinstance(node.args[0], fx.Node):
                return None  # one output tensor only
            continue
        if node.op == "placeholder":
            if node.next.op == "placeholder":
                return None  # one input only
        elif node.op == "call_module":
            if not _supported_module(modules[node.target], node):
                return None
            called.add(node.target)
        elif not _supported_function(node):
            return None
    # Every parameter is one of the weights and biases of the modules the graph calls (a module
    # called twice, or a parameter shared by two, moves at every use).
    used = {id(getattr(modules[target], attr, None)) for target in called for attr in ("weight", "bias")}
    if any(id(p) not in used for p in model.parameters()):
        return None
    return TaylorProgram(model, graph)


def _supported_module(module, node) -> bool:
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return False
    if getattr(module, "inplace", False):
        return False
    if isinstance(module, _CONVOLUTIONS):
        return module.padding_mode == "zeros"
    return isinstance(module, _LAYERS + BATCHNORMS + _RESHAPING_MODULES) or activation_name(module) is not None


def _supported_function(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _LINEAR_METHODS and _one_argument_from_graph(node)
    if node.op != "call_function":
        return False
    if node.target in (operator.add, operator.sub):
        return not node.kwargs
    if node.target in _ACTIVATION_FUNCTIONS:
        return len(node.args) == 1 and not node.kwargs.get("inplace", False)
    if node.target is operator.mul and len(node.args) == 2 and not isinstance(node.args[1], fx.Node):
        return isinstance(node.args[0], fx.Node)
    if node.target is operator.mul and len(node.args) == 2:  # a constant times the node
        return not isinstance(node.args[0], fx.Node) and isinstance(node.args[1], fx.Node)
    if node.target is F.pad and not _pads_with_zeros(node):
        return False  # a constant other than 0 makes the padding affine, not linear
    return node.target in _LINEAR_FUNCTIONS and _one_argument_from_graph(node)


def _pads_with_zeros(node: fx.Node) -> bool:
    arguments = dict(zip(("input", "pad", "mode", "value"), node.args), **node.kwargs)
    return arguments.get("mode", "constant") != "constant" or arguments.get("value") in (None, 0, 0.0)


def _one_argument_from_graph(node: fx.Node) -> bool:
    """Whether the node's first argument is its only one from the graph."""
    later = []
    fx.node.map_arg((node.args[1:], node.kwargs), later.append)
    return bool(node.args) and isinstance(node.args[0], fx.Node) and not later


def _call(node: fx.Node, cache: dict):
    args = fx.node.map_arg(node.args, lambda n: cache[n.name])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: cache[n.name])
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _function_terms(node: fx.Node, cache, firsts, own_terms):
    target = node.target
    if target in (operator.add, operator.sub):
        first = None
        for position, argument in enumerate(node.args):
            if isinstance(argument, fx.Node) and firsts[argument] is not None:
                moving = firsts[argument] if target is operator.add or position == 0 else -firsts[argument]
                first = _plus(first, moving)
        return first, None
    argument = node.args[0]
    if target in _ACTIVATION_FUNCTIONS:
        return _activation_terms(_ACTIVATION_FUNCTIONS[target], cache[argument.name], firsts[argument], own_terms)
    if target is operator.mul and not isinstance(argument, fx.Node):  # a constant times the node
        first = firsts[node.args[1]]
        return (None if first is None else argument * first), None
    first = firsts[argument]
    if first is None:
        return None, None
    if node.op == "call_method":
        return getattr(first, target)(*node.args[1:], **node.kwargs), None
    return target(first, *node.args[1:], **node.kwargs), None


def _activation_terms(name, z, z_dot, own_terms):
    if z_dot is None:
        return None, None
    if name == "relu":
        # relu'(z) zdot by the kernel of autograd's own ReLU backward: one pass, no mask tensor
        return torch.ops.aten.threshold_backward(z_dot, z, 0), None
    _, d1, d2 = activate(name, z)
    return d1 * z_dot, (d2 * z_dot * z_dot if own_terms and d2 is not None else None)


def _apply(module, inputs, weight, bias):
    if isinstance(module, nn.Linear):
        return F.linear(inputs, weight, bias)
    convolution = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[weight.dim() - 2]
    return convolution(inputs, weight, bias, module.stride, module.padding, module.dilation, module.groups)


def _bias_like(bias_dot, like, linear: bool):
    """A bias direction broadcast to the layer's output ``like``."""
    shape = [1] * like.dim()
    shape[-1 if linear else 1] = -1
    return bias_dot.view(shape).expand_as(like)


def _uses_batch_statistics(norm) -> bool:
    return norm.training or norm.running_mean is None


def _channel_shape(x):
    return [1, -1] + [1] * (x.dim() - 2)


def plain_batchnorm_parts(norm, x, weight, bias):
    """(output, normalised input, scale) of BatchNorm layer ``norm`` on the batch x with affine
    parameters ``weight`` and ``bias`` (None without), by plain tensor operations that ``vmap``,
    forward-mode and double differentiation all see through (``F.batch_norm``'s double backward
    has no batching rule): batch statistics (biased variance) in train mode or without running
    statistics, else the running ones, read and never written."""
    shape = _channel_shape(x)
    if _uses_batch_statistics(norm):
        dims = [0, *range(2, x.dim())]
        centred = x - _channel_mean(x, dims)
        scale = torch.rsqrt(_channel_mean(centred.square(), dims) + norm.eps)
    else:
        centred = x - norm.running_mean.view(shape)
        scale = torch.rsqrt(norm.running_var.view(shape) + norm.eps)
    normalised = centred * scale
    if weight is None:
        return normalised, normalised, scale
    return torch.addcmul(bias.view(shape), normalised, weight.view(shape)), normalised, scale


def _batchnorm_terms(norm, normalised, scale, x_dot, weight, weight_dot, bias_dot, own_terms):
    """(ydot, own term) of BatchNorm (module docstring), gathered per channel so that each takes
    a few passes over the activations."""
    shape = _channel_shape(normalised)
    gamma = torch.ones_like(scale) if weight is None else weight.view(shape)
    gamma_dot = None if weight_dot is None else weight_dot.view(shape)
    beta_dot = None if bias_dot is None else bias_dot.view(shape)
    if x_dot is None:  # only the parameters move
        y_dot = _plus(None if gamma_dot is None else normalised * gamma_dot, beta_dot)
        return (None if y_dot is None else y_dot.expand_as(normalised)), None
    if not _uses_batch_statistics(norm):
        y_dot = _addcmul(beta_dot, x_dot, gamma * scale)
        if gamma_dot is not None:
            y_dot = torch.addcmul(y_dot, normalised, gamma_dot)
        own = x_dot * (2 * gamma_dot * scale) if own_terms and gamma_dot is not None else None
        return y_dot, own
    dims = [0, *range(2, normalised.dim())]

    def mean_of(t):
        return _channel_mean(t, dims)
    u = (x_dot - mean_of(x_dot)) * scale
    a = mean_of(normalised * u)
    # ydot = gamma u + n (gammadot - gamma a) + betadot
    y_dot = torch.addcmul(_addcmul(beta_dot, u, gamma), normalised,
                          -gamma * a if gamma_dot is None else gamma_dot - gamma * a)
    if not own_terms:
        return y_dot, None
    # t = n (gamma (3 a^2 - mean(u^2)) - 2 gammadot a) + u (2 gammadot - 2 gamma a)
    along_n, along_u = gamma * (3 * a * a - mean_of(u.square())), -2 * gamma * a
    if gamma_dot is not None:
        along_n, along_u = along_n - 2 * gamma_dot * a, along_u + 2 * gamma_dot
    return y_dot, torch.addcmul(normalised * along_n, u, along_u)


def _channel_mean(t, dims):
    """The mean over ``dims`` (kept), as a sum scaled afterwards: the gradient of a mean would
    divide a tensor of the input's size, that of the sum only scales the small result."""
    return t.sum(dim=dims, keepdim=True) * (1.0 / math.prod(t.shape[dim] for dim in dims))


def _addcmul(start, t, factor):
    """start + t * factor, start None for zero."""
    return t * factor if start is None else torch.addcmul(start, t, factor)


def _plus(a, b):
    if a is None:
        return b
    return a if b is None else a + b
