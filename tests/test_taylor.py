"""Same-batch forms from Taylor coefficients (utils/taylor.py) against dense float64 derivatives."""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

from curvature_reference import LOSSES, dense_gauss_newton, dense_gradient, dense_hessian
from utils.hvp import model_mode
from utils.models import build_model
from utils.taylor import taylor_program, taylor_quadratic_forms

N = 8
IDX = torch.tensor([[0, 3, 5, 6], [1, 2, 7, 4], [4, 6, 0, 2]])


class _Zoo(nn.Module):
    """Every rule of utils/taylor.py in one network: convolutions with and without bias and
    stride, BatchNorm with and without affine parameters (2d and 1d), tanh and SiLU as modules
    and functions, relu as a function, a residual sum and difference through slicing, zero
    padding and scaling, average pooling, flatten, and a Linear layer called twice."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3, padding=1)
        self.norm1 = nn.BatchNorm2d(2)
        self.act = nn.Tanh()
        self.conv2 = nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(3, affine=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.hidden = nn.Linear(3, 4)
        self.norm3 = nn.BatchNorm1d(4)
        self.silu = nn.SiLU()
        self.shared = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = self.act(self.norm1(self.conv1(x)))
        shortcut = F.pad(h[:, :, ::2, ::2], (0, 0, 0, 0, 0, 1)) * 0.5
        h = F.silu(self.norm2(self.conv2(h))) + shortcut - torch.relu(shortcut)
        h = torch.flatten(self.pool(h), 1) - h.mean(dim=(2, 3)) / 3
        h = self.silu(self.norm3(self.hidden(h)))
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
        return self.out(h)


def zoo(seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = _Zoo().double()
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.running_mean.uniform_(-0.3, 0.3)
                    module.running_var.uniform_(0.5, 1.5)
                    if module.affine:
                        module.weight.normal_(1.0, 0.3)
                        module.bias.normal_(0.0, 0.3)
    return model


def images(loss_name, seed=4):
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(N, 1, 6, 6, generator=generator, dtype=torch.float64)
    Y = torch.randn(N, 2, generator=generator, dtype=torch.float64) if loss_name == "mse" else \
        torch.randint(0, 2, (N,), generator=generator)
    return X, Y


@pytest.mark.parametrize("loss_name", ["mse", "ce"])
@pytest.mark.parametrize("train_mode", [True, False])
@pytest.mark.parametrize("vectorised", [True, False])
def test_quadratic_forms_are_the_dense_ones(loss_name, train_mode, vectorised):
    """g_B^T H_B g_B, g_B^T G_B g_B and |g_B|^2 of every batch equal their dense float64 values, in
    train mode (each batch by its own statistics) and eval mode (the running ones, never written)."""
    model, (X, Y) = zoo(), images(loss_name)
    loss_fn = LOSSES[loss_name]
    model.train(not train_mode)  # the requested mode wins and the model's own flag comes back
    buffers = [b.clone() for b in model.buffers()]
    quadratics, norms = taylor_quadratic_forms(model, loss_fn, X, Y, IDX, train_mode=train_mode,
                                               vectorised=vectorised)
    gauss_newton, gn_norms = taylor_quadratic_forms(model, loss_fn, X, Y, IDX, train_mode=train_mode,
                                                    vectorised=vectorised, gauss_newton=True)
    for rows, quadratic, gn, norm2 in zip(IDX.tolist(), quadratics, gauss_newton, norms):
        g = dense_gradient(model, loss_fn, X[rows], Y[rows], train_mode)
        H = dense_hessian(model, loss_fn, X[rows], Y[rows], train_mode)
        G = dense_gauss_newton(model, loss_name, X[rows], Y[rows], train_mode)
        assert quadratic.item() == pytest.approx((g @ H @ g).item(), rel=1e-11)
        assert gn.item() == pytest.approx((g @ G @ g).item(), rel=1e-11)
        assert norm2.item() == pytest.approx((g @ g).item(), rel=1e-12)
    torch.testing.assert_close(gn_norms, norms, rtol=1e-13, atol=0)
    assert model.training == (not train_mode)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("train_mode", [True, False])
def test_the_first_coefficient_is_the_directional_derivative_of_the_outputs(train_mode):
    """fdot along a random direction (a frozen parameter staying fixed) is the jvp of the outputs."""
    model, (X, _) = zoo(), images("mse")
    model.hidden.bias.requires_grad_(False)
    program = taylor_program(model)
    values = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    generator = torch.Generator().manual_seed(7)
    direction = {name: torch.randn(v.shape, generator=generator, dtype=v.dtype) for name, v in values.items()}
    with model_mode(model, train_mode):
        _, cache = program.primal(values, X)
        first = program.first_coefficient(values, cache, direction)
        def outputs(v):  # fresh buffers inside: train-mode BatchNorm updates them in place
            return functional_call(model, {**v, **{name: b.clone() for name, b in model.named_buffers()}}, (X,))
        expected = jvp(outputs, (values,), (direction,))[1]
    torch.testing.assert_close(first, expected, rtol=1e-12, atol=1e-14)


def test_the_second_coefficient_paired_with_the_errors_is_the_second_derivative_of_the_loss():
    """fdot^T M fdot + sum_u <dL/du, t_u> along any direction V is d^2/dt^2 L(theta + t V) = V^T H V
    (the forms take V = g_B; here a random V, in train mode)."""
    model, (X, Y) = zoo(), images("ce")
    loss_fn = LOSSES["ce"]
    H = dense_hessian(model, loss_fn, X, Y)
    program = taylor_program(model)
    values = {name: p.detach() for name, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(3)
    direction = {name: torch.randn(v.shape, generator=generator, dtype=v.dtype) for name, v in values.items()}
    V = torch.cat([d.reshape(-1) for d in direction.values()])
    sources = program.source_nodes()
    with model_mode(model, True):
        output, cache = program.primal({name: v.clone().requires_grad_() for name, v in values.items()}, X)
        errors = dict(zip(sources, torch.autograd.grad(loss_fn(output, Y), [cache[name] for name in sources])))
        cache = {name: value.detach() for name, value in cache.items()}
        first, paired = program.first_and_curvature(values, cache, direction, errors)
    curvature = jvp(torch.func.grad(lambda f: loss_fn(f, Y)), (cache[program.output.name],), (first,))[1]
    assert ((first * curvature).sum() + paired).item() == pytest.approx((V @ H @ V).item(), rel=1e-11)


class _MaxPooled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.out = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Linear(2, 2)

    def forward(self, x):
        return self.out(F.max_pool2d(self.norm(self.conv(x)), 4).flatten(1))


class _Reshaped(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.out = nn.BatchNorm1d(36), nn.Linear(36, 2)

    def forward(self, x):
        return self.out(self.norm(x.view(x.size(0), -1)))


class _FreeParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.out, self.scale = nn.Linear(36, 2), nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.out(x.flatten(1)) * self.scale


class _PaddedWithOnes(nn.Module):
    def __init__(self):
        super().__init__()
        self.out = nn.Linear(38, 2)

    def forward(self, x):
        return self.out(F.pad(x.flatten(1), (1, 1), value=1.0))


class _ModeBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.out = nn.Linear(36, 2)

    def forward(self, x):
        h = torch.tanh(x.flatten(1))
        if self.training:
            h = h * 0.5
        return self.out(h)


class _TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.out = nn.Linear(36, 2)

    def forward(self, x):
        return self.out(x.flatten(1)), x


def _hooked():
    model = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(36), nn.Linear(36, 2))
    model[2].register_forward_hook(lambda module, args, output: output * 2)
    return model


@pytest.mark.parametrize("make", [
    _MaxPooled, _Reshaped, _FreeParameter, _hooked, _PaddedWithOnes, _ModeBranch, _TwoOutputs,
    lambda: nn.Sequential(nn.Flatten(), nn.BatchNorm1d(36), nn.ReLU(inplace=True), nn.Linear(36, 2)),
    lambda: nn.Sequential(nn.Flatten(), nn.LayerNorm(36), nn.Linear(36, 2)),
    lambda: build_model("vit", (1, 8, 8), 2),
])
def test_models_outside_the_rules_have_no_program(make):
    assert taylor_program(make()) is None


def test_the_built_in_residual_networks_and_batchnorm_chains_have_a_program():
    for name in ("resnet", "resnet_bn"):
        assert taylor_program(build_model(name, (3, 8, 8), 10)) is not None
    chain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(32, 2)).double()
    assert taylor_program(chain) is not None
    X, Y = images("mse")
    quadratics, _ = taylor_quadratic_forms(chain, LOSSES["mse"], X, Y, IDX[:1])
    g = dense_gradient(chain, LOSSES["mse"], X[IDX[0]], Y[IDX[0]])
    H = dense_hessian(chain, LOSSES["mse"], X[IDX[0]], Y[IDX[0]])
    assert quadratics[0].item() == pytest.approx((g @ H @ g).item(), rel=1e-11)


def test_the_cached_program_does_not_keep_its_model_alive():
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 2))
    assert taylor_program(model) is not None
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


class _Tied(nn.Module):
    """Two Linear layers sharing one weight, and a constant times a node."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.out(0.5 * torch.tanh(self.b(torch.tanh(self.a(x.flatten(1)[:, :3])))))


def test_a_weight_shared_by_two_layers_moves_at_both():
    torch.manual_seed(0)
    model, (X, Y) = _Tied().double(), images("mse")
    quadratics, norms = taylor_quadratic_forms(model, LOSSES["mse"], X, Y, IDX)
    for rows, quadratic, norm2 in zip(IDX.tolist(), quadratics, norms):
        g = dense_gradient(model, LOSSES["mse"], X[rows], Y[rows])
        H = dense_hessian(model, LOSSES["mse"], X[rows], Y[rows])
        assert quadratic.item() == pytest.approx((g @ H @ g).item(), rel=1e-11)
        assert norm2.item() == pytest.approx((g @ g).item(), rel=1e-12)


def test_a_model_changed_after_its_first_program_is_traced_anew():
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4),
                          nn.Tanh(), nn.Linear(4, 2)).double()
    first = taylor_program(model)
    assert first is not None and taylor_program(model) is first
    handle = model[7].register_forward_hook(lambda module, args, output: output * 2)
    assert taylor_program(model) is None
    handle.remove()
    X, Y = images("mse")
    for change in ("a module swapped", "a weight tied"):
        if change == "a module swapped":
            model[2] = nn.SiLU()
        else:
            model[5].weight = model[3].weight
        quadratics, _ = taylor_quadratic_forms(model, LOSSES["mse"], X, Y, IDX[:1])
        g = dense_gradient(model, LOSSES["mse"], X[IDX[0]], Y[IDX[0]])
        H = dense_hessian(model, LOSSES["mse"], X[IDX[0]], Y[IDX[0]])
        assert quadratics[0].item() == pytest.approx((g @ H @ g).item(), rel=1e-11), change
    hook = nn.modules.module.register_module_forward_hook(lambda module, args, output: output)
    try:
        assert taylor_program(model) is None
    finally:
        hook.remove()
    assert taylor_program(model) is not None
