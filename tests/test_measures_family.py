"""The second curvature family against exact dense float64 values on a tiny network."""

import math
from itertools import combinations

import numpy as np
import pytest
import torch

from curvature_reference import LOSSES, dense_gradient, dense_hessian, tiny_data, tiny_mlp
from utils.estimators import measurement_generator
from utils.measures import batch_sharpness_ratio

N, B = 8, 3


def all_batches(n=N, b=B):
    return [list(batch) for batch in combinations(range(n), b)]


def check_honest(estimates, exact):
    values = np.array([e.value for e in estimates])
    ses = np.array([e.se for e in estimates])
    assert 0.75 <= values.std(ddof=1) / ses.mean() <= 1.33
    assert np.mean(np.abs(values - exact) <= 1.96 * ses) >= 0.88


def exact_batch_sharpness_ratio(model, loss_fn, X, Y):
    quadratic, norm2 = [], []
    for idx in all_batches():
        g_B = dense_gradient(model, loss_fn, X[idx], Y[idx])
        quadratic.append((g_B @ dense_hessian(model, loss_fn, X[idx], Y[idx]) @ g_B).item())
        norm2.append((g_B @ g_B).item())
    return float(np.mean(quadratic) / np.mean(norm2))


@pytest.mark.parametrize("loss_name", ["mse", "ce"])
def test_batch_sharpness_ratio_converges_to_the_exact_ratio_of_means(loss_name):
    model, (X, Y) = tiny_mlp(), tiny_data(N, loss_name)
    loss_fn = LOSSES[loss_name]
    exact = exact_batch_sharpness_ratio(model, loss_fn, X, Y)
    est = batch_sharpness_ratio(model, loss_fn, X, Y, B, generator=measurement_generator(0, 1))
    assert est.se < 0.005 * abs(est.value) or est.n == 1000
    assert abs(est.value - exact) < 4 * est.se
    assert est.hvps == est.n and est.seconds > 0


def test_batch_sharpness_ratio_standard_errors_are_honest():
    model, (X, Y) = tiny_mlp(), tiny_data(N, "ce")
    loss_fn = LOSSES["ce"]
    exact = exact_batch_sharpness_ratio(model, loss_fn, X, Y)
    estimates = [batch_sharpness_ratio(model, loss_fn, X, Y, B, generator=measurement_generator(seed, 0),
                                       min_samples=40, max_samples=40)
                 for seed in range(100)]
    check_honest(estimates, exact)
