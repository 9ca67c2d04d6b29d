"""Losses with the paper's conventions.

mse: per-sample squared error summed over outputs, no 1/2, averaged over samples,
    L = (1/n) sum_i sum_c (f_c(x_i) - y_ic)^2.
    With this convention the GD stability threshold is lambda_max(H) = 2/eta exactly as in the
    paper's figures.
ce: cross-entropy with integer class labels, averaged over samples.

Every loss is available per sample (``reduction='none'``) because weighted sums of
per-sample losses drive Monte Carlo estimators and noisy-GD baselines.
"""

import torch
import torch.nn.functional as F

LOSS_NAMES = ("mse", "ce")


def mse_loss(outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """sum_c (f_c - y_c)^2 per sample; ``mean`` (default), ``sum`` or ``none`` over samples."""
    squares = (outputs - targets).pow(2)
    # flatten(1) and not reshape(n, -1): a rank of a launch may hold no rows of a batch.
    per_sample = squares.flatten(1).sum(dim=1) if squares.dim() > 1 else squares
    return _reduce(per_sample, reduction)


def ce_loss(outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits ``outputs`` (n, C) against integer labels ``targets`` (n,)."""
    return F.cross_entropy(outputs, targets, reduction=reduction)


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "none":
        return per_sample
    raise ValueError(f"unknown reduction {reduction!r}")


def get_loss(name: str):
    """The loss function called ``name``: ``fn(outputs, targets, reduction='mean')``."""
    if name == "mse":
        return mse_loss
    if name == "ce":
        return ce_loss
    raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}")


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of correct predictions.

    One output: the sign of f against the sign of a +-1 target. Several outputs: argmax of f
    against the integer label, or against the argmax of a one-hot target.
    """
    if outputs.shape[-1] == 1 or outputs.dim() == 1:
        predicted = torch.sign(outputs.reshape(-1))
        return (predicted == torch.sign(targets.reshape(-1))).float().mean().item()
    labels = targets if targets.dim() == 1 else targets.argmax(dim=1)
    return (outputs.argmax(dim=1) == labels).float().mean().item()
