"""Train-mode BatchNorm over a batch whose rows are split over the ranks: the whole batch's statistics.

In train mode a BatchNorm layer normalises each channel by the mean and the biased variance of
the batch (over its rows and spatial positions), so the loss of one row depends on every other
row of the batch. Over the K ranks of a launch, each holding some rows, that is the
single-process loss only with the statistics of the whole batch,

    N = sum_r N_r,    mu = (1/N) sum_r sum_{x in rank r} x,    sigma^2 = (1/N) sum_r sum_{x in rank r} (x - mu)^2,

every sum over the ranks an all-reduce (as ``torch.nn.SyncBatchNorm`` does on GPUs; it runs
neither on the CPU nor through a double backward). The all-reduce here is differentiable, and
its derivative is again an all-reduce (d/dx_r of sum_s x_s passes the sum of every rank's
upstream gradients to each rank), so a backward pass gives each rank its part of the gradient
of the sum of the ranks' losses, and a double backward its part of a Hessian-vector product of
that sum; summed over the ranks, they are those of one process on the whole batch.

Two rules follow for callers: every rank runs every coupled forward and backward pass, one
without rows included (the all-reduces are collective and must come in the same order), and
each rank's loss already carries its share, (1/b) sum over its rows (:func:`share_of_mean`):
a derivative taken through the coupling cannot be reweighted afterwards. Running statistics,
when tracked, move with the whole batch's mean and unbiased variance, as in one process.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from utils.distributed import all_reduce_sum


def couples_rows(model: torch.nn.Module, train_mode: bool) -> bool:
    """Whether the loss of a row depends on the batch's other rows: BatchNorm in train mode."""
    return train_mode and any(isinstance(m, _BatchNorm) for m in model.modules())


def share_of_mean(loss_fn, total: int):
    """The loss ``(1/total) sum over the rows given``: this rank's share of the mean over ``total`` rows."""

    def share(outputs, targets):
        return loss_fn(outputs, targets, reduction="sum") / total

    return share


@contextmanager
def whole_batch_statistics(model: torch.nn.Module):
    """Inside, every BatchNorm layer of ``model`` in train mode uses the statistics of the rows
    that all ranks pass through it together; in eval mode it uses its running statistics, as always."""
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and "forward" not in m.__dict__]
    for m in layers:
        m.forward = _whole_batch_forward.__get__(m)
    try:
        yield
    finally:
        for m in layers:
            del m.forward


class _SumOverRanks(torch.autograd.Function):
    """sum_r x_r on every rank; its derivative is the same sum of the incoming gradients."""

    @staticmethod
    def forward(ctx, x):
        return all_reduce_sum(x.contiguous().clone())

    @staticmethod
    def backward(ctx, grad):
        return _SumOverRanks.apply(grad)


def _whole_batch_forward(layer: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    if not layer.training and layer.running_mean is not None:
        return type(layer).forward(layer, x)
    layer._check_input_dim(x)
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    rows = all_reduce_sum(torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)).item()
    count = rows * math.prod(x.shape[2:])
    if count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got {count} over the ranks")
    mean = _SumOverRanks.apply(x.sum(dims)) / count
    centred = x - mean.reshape(shape)
    var = _SumOverRanks.apply((centred * centred).sum(dims)) / count
    out = centred * torch.rsqrt(var + layer.eps).reshape(shape)
    if layer.affine:
        out = out * layer.weight.reshape(shape) + layer.bias.reshape(shape)
    if layer.track_running_stats and layer.running_mean is not None:
        with torch.no_grad():
            layer.num_batches_tracked.add_(1)
            factor = 1.0 / float(layer.num_batches_tracked) if layer.momentum is None else layer.momentum
            layer.running_mean.lerp_(mean.detach().to(layer.running_mean), factor)
            layer.running_var.lerp_((var.detach() * (count / (count - 1))).to(layer.running_var), factor)
    return out
