"""Tiny float64 networks and dense reference derivatives for the curvature tests.

The references differentiate the loss as a function of the flat parameter vector with
``torch.func``, independently of utils/hvp.py. The dense Hessian is ``jacrev(grad(loss))``:
``torch.func.hessian`` (jacfwd over jacrev) and ``jacrev(jacrev(...))`` return wrong second
derivatives through training-mode ``batch_norm`` in torch 2.14 (see
pytorch/pytorch#196699), while reverse over ``grad`` agrees with finite differences.
"""

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from utils.losses import ce_loss, mse_loss

LOSSES = {"mse": mse_loss, "ce": ce_loss}


def tiny_mlp(seed=0, batchnorm=False):
    """3 -> 4 -> 2 tanh MLP in float64 (BatchNorm1d after the hidden layer if asked)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        hidden = [nn.Linear(3, 4), nn.BatchNorm1d(4)] if batchnorm else [nn.Linear(3, 4)]
        model = nn.Sequential(*hidden, nn.Tanh(), nn.Linear(4, 2)).double()
        if batchnorm:
            # Non-trivial affine BatchNorm parameters so every Hessian block is exercised.
            nn.init.normal_(model[1].weight, 1.0, 0.3)
            nn.init.normal_(model[1].bias, 0.0, 0.3)
    return model


def tiny_data(n, loss_name, seed=1):
    """n inputs in R^3 with regression targets in R^2 (mse) or labels in {0, 1} (ce)."""
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    if loss_name == "mse":
        Y = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    else:
        Y = torch.randint(0, 2, (n,), generator=generator)
    return X, Y


def _flat_loss(model, loss_fn, X, Y, train_mode):
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    sizes = [p.numel() for _, p in named]
    previous = model.training

    def loss(flat):
        # Fresh copies inside the transformed function: BatchNorm may update them in place.
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        pieces = flat.split(sizes)
        params = {name: piece.view_as(p) for (name, p), piece in zip(named, pieces)}
        model.train(train_mode)
        try:
            return loss_fn(functional_call(model, {**params, **buffers}, (X,)), Y)
        finally:
            model.train(previous)

    flat = torch.cat([p.detach().reshape(-1) for _, p in named])
    return loss, flat


def dense_hessian(model, loss_fn, X, Y, train_mode=True):
    loss, flat = _flat_loss(model, loss_fn, X, Y, train_mode)
    return torch.func.jacrev(torch.func.grad(loss))(flat)


def finite_difference_hessian(model, loss_fn, X, Y, train_mode=True, eps=1e-5):
    """Central differences of the gradient, column by column (truncation error about 1e-7 here)."""
    loss, flat = _flat_loss(model, loss_fn, X, Y, train_mode)
    grad = torch.func.grad(loss)
    basis = torch.eye(flat.numel(), dtype=flat.dtype)
    return torch.stack([(grad(flat + eps * e) - grad(flat - eps * e)) / (2 * eps) for e in basis],
                       dim=1)


def dense_gradient(model, loss_fn, X, Y, train_mode=True):
    loss, flat = _flat_loss(model, loss_fn, X, Y, train_mode)
    return torch.func.grad(loss)(flat)


def dense_loss(model, loss_fn, X, Y, train_mode=True):
    loss, flat = _flat_loss(model, loss_fn, X, Y, train_mode)
    return loss(flat).item()


def check_honest(values, ses, exact):
    """Repeated Monte Carlo estimates and their standard errors against the exact value: the
    spread of the estimates matches the mean SE (ratio in [0.75, 1.33]) and at least 88 % of
    the 95 % intervals cover the exact value."""
    values, ses = np.asarray(values, dtype=float), np.asarray(ses, dtype=float)
    assert 0.75 <= values.std(ddof=1) / ses.mean() <= 1.33
    assert np.mean(np.abs(values - exact) <= 1.96 * ses) >= 0.88
