"""Model registry: the networks that ``--model`` selects.

Every model maps a batch of shape (n, *input_shape) to outputs of shape (n, output_dim),
also for output_dim 1. The forward passes use no in-place operations and the models without
BatchNorm carry no buffers, so they work unchanged with ``torch.func.functional_call``,
``vmap`` and ``jvp``.

Architectures (for CIFAR-10 input (3, 32, 32) and 10 outputs):
    mlp        flatten -> depth x [Linear(width), act] -> Linear(output_dim);
               width 512, depth 2: 1,841,162 parameters.
    cnn        Conv3x3(C->64), act, Conv3x3(64->64), act, MaxPool2, Conv3x3(64->128), act,
               MaxPool2, all unpadded with bias -> flatten -> Linear(512), act -> Linear;
               2,477,514 parameters.
    resnet     ResNet-20 (3 stages x 3 basic blocks, 16/32/64 channels, zero-padding
               shortcuts with stride-2 subsampling, global average pool, Linear(64->out)),
               convolutions without bias and without BatchNorm: 268,346 parameters.
    resnet_bn  the same ResNet-20 with BatchNorm2d after every convolution: 269,722.
    linear     one Linear layer from the flattened input to the outputs.
``width`` and ``depth`` shape the mlp only; ``activation`` applies to every model but linear.

Initialisation (unless ``no_init``): Kaiming-normal in fan-in mode scaled by ``init_scale``,
    W ~ N(0, (init_scale * gain / sqrt(fan_in))^2),   biases = 0,
    BatchNorm weight = 1 and bias = 0.
Every hidden layer (each convolution and each Linear but the last) uses the gain of the
network's activation: relu sqrt(2), tanh 5/3, and for silu and gelu, which have no standard
gain, the relu gain sqrt(2). The output layer (the last Linear, which is the whole linear
model) uses gain 1. Weights are drawn from a local ``torch.Generator`` seeded with
``init_seed``; with ``no_init`` the PyTorch default initialisation is kept, drawn after seeding
a forked global RNG with ``init_seed``. Either way the caller's global RNG state is unchanged.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.errors import UserError

MODEL_NAMES = ("mlp", "cnn", "resnet", "resnet_bn", "linear")
ACTIVATIONS = ("relu", "tanh", "silu", "gelu")

_ACTIVATION_MODULES = {"relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU, "gelu": nn.GELU}
# silu and gelu behave like relu for large |x|, hence the relu gain.
_ACTIVATION_GAINS = {
    "relu": math.sqrt(2.0),
    "tanh": 5.0 / 3.0,
    "silu": math.sqrt(2.0),
    "gelu": math.sqrt(2.0),
}
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_RESNET_STAGES = ((16, 1), (32, 2), (64, 2))
_RESNET_BLOCKS_PER_STAGE = 3


def build_model(
    name: str,
    input_shape,
    output_dim: int,
    *,
    width: int = 512,
    depth: int = 2,
    activation: str = "relu",
    init_scale: float = 0.2,
    init_seed: int = 8888,
    no_init: bool = False,
) -> nn.Module:
    """Build model ``name`` for inputs of shape ``input_shape`` (without batch dimension)."""
    input_shape = tuple(int(s) for s in input_shape)
    _check_arguments(name, input_shape, output_dim, width, depth, activation)
    # Layer constructors draw PyTorch's default init from the global RNG; fork it so the
    # caller's stream is untouched and the no_init weights depend on init_seed alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        builder = _BUILDERS[name]
        model = builder(input_shape, output_dim, width=width, depth=depth, activation=activation)
    if not no_init:
        generator = torch.Generator().manual_seed(init_seed)
        gain = _ACTIVATION_GAINS[activation]
        _kaiming_init(model, hidden_gain=gain, init_scale=init_scale, generator=generator)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of scalar trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def has_batchnorm(model: nn.Module) -> bool:
    """Whether any BatchNorm layer is present (its output then depends on the whole batch)."""
    return any(isinstance(m, _BATCHNORMS) for m in model.modules())


def _check_arguments(name, input_shape, output_dim, width, depth, activation):
    if name not in MODEL_NAMES:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if activation not in ACTIVATIONS:
        choices = ", ".join(ACTIVATIONS)
        raise UserError(f"unknown activation {activation!r}; choose one of {choices}")
    if width < 1 or depth < 1:
        raise UserError(
            f"width ({width}) and depth ({depth}) must be at least 1; pass --width and --depth >= 1"
        )
    if output_dim < 1:
        raise UserError(f"output dimension {output_dim} must be at least 1; check the data set")
    if len(input_shape) == 0 or min(input_shape) < 1:
        raise UserError(f"input shape {input_shape} is empty; check the data set")
    if name in ("cnn", "resnet", "resnet_bn") and len(input_shape) != 3:
        raise UserError(
            f"model {name} needs image inputs (channels, height, width), got shape {input_shape}; "
            "use --model mlp or linear for this data set"
        )
    if name == "cnn":
        side = min(_cnn_feature_size(input_shape[1]), _cnn_feature_size(input_shape[2]))
        if side < 1:
            raise UserError(
                f"input size {input_shape[1]}x{input_shape[2]} is too small for cnn "
                "(needs at least 12x12); use --model mlp or resnet, or a data set with larger "
                "images"
            )


def _cnn_feature_size(side: int) -> int:
    """Spatial side after conv3, conv3, pool2, conv3, pool2 (unpadded convolutions)."""
    return ((side - 4) // 2 - 2) // 2


def _build_mlp(input_shape, output_dim, *, width, depth, activation):
    act = _ACTIVATION_MODULES[activation]
    layers = [nn.Flatten()]
    in_features = math.prod(input_shape)
    for _ in range(depth):
        layers += [nn.Linear(in_features, width), act()]
        in_features = width
    layers.append(nn.Linear(in_features, output_dim))
    return nn.Sequential(*layers)


def _build_cnn(input_shape, output_dim, *, width, depth, activation):
    act = _ACTIVATION_MODULES[activation]
    channels, height, wide = input_shape
    features = 128 * _cnn_feature_size(height) * _cnn_feature_size(wide)
    return nn.Sequential(
        nn.Conv2d(channels, 64, 3),
        act(),
        nn.Conv2d(64, 64, 3),
        act(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3),
        act(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(features, 512),
        act(),
        nn.Linear(512, output_dim),
    )


def _build_linear(input_shape, output_dim, *, width, depth, activation):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), output_dim))


class _BasicBlock(nn.Module):
    """conv-norm-act-conv-norm plus a parameter-free shortcut, then act.

    When the block halves the resolution or widens the channels, the shortcut keeps every
    second pixel and zero-pads the new channels, so ``resnet`` has no 1x1 projection weights.
    """

    def __init__(self, in_channels, out_channels, stride, activation, batchnorm):
        super().__init__()
        norm = nn.BatchNorm2d if batchnorm else lambda _: nn.Identity()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.norm2 = norm(out_channels)
        self.act = _ACTIVATION_MODULES[activation]()
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def forward(self, x):
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + self._shortcut(x))

    def _shortcut(self, x):
        if self.stride == 1 and self.extra_channels == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        before = self.extra_channels // 2
        return F.pad(x, (0, 0, 0, 0, before, self.extra_channels - before))


class _ResNet20(nn.Module):
    def __init__(self, in_channels, output_dim, activation, batchnorm):
        super().__init__()
        norm = nn.BatchNorm2d if batchnorm else lambda _: nn.Identity()
        first_channels = _RESNET_STAGES[0][0]
        self.conv = nn.Conv2d(in_channels, first_channels, 3, padding=1, bias=False)
        self.norm = norm(first_channels)
        self.act = _ACTIVATION_MODULES[activation]()
        blocks = []
        channels = first_channels
        for stage_channels, stage_stride in _RESNET_STAGES:
            for i in range(_RESNET_BLOCKS_PER_STAGE):
                stride = stage_stride if i == 0 else 1
                blocks.append(_BasicBlock(channels, stage_channels, stride, activation, batchnorm))
                channels = stage_channels
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, output_dim)

    def forward(self, x):
        x = self.blocks(self.act(self.norm(self.conv(x))))
        return self.head(x.mean(dim=(2, 3)))


def _build_resnet(input_shape, output_dim, *, width, depth, activation):
    return _ResNet20(input_shape[0], output_dim, activation, batchnorm=False)


def _build_resnet_bn(input_shape, output_dim, *, width, depth, activation):
    return _ResNet20(input_shape[0], output_dim, activation, batchnorm=True)


_BUILDERS = {
    "mlp": _build_mlp,
    "cnn": _build_cnn,
    "resnet": _build_resnet,
    "resnet_bn": _build_resnet_bn,
    "linear": _build_linear,
}


@torch.no_grad()
def _kaiming_init(model, *, hidden_gain, init_scale, generator):
    """W ~ N(0, (init_scale * gain / sqrt(fan_in))^2), gain 1 on the last Linear; zero biases."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    output_layer = [m for m in layers if isinstance(m, nn.Linear)][-1]
    for layer in layers:
        gain = 1.0 if layer is output_layer else hidden_gain
        fan_in = layer.weight[0].numel()
        std = init_scale * gain / math.sqrt(fan_in)
        noise = torch.randn(layer.weight.shape, generator=generator, dtype=layer.weight.dtype)
        layer.weight.copy_(noise * std)
        if layer.bias is not None:
            layer.bias.zero_()
    for norm in model.modules():
        if isinstance(norm, _BATCHNORMS):
            norm.weight.fill_(1.0)
            norm.bias.zero_()
