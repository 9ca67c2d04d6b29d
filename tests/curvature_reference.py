"""Tiny float64 networks and dense references for the curvature tests.

Exact values of every Monte Carlo quantity come from enumerating all C(n, b) batches; exact
values of one estimate come from the very batches its generator draws (:func:`drawn_batches`),
dense derivatives of each and the stopping rule applied by brute force (:func:`mean_reference`,
:func:`ratio_reference`). The references differentiate the loss as a function of the flat parameter vector with
``torch.func``, independently of utils/hvp.py. The dense Hessian is ``jacrev(grad(loss))``:
``torch.func.hessian`` (jacfwd over jacrev) and ``jacrev(jacrev(...))`` return wrong second
derivatives through training-mode ``batch_norm`` in torch 2.14 (see
pytorch/pytorch#196699), while reverse over ``grad`` agrees with finite differences.
"""

import math
from itertools import combinations

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from utils.estimators import sample_batch_indices
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


def tiny_cnn(seed=0):
    """1x5x5 inputs -> Conv(1->2, 3x3) -> tanh -> MaxPool -> Linear(2 -> 2), in float64: a layer chain
    (utils.r_operator.is_chain) that is not a Linear/activation chain."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.MaxPool2d(3), nn.Flatten(), nn.Linear(2, 2)).double()


def tiny_images(n, loss_name, seed=5):
    """n 1x5x5 inputs for :func:`tiny_cnn` with the targets of :func:`tiny_data`."""
    X = torch.randn(n, 1, 5, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return X, tiny_data(n, loss_name)[1]


def tiny_data(n, loss_name, seed=1):
    """n inputs in R^3 with regression targets in R^2 (mse) or labels in {0, 1} (ce)."""
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    if loss_name == "mse":
        Y = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    else:
        Y = torch.randint(0, 2, (n,), generator=generator)
    return X, Y


def flat_outputs(model, X, train_mode=True):
    """(outputs, flat): the model's outputs on X as a function of the flat trainable parameters, and
    those parameters now."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    sizes = [p.numel() for _, p in named]
    previous = model.training

    def outputs(flat):
        # Fresh copies inside the transformed function: BatchNorm may update them in place.
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        params = {name: piece.view_as(p) for (name, p), piece in zip(named, flat.split(sizes))}
        model.train(train_mode)
        try:
            return functional_call(model, {**params, **buffers}, (X,))
        finally:
            model.train(previous)

    return outputs, torch.cat([p.detach().reshape(-1) for _, p in named])


def _flat_loss(model, loss_fn, X, Y, train_mode):
    outputs, flat = flat_outputs(model, X, train_mode)
    return (lambda theta: loss_fn(outputs(theta), Y)), flat


def dense_hessian(model, loss_fn, X, Y, train_mode=True):
    loss, flat = _flat_loss(model, loss_fn, X, Y, train_mode)
    return torch.func.jacrev(torch.func.grad(loss))(flat)


def dense_gauss_newton(model, loss_name, X, Y, train_mode=True):
    """G from explicit Jacobians J_i (C x P) of every sample's outputs and the closed-form M_i."""
    outputs, flat = flat_outputs(model, X, train_mode)
    J = torch.func.jacrev(outputs)(flat)  # (n, C, P)
    n = X.shape[0]
    if loss_name == "mse":
        return 2 / n * torch.einsum("icp,icq->pq", J, J)
    p = torch.softmax(outputs(flat).detach(), dim=1)
    M = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("icp,icd,idq->pq", J, M, J) / n


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


def check_honest(values, ses, exact):
    """Repeated Monte Carlo estimates and their standard errors against the exact value: the
    spread of the estimates matches the mean SE (ratio in [0.75, 1.33]) and at least 88 % of
    the 95 % intervals cover the exact value."""
    values, ses = np.asarray(values, dtype=float), np.asarray(ses, dtype=float)
    assert 0.75 <= values.std(ddof=1) / ses.mean() <= 1.33
    assert np.mean(np.abs(values - exact) <= 1.96 * ses) >= 0.88


def check_honest_estimates(estimates, exact):
    """:func:`check_honest` on Estimates."""
    check_honest([e.value for e in estimates], [e.se for e in estimates], exact)


# --- enumerating every batch ------------------------------------------------------------------


def all_batches(n, b):
    return [list(batch) for batch in combinations(range(n), b)]


def batch_derivatives(model, loss_fn, X, Y, b, train_mode=True):
    """(g_B, H_B) of every batch of b of the n points, dense."""
    return [(dense_gradient(model, loss_fn, X[idx], Y[idx], train_mode),
             dense_hessian(model, loss_fn, X[idx], Y[idx], train_mode))
            for idx in all_batches(X.shape[0], b)]


def exact_ghg_family(model, loss_fn, X, Y, b, train_mode=True) -> dict:
    """Batch Sharpness E[g_B^T H_B g_B / |g_B|^2], its ratio form E[g_B^T H_B g_B] / E[|g_B|^2],
    GNI E[g_B^T H g_B] / |g|^2 and E[|g_B|^2] as exact averages over all C(n, b) batches, and |g|^2."""
    H, g = dense_hessian(model, loss_fn, X, Y, train_mode), dense_gradient(model, loss_fn, X, Y, train_mode)
    pairs = batch_derivatives(model, loss_fn, X, Y, b, train_mode)
    quadratic = np.array([(g_B @ H_B @ g_B).item() for g_B, H_B in pairs])
    norm2 = np.array([(g_B @ g_B).item() for g_B, _ in pairs])
    noise = np.array([(g_B @ H @ g_B).item() for g_B, _ in pairs])
    return {"batch_sharpness": float(np.mean(quadratic / norm2)),
            "batch_sharpness_ratio": float(quadratic.mean() / norm2.mean()),
            "gni": float(noise.mean() / (g @ g).item()),
            "batch_norm2": float(norm2.mean()), "grad_norm2": (g @ g).item()}


def per_sample_gradients(model, loss_fn, X, Y):
    return torch.stack([dense_gradient(model, loss_fn, X[i : i + 1], Y[i : i + 1]) for i in range(X.shape[0])])


def exact_trace_HS(model, loss_fn, X, Y, train_mode=True):
    """(tr(H S), g, H) with S = (1/n) sum_i (g_i - g)(g_i - g)^T, the per-sample gradient covariance."""
    H, g = dense_hessian(model, loss_fn, X, Y, train_mode), dense_gradient(model, loss_fn, X, Y, train_mode)
    centred = per_sample_gradients(model, loss_fn, X, Y) - g
    return torch.trace(H @ centred.T @ centred).item() / X.shape[0], g, H


# --- one estimate, recomputed -----------------------------------------------------------------


def drawn_batches(n, b, generator, m):
    """The index lists of the first m batches a measurement draws from ``generator``."""
    return [sample_batch_indices(n, b, generator).tolist() for _ in range(m)]


def stopping_point(x, min_samples, max_samples, rel_se):
    """The first k >= min_samples with SE < rel_se |mean| of x[:k], else max_samples (brute force)."""
    for k in range(min_samples, max_samples + 1):
        if x[:k].std(ddof=1) / math.sqrt(k) < rel_se * abs(x[:k].mean()):
            return k
    return max_samples


def delta_method(a, b):
    """(R, SE) of the ratio of means R = mean(a) / mean(b) by the delta method."""
    R = a.mean() / b.mean()
    cov = np.cov(a, b, ddof=1)
    return R, math.sqrt((cov[0, 0] - 2 * R * cov[0, 1] + R * R * cov[1, 1]) / len(a)) / b.mean()


def mean_reference(samples, min_samples, max_samples, rel_se):
    """(value, se, n) of a sample mean under the stopping rule, from all the samples it may draw."""
    x = np.asarray(samples, dtype=float)
    k = stopping_point(x, min_samples, max_samples, rel_se)
    return x[:k].mean(), x[:k].std(ddof=1) / math.sqrt(k), k


def ratio_reference(a, b, min_samples, max_samples, rel_se):
    """(value, se, n) of a ratio of means under the stopping rule (on the delta-method SE)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    for k in range(min_samples, max_samples + 1):
        R, se = delta_method(a[:k], b[:k])
        if se < rel_se * abs(R) or k == max_samples:
            return R, se, k


def forbid_fast_routes(monkeypatch):
    """Make the Gram engine and the default (fastest) Hessian-product mode raise an AssertionError
    that says "fast route": what ``exact`` / ``--exact-measurements`` must never reach."""
    from utils import batch_forms, hvp

    def refuse(*args, **kwargs):
        raise AssertionError("a measurement reached a fast route")

    monkeypatch.setattr(batch_forms, "linear_network", refuse)
    monkeypatch.setattr(hvp, "default_hvp_mode", refuse)


def tiny_resnet(seed=0):
    """EOSS's ``resnet`` (ResNet-20 without BatchNorm) for 1x8x8 inputs and 2 outputs in float64,
    trainable only in the first convolution and the head (274 parameters): a small dense Hessian
    while every forward pass runs through every residual block."""
    from utils.models import build_model

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_model("resnet", (1, 8, 8), 2).double()
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(("conv.", "head")))
    return model


def tiny_resnet_bn(seed=0):
    """EOSS's ``resnet_bn`` (ResNet-20 with BatchNorm) for 1x8x8 inputs and 2 outputs in float64,
    trainable only in the last block's two BatchNorm layers and the head (386 parameters), so
    that its dense Hessian stays small while every forward pass runs through the whole network
    and every BatchNorm layer."""
    from utils.models import build_model

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_model("resnet_bn", (1, 8, 8), 2).double()
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(("blocks.8.norm", "head")))
            if name.startswith("blocks.8.norm"):
                # Non-trivial affine BatchNorm parameters so every Hessian block is exercised.
                with torch.no_grad():
                    p.add_(0.3 * torch.randn_like(p))
    return model
