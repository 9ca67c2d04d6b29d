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
    vit        a small vision transformer: non-overlapping ``patch`` x ``patch`` patches, each
               flattened and mapped by Linear(C p^2 -> width), plus learned position
               embeddings; ``depth`` pre-norm blocks x <- x + MHSA(LN(x)),
               x <- x + MLP(LN(x)) with ``heads`` heads of width/heads and an MLP
               Linear(width -> 2 width), act, Linear(2 width -> width); a final LayerNorm,
               mean pooling over the patches, Linear(width -> output_dim). Width 64, depth 2,
               4 heads, patch 2 on 8x8 digits: 69,066 parameters.
``width`` and ``depth`` shape the mlp and the vit, ``heads`` and ``patch`` the vit; each model
has its own defaults (:data:`SHAPE_DEFAULTS`, :func:`resolved_shape`); ``activation`` applies
to every model but linear.

Initialisation (unless ``no_init``): Kaiming-normal in fan-in mode scaled by ``init_scale``,
    W ~ N(0, (init_scale * gain / sqrt(fan_in))^2),   biases = 0,
    BatchNorm and LayerNorm weight = 1 and bias = 0; the vit's position embeddings
    ~ N(0, (0.02 init_scale / 0.2)^2), that is N(0, 0.02^2) at the default init_scale.
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

MODEL_NAMES = ("mlp", "cnn", "resnet", "resnet_bn", "linear", "vit")

# (width, depth) of each model when --width and --depth are not given; only mlp and vit use them.
SHAPE_DEFAULTS = {"vit": (64, 2)}
MLP_SHAPE = (512, 2)
VIT_HEADS = 4
_VIT_MLP_RATIO = 2
_POSITION_STD = 0.02 / 0.2  # per unit of init_scale: 0.02 at the default 0.2
ACTIVATIONS = ("relu", "tanh", "silu", "gelu")

_ACTIVATION_MODULES = {"relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU, "gelu": nn.GELU}
# silu and gelu behave like relu for large |x|, hence the relu gain.
_ACTIVATION_GAINS = {
    "relu": math.sqrt(2.0),
    "tanh": 5.0 / 3.0,
    "silu": math.sqrt(2.0),
    "gelu": math.sqrt(2.0),
}
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
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
    heads: int | None = None,
    patch: int | None = None,
) -> nn.Module:
    """Build model ``name`` for inputs of shape ``input_shape`` (without batch dimension);
    the vit's ``heads`` and ``patch`` default to :func:`resolved_shape`'s."""
    input_shape = tuple(int(s) for s in input_shape)
    _check_arguments(name, input_shape, output_dim, width, depth, activation)
    shape = {}
    if name == "vit":
        resolved = resolved_shape(name, input_shape, width=width, depth=depth, heads=heads, patch=patch)
        shape = {"heads": resolved["heads"], "patch": resolved["patch"]}
        _check_vit(input_shape, width, **shape)
    # Layer constructors draw PyTorch's default init from the global RNG; fork it so the
    # caller's stream is untouched and the no_init weights depend on init_seed alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        builder = _BUILDERS[name]
        model = builder(input_shape, output_dim, width=width, depth=depth, activation=activation, **shape)
    if not no_init:
        generator = torch.Generator().manual_seed(init_seed)
        gain = _ACTIVATION_GAINS[activation]
        _kaiming_init(model, hidden_gain=gain, init_scale=init_scale, generator=generator)
    return model


def resolved_shape(name: str, input_shape, *, width=None, depth=None, heads=None, patch=None) -> dict:
    """{width, depth, heads, patch} with every None replaced by the model's default: width and
    depth from :data:`SHAPE_DEFAULTS` (the mlp's 512 x 2 otherwise); for the vit 4 heads and
    patch 2 on images of side at most 16 (8x8 digits: 16 patches), else 4 (32x32: 64 patches).
    ``heads`` and ``patch`` stay None for the other models, which have neither."""
    default_width, default_depth = SHAPE_DEFAULTS.get(name, MLP_SHAPE)
    resolved = {"width": default_width if width is None else width, "depth": default_depth if depth is None else depth,
                "heads": heads, "patch": patch}
    if name == "vit":
        side = max(tuple(input_shape)[1:], default=1)
        resolved["heads"] = VIT_HEADS if heads is None else heads
        resolved["patch"] = (2 if side <= 16 else 4) if patch is None else patch
    return resolved


def count_parameters(model: nn.Module) -> int:
    """Number of scalar trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def has_batchnorm(model: nn.Module) -> bool:
    """Whether any BatchNorm layer is present (its output then depends on the whole batch)."""
    return any(isinstance(m, BATCHNORMS) for m in model.modules())


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
    if name == "vit" and len(input_shape) != 3:
        raise UserError(f"model vit needs image inputs (channels, height, width), got shape {input_shape}; "
                        "use --model mlp for this data set")
    if name == "cnn":
        side = min(_cnn_feature_size(input_shape[1]), _cnn_feature_size(input_shape[2]))
        if side < 1:
            raise UserError(
                f"input size {input_shape[1]}x{input_shape[2]} is too small for cnn "
                "(needs at least 12x12); use --model mlp or resnet, or a data set with larger "
                "images"
            )


def _check_vit(input_shape, width, *, heads, patch):
    _, height, wide = input_shape
    if heads < 1 or width % heads:
        raise UserError(f"--heads {heads} must divide --width {width}; choose heads such as 1, 2 or 4")
    if patch < 1 or height % patch or wide % patch:
        raise UserError(f"--patch {patch} must divide the image size {height}x{wide}; choose a divisor of both")


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


class _SelfAttention(nn.Module):
    """Multi-head self-attention softmax(Q K^T / sqrt(d_head)) V, written out so that every
    Hessian product (double backward, forward-over-reverse, vmap) runs through it."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x):
        n, tokens, width = x.shape
        q, k, v = self.qkv(x).reshape(n, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(width // self.heads), dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(n, tokens, width))


class _TransformerBlock(nn.Module):
    def __init__(self, width, heads, activation):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = _SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, _VIT_MLP_RATIO * width), _ACTIVATION_MODULES[activation](),
                                 nn.Linear(_VIT_MLP_RATIO * width, width))

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _ViT(nn.Module):
    def __init__(self, input_shape, output_dim, *, width, depth, heads, patch, activation):
        super().__init__()
        channels, height, wide = input_shape
        self.patch = patch
        self.embed = nn.Linear(channels * patch * patch, width)
        self.position = nn.Parameter(torch.zeros(1, (height // patch) * (wide // patch), width))
        self.blocks = nn.Sequential(*(_TransformerBlock(width, heads, activation) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, output_dim)

    def forward(self, x):
        p = self.patch
        n, channels = x.shape[:2]
        patches = x.unfold(2, p, p).unfold(3, p, p)  # (n, C, H/p, W/p, p, p)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(n, -1, channels * p * p)
        tokens = self.blocks(self.embed(patches) + self.position)
        return self.head(self.norm(tokens).mean(dim=1))


def _build_vit(input_shape, output_dim, *, width, depth, activation, heads, patch):
    return _ViT(input_shape, output_dim, width=width, depth=depth, heads=heads, patch=patch, activation=activation)


_BUILDERS = {
    "mlp": _build_mlp,
    "cnn": _build_cnn,
    "resnet": _build_resnet,
    "resnet_bn": _build_resnet_bn,
    "linear": _build_linear,
    "vit": _build_vit,
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
        if isinstance(norm, (*BATCHNORMS, nn.LayerNorm)):
            norm.weight.fill_(1.0)
            norm.bias.zero_()
    if isinstance(model, _ViT):
        noise = torch.randn(model.position.shape, generator=generator, dtype=model.position.dtype)
        model.position.copy_(noise * _POSITION_STD * init_scale)
