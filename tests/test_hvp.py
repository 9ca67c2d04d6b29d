import copy

import pytest
import torch

from curvature_reference import (LOSSES, dense_gradient, dense_hessian, finite_difference_hessian, tiny_cnn,
                                 tiny_data, tiny_images, tiny_mlp)
from utils.hvp import HVP_MODES, HessianOperator, default_hvp_mode, flat_grad, flat_params, forward, num_params

N = 10


def random_block(P, m, seed=3):
    return torch.randn(P, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("loss_name", ["mse", "ce"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_matvec_matches_dense_hessian(loss_name, chunk_size):
    model, (X, Y) = tiny_mlp(), tiny_data(N, loss_name)
    loss_fn = LOSSES[loss_name]
    H = dense_hessian(model, loss_fn, X, Y)
    op = HessianOperator(model, loss_fn, X, Y, chunk_size=chunk_size)
    V = random_block(op.dim, 4)
    assert op.dim == num_params(model) == 26 == H.shape[0]
    torch.testing.assert_close(op.matvec(V), H @ V, rtol=0, atol=1e-12)
    torch.testing.assert_close(op.matvec(V[:, 0]), H @ V[:, 0], rtol=0, atol=1e-12)
    assert op.hvps == 5


@pytest.mark.parametrize("loss_name", ["mse", "ce"])
def test_chunked_equals_unchunked_and_block_equals_columns(loss_name):
    model, (X, Y) = tiny_mlp(), tiny_data(N, loss_name)
    loss_fn = LOSSES[loss_name]
    full = HessianOperator(model, loss_fn, X, Y)
    V = random_block(full.dim, 3)
    reference = full.matvec(V)
    for chunk_size in (1, 3, 4, N, 100):
        chunked = HessianOperator(model, loss_fn, X, Y, chunk_size=chunk_size)
        assert (chunked.matvec(V) - reference).abs().max() < 1e-10
        columns = torch.stack([chunked.matvec(V[:, j]) for j in range(3)], dim=1)
        assert (columns - reference).abs().max() < 1e-10
        assert (chunked.gradient() - full.gradient()).abs().max() < 1e-12


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_gradient_matches_dense(chunk_size):
    model, (X, Y) = tiny_mlp(), tiny_data(N, "ce")
    loss_fn = LOSSES["ce"]
    op = HessianOperator(model, loss_fn, X, Y, chunk_size=chunk_size)
    g = dense_gradient(model, loss_fn, X, Y)
    torch.testing.assert_close(op.gradient(), g, rtol=0, atol=1e-13)
    torch.testing.assert_close(flat_grad(model, loss_fn, X, Y, chunk_size=chunk_size), g,
                               rtol=0, atol=1e-13)
    assert op.hvps == 0


def test_flat_params_and_frozen_parameters():
    model, (X, Y) = tiny_mlp(), tiny_data(N, "mse")
    loss_fn = LOSSES["mse"]
    H_all = dense_hessian(model, loss_fn, X, Y)
    torch.testing.assert_close(flat_params(model),
                               torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    model[0].bias.requires_grad_(False)  # parameters 12..15 of the flat vector
    keep = [i for i in range(26) if not 12 <= i < 16]
    op = HessianOperator(model, loss_fn, X, Y)
    V = random_block(22, 2)
    assert num_params(model) == op.dim == flat_params(model).numel() == 22
    torch.testing.assert_close(op.matvec(V), H_all[keep][:, keep] @ V, rtol=0, atol=1e-12)


def test_no_side_effects_and_mode_restored():
    model, (X, Y) = tiny_mlp(), tiny_data(N, "mse")
    model.eval()
    model[1].train()  # a mixed per-module state must come back as it was
    before = [p.detach().clone() for p in model.parameters()]
    for chunk_size in (None, 3):
        op = HessianOperator(model, LOSSES["mse"], X, Y, chunk_size=chunk_size, train_mode=True)
        op.matvec(random_block(op.dim, 2))
        op.gradient()
        assert op.train_mode is True
    assert [m.training for m in model.modules()] == [False, False, True, False]
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


class CallCounter(torch.nn.Module):
    """A layer whose forward pass writes to a buffer of its own."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        self.calls += 1
        return x


class CountingBatchNorm(torch.nn.BatchNorm1d):
    """A BatchNorm subclass that writes to a buffer of its own as well."""

    def __init__(self, features):
        super().__init__(features)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


def two_batchnorm_mlp(extra=None, norm=torch.nn.BatchNorm1d):
    """3 -> 4 -> 4 -> 2 in float64 with two BatchNorm layers, the first not tracking statistics
    although it has them, and ``extra`` (a module) after both activations."""
    torch.manual_seed(0)
    first, second = torch.nn.BatchNorm1d(4), norm(4)
    extras = [extra] if extra else []
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), first, torch.nn.Tanh(), *extras, torch.nn.Linear(4, 4),
                                second, torch.nn.Tanh(), *extras, torch.nn.Linear(4, 2)).double()
    with torch.no_grad():
        first.running_mean.copy_(torch.tensor([0.3, -0.2, 0.1, 0.5]))
        second.running_var.copy_(torch.tensor([0.5, 2.0, 1.5, 0.8]))
    first.track_running_stats = False
    return model


@pytest.mark.parametrize("other", [None, "shared counter", "BatchNorm subclass"])
@pytest.mark.parametrize("train_mode", [True, False])
def test_forward_leaves_every_buffer_alone(train_mode, other):
    """Plain BatchNorm alone in train mode takes the no-tracking route, everything else the
    copied-buffer route; both give the model's own output and leave every buffer (the same
    tensors, with the same values), tracking flag and mode as it was, also for a module with a
    buffer of its own that appears twice in the model."""
    if other == "BatchNorm subclass":
        model = two_batchnorm_mlp(norm=CountingBatchNorm)
    else:
        model = two_batchnorm_mlp(CallCounter() if other else None)
    X = tiny_data(N, "mse")[0]
    before = {name: (b, b.clone()) for name, b in model.named_buffers(remove_duplicate=False)}
    flags = [m.track_running_stats for m in model if isinstance(m, torch.nn.BatchNorm1d)]
    reference = copy.deepcopy(model).train(train_mode)(X)
    torch.testing.assert_close(forward(model, X, train_mode), reference, rtol=0, atol=0)
    for name, b in model.named_buffers(remove_duplicate=False):
        assert b is before[name][0] and torch.equal(b, before[name][1])
    assert [m.track_running_stats for m in model if isinstance(m, torch.nn.BatchNorm1d)] == flags == [False, True]
    assert all(m.training for m in model.modules())


def test_eval_mode_operator_is_a_snapshot_of_the_running_statistics():
    """An eval-mode operator keeps the statistics it was built with, even when training moves
    the model's own running statistics afterwards."""
    model, (X, Y) = tiny_mlp(batchnorm=True), tiny_data(N, "mse")
    op = HessianOperator(model, LOSSES["mse"], X, Y, train_mode=False)
    V = random_block(op.dim, 2)
    first = op.matvec(V)
    model.train()(X * 3 + 1)  # a training forward pass moves running_mean and running_var
    torch.testing.assert_close(op.matvec(V), first, rtol=0, atol=0)


@pytest.mark.parametrize("train_mode", [True, False])
def test_batchnorm_mode_matters_and_is_exact(train_mode):
    model, (X, Y) = tiny_mlp(batchnorm=True), tiny_data(N, "mse")
    loss_fn = LOSSES["mse"]
    with torch.no_grad():  # eval mode must use non-trivial running statistics
        model[1].running_mean.copy_(torch.tensor([0.3, -0.2, 0.1, 0.5]))
        model[1].running_var.copy_(torch.tensor([0.5, 2.0, 1.5, 0.8]))
    buffers = [b.clone() for b in model.buffers()]
    model.train(not train_mode)
    op = HessianOperator(model, loss_fn, X, Y, train_mode=train_mode)
    other = HessianOperator(model, loss_fn, X, Y, train_mode=not train_mode)
    V = random_block(op.dim, 2)
    HV = op.matvec(V)
    H = dense_hessian(model, loss_fn, X, Y, train_mode=train_mode)
    torch.testing.assert_close(HV, H @ V, rtol=0, atol=1e-12)
    H_fd = finite_difference_hessian(model, loss_fn, X, Y, train_mode=train_mode)
    torch.testing.assert_close(HV, H_fd @ V, rtol=1e-6, atol=1e-6)
    assert op.train_mode is train_mode and other.train_mode is (not train_mode)
    assert (HV - other.matvec(V)).abs().max() > 1e-3
    assert model.training is (not train_mode)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))


def test_float32_model():
    model64, (X, Y) = tiny_mlp(), tiny_data(N, "ce")
    model32 = tiny_mlp().float()
    op = HessianOperator(model32, LOSSES["ce"], X, Y)  # float64 data follow the model's dtype
    V = random_block(op.dim, 2)
    HV = op.matvec(V)
    assert op.dtype == torch.float32 and HV.dtype == torch.float32
    assert op.device == torch.device("cpu")
    H = dense_hessian(model64, LOSSES["ce"], X, Y)
    torch.testing.assert_close(HV.double(), H @ V, rtol=1e-4, atol=1e-5)


def test_bad_vector_shape():
    model, (X, Y) = tiny_mlp(), tiny_data(N, "mse")
    op = HessianOperator(model, LOSSES["mse"], X, Y)
    with pytest.raises(ValueError):
        op.matvec(torch.zeros(op.dim + 1, dtype=torch.float64))


@pytest.mark.parametrize("mode", HVP_MODES)
@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("network", ["mlp", "cnn"])
def test_every_mode_matches_dense_hessian(mode, chunk_size, network):
    if network == "mlp":
        model, (X, Y) = tiny_mlp(), tiny_data(N, "ce")
    else:
        model, (X, Y) = tiny_cnn(), tiny_images(N, "ce")
    loss_fn = LOSSES["ce"]
    H = dense_hessian(model, loss_fn, X, Y)
    op = HessianOperator(model, loss_fn, X, Y, chunk_size=chunk_size, mode=mode)
    V = random_block(op.dim, 11)  # more columns than one batched pass takes
    assert op.mode == mode
    torch.testing.assert_close(op.matvec(V), H @ V, rtol=0, atol=1e-12)
    torch.testing.assert_close(op.matvec(V[:, 4]), H @ V[:, 4], rtol=0, atol=1e-12)
    torch.testing.assert_close(op.gradient(), dense_gradient(model, loss_fn, X, Y), rtol=0, atol=1e-13)
    torch.testing.assert_close(op.quadratic_forms(V), (V * (H @ V)).sum(0), rtol=0, atol=1e-12)
    g = dense_gradient(model, loss_fn, X, Y)
    quadratic, norm2 = op.gradient_quadratic_form()
    assert (quadratic.item(), norm2.item()) == pytest.approx(((g @ H @ g).item(), (g @ g).item()), rel=1e-12)
    assert op.hvps == 24
    assert all(p.grad is None for p in model.parameters())


def test_default_mode_per_model_and_device():
    mlp, cnn, bn = tiny_mlp(), tiny_cnn(), torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    assert {default_hvp_mode(m, "cpu") for m in (mlp, bn)} == {"double-backward"}
    assert default_hvp_mode(cnn, "cpu") == default_hvp_mode(cnn, "cuda:0") == "r-operator"
    assert default_hvp_mode(mlp, "cuda") == "double-backward-batched"
    assert default_hvp_mode(bn, "cuda") == "double-backward-batched"
    cnn_without_pooling = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(18, 2),
                                              torch.nn.GELU(approximate="tanh"))  # no known second derivative
    assert default_hvp_mode(cnn_without_pooling, "cuda") == "forward-over-reverse"
    X, Y = tiny_data(N, "mse")
    assert HessianOperator(tiny_mlp(), LOSSES["mse"], X, Y).mode == "double-backward"
    with pytest.raises(ValueError, match="BatchNorm"):
        HessianOperator(tiny_mlp(batchnorm=True), LOSSES["mse"], X, Y, mode="forward-over-reverse")
    with pytest.raises(ValueError, match="unknown HVP mode"):
        HessianOperator(tiny_mlp(), LOSSES["mse"], X, Y, mode="finite-differences")


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_gradient_quadratic_form_matches_dense(chunk_size):
    model, (X, Y) = tiny_mlp(), tiny_data(N, "ce")
    loss_fn = LOSSES["ce"]
    H, g = dense_hessian(model, loss_fn, X, Y), dense_gradient(model, loss_fn, X, Y)
    op = HessianOperator(model, loss_fn, X, Y, chunk_size=chunk_size)
    quadratic, norm2 = (t.item() for t in op.gradient_quadratic_form())
    assert quadratic == pytest.approx((g @ H @ g).item(), rel=1e-12)
    assert norm2 == pytest.approx((g @ g).item(), rel=1e-12)
    assert op.hvps == 1
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("mode", HVP_MODES)
def test_every_mode_with_parameters_of_zero_curvature(mode):
    """An unused parameter and a loss linear in the outputs on top of mse: the unused rows are
    zero. The R-operator takes layer chains only, so it gets the loss without the parameter."""
    model, (X, Y) = tiny_mlp(), tiny_data(N, "mse")
    unused = 0 if mode == "r-operator" else 3
    if unused:
        model.register_parameter("unused", torch.nn.Parameter(torch.ones(unused, dtype=torch.float64)))

    def linear_in_last_bias(outputs, targets, reduction="mean"):
        return LOSSES["mse"](outputs, targets, reduction) + 0.5 * outputs.sum(dim=1).mean()

    op = HessianOperator(model, linear_in_last_bias, X, Y, mode=mode)
    reference = HessianOperator(model, linear_in_last_bias, X, Y, mode="double-backward")
    V = random_block(op.dim, 10)
    HV = op.matvec(V)
    torch.testing.assert_close(HV, reference.matvec(V), rtol=0, atol=1e-12)
    if unused:
        assert not HV[:unused].any()  # the Sequential's own parameter comes first in parameters()
