"""An example model file for ``training.py --model examples/residual_mlp.py:residual_mlp``.

A model file holds a function ``f(input_shape, num_outputs, **kwargs)`` that returns an
``nn.Module`` mapping a batch (n, *input_shape) to (n, num_outputs); ``--model-args`` passes the
keyword arguments as JSON, such as ``--model-args '{"depth": 3}'``. The module keeps its own
initialisation (PyTorch's defaults here), drawn under ``--init-seed``.
"""

import math

from torch import nn


class ResidualBlock(nn.Module):
    """x + W2 act(W1 LayerNorm(x)): a pre-norm residual MLP block."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.inner = nn.Linear(width, 2 * width)
        self.outer = nn.Linear(2 * width, width)
        self.act = nn.GELU()

    def forward(self, x):
        return x + self.outer(self.act(self.inner(self.norm(x))))


def residual_mlp(input_shape, num_outputs, width=64, depth=2):
    """Flatten, embed to ``width``, ``depth`` residual blocks, a final LayerNorm and a linear read-out."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), width),
        *(ResidualBlock(width) for _ in range(depth)),
        nn.LayerNorm(width),
        nn.Linear(width, num_outputs),
    )
