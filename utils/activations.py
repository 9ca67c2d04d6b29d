"""Element-wise activations whose first and second derivatives the fast curvature paths use.

With s the logistic sigmoid, Phi and phi the normal cdf and density:

    relu' = [z > 0],  relu'' = 0          (as autograd differentiates relu)
    tanh' = 1 - t^2,  tanh'' = -2 t (1 - t^2)                      (t = tanh z)
    silu' = s (1 + z (1 - s)),  silu'' = s (1 - s) (2 + z (1 - 2 s))
    gelu' = Phi + z phi,  gelu'' = phi (2 - z^2)                   (exact gelu only)
"""

import math

import torch
from torch import nn

_NAMES = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.SiLU: "silu"}


def activation_name(module: nn.Module) -> str | None:
    """The name of an activation module with known derivatives, else None."""
    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else None
    return _NAMES.get(type(module))


def activate(name: str, z: torch.Tensor):
    """(act(z), act'(z), act''(z) or None where it is zero)."""
    if name == "relu":
        return torch.relu(z), (z > 0).to(z.dtype), None
    if name == "tanh":
        t = torch.tanh(z)
        d1 = 1 - t * t
        return t, d1, -2 * t * d1
    if name == "silu":
        s = torch.sigmoid(z)
        return z * s, s * (1 + z * (1 - s)), s * (1 - s) * (2 + z * (1 - 2 * s))
    if name == "gelu":
        cdf = 0.5 * (1 + torch.erf(z * (1 / math.sqrt(2))))
        pdf = torch.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi))
        return z * cdf, cdf + z * pdf, pdf * (2 - z * z)
    raise ValueError(f"no derivatives for activation {name!r}")
