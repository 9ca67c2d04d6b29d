import math

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, jvp, vmap

from utils.errors import UserError
from utils.models import (
    ACTIVATIONS,
    MODEL_NAMES,
    build_model,
    count_parameters,
    has_batchnorm,
)

CIFAR = (3, 32, 32)
DIGITS = (1, 8, 8)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize(
    "name, count",
    [("mlp", 1_841_162), ("cnn", 2_477_514), ("resnet", 268_346), ("linear", 3072 * 10 + 10)],
)
def test_cifar_parameter_counts(name, count):
    assert count_parameters(build_model(name, CIFAR, 10)) == count


def test_resnet_bn_adds_two_parameters_per_channel_of_each_conv():
    # 7 convs with 16 channels, 6 with 32, 6 with 64.
    bn_params = 2 * (7 * 16 + 6 * 32 + 6 * 64)
    assert count_parameters(build_model("resnet_bn", CIFAR, 10)) == 268_346 + bn_params


def test_digits_parameter_counts_follow_the_formula():
    d, w, c = 64, 512, 10
    expected = (d * w + w) + (w * w + w) + (w * c + c)
    assert count_parameters(build_model("mlp", DIGITS, c)) == expected
    w, depth = 7, 3
    mlp = build_model("mlp", DIGITS, c, width=w, depth=depth)
    assert count_parameters(mlp) == (d * w + w) + (depth - 1) * (w * w + w) + (w * c + c)
    assert count_parameters(build_model("linear", DIGITS, c)) == d * c + c


@pytest.mark.parametrize("name", ["mlp", "resnet", "resnet_bn", "linear"])
@pytest.mark.parametrize("output_dim", [1, 10])
def test_output_shape_on_digits(name, output_dim):
    model = build_model(name, DIGITS, output_dim, width=16)
    assert model(torch.randn(5, *DIGITS)).shape == (5, output_dim)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_shape_on_cifar(name):
    model = build_model(name, CIFAR, 10, width=16)
    assert model(torch.randn(2, *CIFAR)).shape == (2, 10)


@pytest.mark.parametrize("shape", [(1, 8, 8), (5, 9, 7), (3, 1, 1)])
def test_resnet_takes_any_channel_count_and_size(shape):
    model = build_model("resnet", shape, 3)
    assert model(torch.randn(2, *shape)).shape == (2, 3)


def test_cnn_rejects_too_small_input_before_building():
    with pytest.raises(UserError, match="too small for cnn") as info:
        build_model("cnn", DIGITS, 10)
    assert "\n" not in str(info.value)
    assert "--model" in str(info.value)
    with pytest.raises(UserError, match="too small for cnn"):
        build_model("cnn", (3, 11, 32), 10)
    assert build_model("cnn", (3, 12, 12), 4)(torch.randn(1, 3, 12, 12)).shape == (1, 4)


def test_image_models_reject_flat_input():
    for name in ("cnn", "resnet", "resnet_bn"):
        with pytest.raises(UserError, match="channels, height, width"):
            build_model(name, (64,), 10)
    assert build_model("mlp", (64,), 2, width=4)(torch.randn(3, 64)).shape == (3, 2)


def test_bad_names_and_sizes_raise_user_error_with_choices():
    with pytest.raises(UserError) as info:
        build_model("vgg", CIFAR, 10)
    assert all(name in str(info.value) for name in MODEL_NAMES)
    with pytest.raises(UserError) as info:
        build_model("mlp", DIGITS, 10, activation="sigmoid")
    assert all(name in str(info.value) for name in ACTIVATIONS)
    for kwargs in ({"width": 0}, {"depth": 0}):
        with pytest.raises(UserError, match="at least 1"):
            build_model("mlp", DIGITS, 10, **kwargs)
    with pytest.raises(UserError, match="at least 1"):
        build_model("mlp", DIGITS, 0)


@pytest.mark.parametrize("no_init", [False, True])
def test_init_is_reproducible_and_leaves_global_rng_alone(no_init):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = _params(build_model("resnet", DIGITS, 10, init_seed=1, no_init=no_init))
    assert torch.equal(torch.get_rng_state(), state)
    b = _params(build_model("resnet", DIGITS, 10, init_seed=1, no_init=no_init))
    c = _params(build_model("resnet", DIGITS, 10, init_seed=2, no_init=no_init))
    assert _same(a, b)
    # Only the head has a bias; with our init it is zero under every seed.
    assert not any(torch.equal(x, y) for x, y in zip(a, c) if x.dim() > 1)


def test_no_init_keeps_pytorch_defaults():
    ours = build_model("mlp", DIGITS, 10, width=32)
    default = build_model("mlp", DIGITS, 10, width=32, no_init=True)
    assert not any(torch.equal(x, y) for x, y in zip(_params(ours), _params(default)))
    # PyTorch's default Linear init is uniform on +-1/sqrt(fan_in) for weights and biases.
    first = default[1]
    assert first.bias.abs().max() > 0
    assert first.weight.abs().max() <= 1 / math.sqrt(64)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_biases_zero_and_batchnorm_identity(name):
    shape = CIFAR if name == "cnn" else DIGITS
    model = build_model(name, shape, 10, width=16)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
            assert torch.equal(module.bias, torch.zeros_like(module.bias))
        if isinstance(module, nn.BatchNorm2d):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.equal(module.bias, torch.zeros_like(module.bias))
    assert has_batchnorm(model) == (name == "resnet_bn")


def _assert_std(weight, expected, rel):
    assert weight.mean().abs() < 5 * expected / math.sqrt(weight.numel())
    assert weight.std().item() == pytest.approx(expected, rel=rel)


@pytest.mark.parametrize(
    "activation, gain", [("relu", math.sqrt(2)), ("tanh", 5 / 3), ("gelu", math.sqrt(2))]
)
def test_mlp_weight_std_is_scaled_kaiming(activation, gain):
    # Hidden layer: 1024 * 512 weights, relative std error about 0.1%.
    # Output layer: 512 * 20 weights, relative std error about 0.7%.
    model = build_model("mlp", (1, 32, 32), 20, activation=activation, init_scale=0.3)
    _assert_std(model[1].weight, 0.3 * gain / math.sqrt(1024), rel=0.01)
    _assert_std(model[-1].weight, 0.3 * 1.0 / math.sqrt(512), rel=0.04)


def test_conv_weight_std_uses_fan_in_of_the_kernel():
    cnn = build_model("cnn", CIFAR, 10, init_scale=0.2)
    conv = cnn[5]
    assert isinstance(conv, nn.Conv2d) and conv.weight.shape == (128, 64, 3, 3)
    _assert_std(conv.weight, 0.2 * math.sqrt(2) / math.sqrt(64 * 9), rel=0.02)


def test_linear_model_uses_gain_one():
    model = build_model("linear", (1, 32, 32), 100, activation="tanh", init_scale=0.5)
    _assert_std(model[1].weight, 0.5 / math.sqrt(1024), rel=0.02)


def test_activations_are_selectable():
    x = torch.randn(4, *DIGITS)
    outputs = []
    for activation, module_type in zip(ACTIVATIONS, (nn.ReLU, nn.Tanh, nn.SiLU, nn.GELU)):
        model = build_model("mlp", DIGITS, 3, width=8, activation=activation)
        types = {type(m) for m in model.modules()}
        assert module_type in types
        assert not types & ({nn.ReLU, nn.Tanh, nn.SiLU, nn.GELU} - {module_type})
        outputs.append(model(x))
    for i in range(len(outputs)):
        for j in range(i):
            assert not torch.allclose(outputs[i], outputs[j])


def test_resnet_without_batchnorm_has_no_buffers():
    assert list(build_model("resnet", DIGITS, 10).buffers()) == []
    assert list(build_model("resnet_bn", DIGITS, 10).buffers()) != []


@pytest.mark.parametrize(
    "name, shape",
    [("mlp", DIGITS), ("cnn", (2, 12, 12)), ("resnet", (2, 6, 6)), ("linear", DIGITS)],
)
def test_functional_call_vmap_and_jvp(name, shape):
    # tanh keeps the finite-difference check away from kinks.
    model = build_model(name, shape, 3, width=8, activation="tanh").double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(4, *shape, dtype=torch.float64)
    expected = model(x)
    torch.testing.assert_close(functional_call(model, params, (x,)), expected)

    def per_sample(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    torch.testing.assert_close(vmap(per_sample, in_dims=(None, 0))(params, x), expected)

    tangent = {k: torch.randn_like(v) for k, v in params.items()}
    out, directional = jvp(lambda p: functional_call(model, p, (x,)), (params,), (tangent,))
    torch.testing.assert_close(out, expected)
    eps = 1e-6
    plus = functional_call(model, {k: params[k] + eps * tangent[k] for k in params}, (x,))
    minus = functional_call(model, {k: params[k] - eps * tangent[k] for k in params}, (x,))
    torch.testing.assert_close(directional, (plus - minus) / (2 * eps), rtol=1e-5, atol=1e-7)
