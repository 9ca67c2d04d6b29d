"""The Gram engine (utils/gram.py) against dense float64 derivatives of tiny networks."""

import pytest
import torch
from torch import nn

from curvature_reference import LOSSES, dense_gradient, dense_hessian, tiny_data, tiny_mlp
from utils.gram import linear_network, squared_norm
from utils.models import ACTIVATIONS, build_model


def perturbed(model, seed=0):
    """Non-zero biases and weights off the initial scale, so every term of H is exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


def image_data(n, loss_name, outputs=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 2, 3, 2, generator=generator, dtype=torch.float64)
    if loss_name == "mse":
        return X, torch.randn(n, outputs, generator=generator, dtype=torch.float64)
    return X, torch.randint(0, outputs, (n,), generator=generator)


def no_bias_mlp():
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 5, bias=False), nn.SiLU(),
                         nn.Linear(5, 3, bias=False)).double()


MODELS = {
    "mlp-1": lambda act: build_model("mlp", (2, 3, 2), 3, width=5, depth=1, activation=act),
    "mlp-3": lambda act: build_model("mlp", (2, 3, 2), 3, width=5, depth=3, activation=act),
    "linear": lambda act: build_model("linear", (2, 3, 2), 3),
    "no-bias": lambda act: no_bias_mlp(),
}


def dense_batch_terms(model, loss_fn, X, Y, idx):
    """(g_B^T H_B g_B, |g_B|^2) of every index row, from dense derivatives."""
    out = []
    for rows in idx.tolist():
        g, H = dense_gradient(model, loss_fn, X[rows], Y[rows]), dense_hessian(model, loss_fn, X[rows], Y[rows])
        out.append(((g @ H @ g).item(), (g @ g).item()))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("loss_name", ["mse", "ce"])
@pytest.mark.parametrize("shape", sorted(MODELS))
def test_batch_terms_equal_dense_derivatives(activation, loss_name, shape):
    model = perturbed(MODELS[shape](activation).double())
    loss_fn = LOSSES[loss_name]
    X, Y = image_data(9, loss_name)
    idx = torch.stack([torch.randperm(9, generator=torch.Generator().manual_seed(k))[:4] for k in range(3)])
    expected = dense_batch_terms(model, loss_fn, X, Y, idx)
    net = linear_network(model, loss_fn, X, Y)
    # Batch by batch, and from every sample's quantities gathered per batch.
    gathered = net.batch_terms_of(net.sample_rows(X, Y).map(lambda t: t[idx]))
    for quadratic, norm2 in (net.batch_terms(X[idx], Y[idx]), gathered):
        torch.testing.assert_close(quadratic, expected[:, 0], rtol=1e-11, atol=1e-14)
        torch.testing.assert_close(norm2, expected[:, 1], rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("loss_name", ["mse", "ce"])
def test_directional_forms_gradient_and_batch_products_equal_dense_derivatives(activation, loss_name):
    model = perturbed(MODELS["mlp-3"](activation).double())
    loss_fn = LOSSES[loss_name]
    X, Y = image_data(11, loss_name)
    net = linear_network(model, loss_fn, X, Y)
    idx = torch.tensor([[0, 3, 5], [2, 3, 10], [1, 7, 8], [4, 6, 9]])
    H, g = dense_hessian(model, loss_fn, X, Y), dense_gradient(model, loss_fn, X, Y)
    G = torch.stack([dense_gradient(model, loss_fn, X[rows], Y[rows]) for rows in idx.tolist()], dim=1)
    for chunk_rows in (None, 4):
        forms = net.quadratic_forms(X, Y, X[idx], Y[idx], chunk_rows=chunk_rows)
        torch.testing.assert_close(forms, (G * (H @ G)).sum(0), rtol=1e-11, atol=1e-14)
    v = torch.randn(G.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(net.batch_dot(X[idx], Y[idx], net.split(v)), G.T @ v, rtol=1e-12, atol=1e-14)
    gradient = net.full_gradient(X, Y, chunk_rows=4)
    torch.testing.assert_close(torch.cat([torch.cat([w.reshape(-1), c]) for w, c in gradient]), g, rtol=1e-12, atol=1e-15)
    assert squared_norm(gradient) == pytest.approx((g @ g).item(), rel=1e-12)


def test_the_engine_applies_only_to_linear_chains_with_known_losses():
    X, Y = image_data(6, "mse")
    _, labels = image_data(6, "ce")
    mlp = build_model("mlp", (2, 3, 2), 3, width=4, depth=2)
    assert linear_network(mlp, LOSSES["mse"], X, Y) is not None
    assert linear_network(mlp, LOSSES["ce"], X, labels) is not None
    assert linear_network(tiny_mlp(), LOSSES["mse"], *tiny_data(5, "mse")) is not None
    soft = torch.softmax(Y, dim=1)
    frozen = build_model("mlp", (2, 3, 2), 3, width=4, depth=2)
    frozen[1].bias.requires_grad_(False)
    images = torch.randn(4, 3, 16, 16)
    rejected = [
        (build_model("cnn", (3, 16, 16), 3), LOSSES["mse"], images, Y[:4]),
        (build_model("resnet", (3, 16, 16), 3), LOSSES["mse"], images, Y[:4]),
        (tiny_mlp(batchnorm=True), LOSSES["mse"], *tiny_data(5, "mse")),
        (nn.Sequential(nn.Flatten(), nn.Linear(12, 3), nn.GELU("tanh"), nn.Linear(3, 3)),
         LOSSES["mse"], X.float(), Y.float()),
        (nn.Sequential(nn.Linear(2, 3)), LOSSES["mse"], X, Y),  # no Flatten before 4-d inputs
        (frozen, LOSSES["mse"], X, Y),
        (mlp, LOSSES["ce"], X, soft),  # soft ce targets
        (mlp, lambda out, y, reduction="mean": LOSSES["mse"](out, y, reduction), X, Y),
        (mlp, LOSSES["mse"], X, Y[:, :2]),  # targets not of the outputs' size
        (build_model("mlp", (2, 3, 2), 1, width=4), LOSSES["mse"], X, Y[:, 0]),  # (n,) broadcasts
    ]
    for model, loss_fn, inputs, targets in rejected:
        assert linear_network(model, loss_fn, inputs, targets) is None


def test_float32_agrees_with_float64():
    model = perturbed(build_model("mlp", (2, 3, 2), 3, width=16, depth=2, activation="tanh").double())
    X, Y = image_data(8, "ce")
    idx = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    want = linear_network(model, LOSSES["ce"], X, Y).batch_terms(X[idx], Y[idx])
    model = model.float()
    got = linear_network(model, LOSSES["ce"], X.float(), Y).batch_terms(X[idx].float(), Y[idx])
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=0)
