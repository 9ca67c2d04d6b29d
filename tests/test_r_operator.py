import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from curvature_reference import LOSSES, dense_gradient, dense_hessian
from utils.hvp import flatten, split
from utils.models import build_model
from utils.r_operator import ChainCurvature, is_chain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACTIVATIONS = [nn.ReLU, nn.Tanh, nn.SiLU, nn.GELU]


def small_cnn(activation, seed=0):
    """Strided, padded, dilated and bias-free convolutions, ceil-mode padded pooling, two Linears."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1, stride=2), activation(),
            nn.Conv2d(3, 2, 2, bias=False, dilation=2), activation(),
            nn.MaxPool2d(2, ceil_mode=True, padding=1), nn.Flatten(),
            nn.Linear(8, 4), activation(), nn.Linear(4, 3)).double()


def data(n, loss_name, shape, seed=2):
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(n, *shape, generator=generator, dtype=torch.float64)
    if loss_name == "ce":
        return X, torch.randint(0, 3, (n,), generator=generator)
    return X, torch.randn(n, 3, generator=generator, dtype=torch.float64)


def check_against_dense(model, loss_name, X, Y):
    loss_fn = LOSSES[loss_name]
    params = list(model.parameters())
    H = dense_hessian(model, loss_fn, X, Y)
    chain = ChainCurvature(model, loss_fn, X, Y)
    V = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    for j in range(3):
        torch.testing.assert_close(flatten(chain.product(split(V[:, j], params))), H @ V[:, j], rtol=0, atol=1e-12)
    # A block through vmap, each parameter's tangents stacked along a first axis.
    block = [torch.stack(pieces) for pieces in zip(*(split(V[:, j], params) for j in range(3)))]
    products = chain.products(block)
    stacked = torch.cat([p.reshape(3, -1) for p in products], dim=1).T
    torch.testing.assert_close(stacked, H @ V, rtol=0, atol=1e-12)
    forms = (V * (H @ V)).sum(0)
    for j in range(3):
        assert chain.quadratic_form(split(V[:, j], params)).item() == pytest.approx(forms[j].item(), rel=1e-12)
    torch.testing.assert_close(chain.quadratic_forms(block), forms, rtol=1e-12, atol=0)
    torch.testing.assert_close(flatten(chain.gradient()), dense_gradient(model, loss_fn, X, Y), rtol=0, atol=1e-14)
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("loss_name", ["mse", "ce"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_products_match_the_dense_hessian_of_a_cnn(activation, loss_name):
    X, Y = data(6, loss_name, (2, 9, 9))
    check_against_dense(small_cnn(activation), loss_name, X, Y)


def test_products_match_the_dense_hessian_of_mlps():
    X, Y = data(7, "ce", (3, 2, 2))
    torch.manual_seed(3)
    check_against_dense(nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 3)).double(), "ce", X, Y)
    # An activation on the data, before any parameter, and a Linear without bias.
    check_against_dense(nn.Sequential(nn.Tanh(), nn.Flatten(), nn.Linear(12, 4, bias=False), nn.SiLU(),
                                      nn.Linear(4, 3)).double(), "mse", X, Y[:, None].double().expand(7, 3))


def test_the_project_models_are_chains():
    assert is_chain(build_model("cnn", (3, 12, 12), 10))
    assert is_chain(build_model("mlp", (3, 4, 4), 10))
    assert is_chain(build_model("linear", (3, 4, 4), 10))
    assert not is_chain(build_model("resnet", (3, 12, 12), 10))
    assert not is_chain(build_model("resnet_bn", (3, 12, 12), 10))


def test_other_layers_are_not_chains():
    frozen = small_cnn(nn.ReLU)
    frozen[0].bias.requires_grad_(False)
    shared = nn.Linear(3, 3)
    own = nn.Sequential(nn.Linear(3, 3))
    own.register_parameter("extra", nn.Parameter(torch.ones(1)))
    rejected = [
        frozen, own, nn.Sequential(shared, nn.ReLU(), shared),
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)),
        nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")),
        nn.Sequential(nn.Conv2d(1, 2, 3, padding="same")),
        nn.Sequential(nn.Linear(3, 3), nn.GELU(approximate="tanh")),
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.AvgPool2d(2)),
        nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1)),
        nn.Sequential(nn.ReLU(), nn.Flatten()),  # no parameters
        nn.Linear(3, 3),  # not a Sequential
    ]
    for model in rejected:
        assert not is_chain(model)
    with pytest.raises(ValueError, match="chains"):
        ChainCurvature(rejected[0], LOSSES["mse"], torch.zeros(1, 2, 9, 9), torch.zeros(1, 3))


def test_products_match_the_dense_hessian_of_unusual_chains():
    X, Y = data(5, "mse", (4, 9, 9))
    torch.manual_seed(4)
    # Grouped convolutions, overlapping padded pooling, in-place activations (one right after the
    # first layer, whose output is where theta enters) and a chain that ends in an activation.
    check_against_dense(nn.Sequential(
        nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2, groups=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1), nn.Conv2d(4, 2, (2, 1), stride=(1, 2)), nn.SiLU(inplace=True),
        nn.Flatten(), nn.Linear(8, 3), nn.Tanh()).double(), "mse", X, Y)
    # Linear layers on 3-d inputs and max pooling of each sample's (rows, columns).
    X3 = torch.randn(5, 4, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    check_against_dense(nn.Sequential(nn.Linear(6, 6), nn.GELU(), nn.MaxPool2d(2), nn.Flatten(),
                                      nn.Linear(6, 3)).double(), "ce", X3, data(5, "ce", (1,))[1])


def test_the_cache_is_a_snapshot_at_theta():
    model, loss_fn = small_cnn(nn.Tanh), LOSSES["mse"]
    X, Y = data(4, "mse", (2, 9, 9))
    V = torch.randn(sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(7),
                    dtype=torch.float64)
    want = dense_hessian(model, loss_fn, X, Y) @ V
    chain = ChainCurvature(model, loss_fn, X, Y)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    torch.testing.assert_close(flatten(chain.product(split(V, list(model.parameters())))), want, rtol=0, atol=1e-12)


def test_no_torch_deprecation_warning_reaches_the_user():
    """torch's forward-mode decompositions warn about torch.jit.script when a process first
    loads them; a fresh process with that warning made an error must still measure."""
    code = ("import torch; from utils.models import build_model; from utils.losses import mse_loss; "
            "from utils.r_operator import ChainCurvature; torch.manual_seed(0); m = build_model('cnn', (1, 12, 12), 2, width=4); "
            "c = ChainCurvature(m, mse_loss, torch.randn(3, 1, 12, 12), torch.randn(3, 2)); "
            "print(float(c.quadratic_form([torch.ones_like(p) for p in m.parameters()])))")
    done = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", code], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert math.isfinite(float(done.stdout))
