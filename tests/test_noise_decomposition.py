"""GNI for every batch size from one estimate of tr(HS) (utils/noise_decomposition.py and
utils.measures.gni_by_batch_size) against dense float64 derivatives."""

import math

import numpy as np
import pytest
import torch

from curvature_reference import (LOSSES, all_batches, check_honest, dense_gradient, dense_hessian, drawn_batches,
                                 exact_trace_HS, mean_reference, per_sample_gradients, tiny_cnn, tiny_data, tiny_images,
                                 tiny_mlp)
from utils.estimators import measurement_generator
from utils.measures import gni_by_batch_size
from utils.noise_decomposition import gni_decomposition, noise_factor


@pytest.mark.parametrize("loss_name", ["mse", "ce"])
def test_noise_identity_holds_for_every_batch_size(loss_name):
    """E_B[g_B^T H g_B] = g^T H g + (n - b)/(b (n - 1)) tr(HS), enumerating every batch."""
    model, (X, Y) = tiny_mlp(), tiny_data(7, loss_name)
    loss_fn = LOSSES[loss_name]
    n = X.shape[0]
    trace_HS, g, H = exact_trace_HS(model, loss_fn, X, Y)
    per_sample = per_sample_gradients(model, loss_fn, X, Y)
    for b in range(1, n + 1):
        expectation = np.mean([(v @ H @ v).item() for v in (per_sample[batch].mean(0) for batch in all_batches(n, b))])
        assert expectation == pytest.approx((g @ H @ g).item() + noise_factor(n, b) * trace_HS, rel=1e-12)


def batchnorm_in_eval_mode():
    """tiny_mlp with BatchNorm and running statistics far from any batch's own."""
    model = tiny_mlp(batchnorm=True)
    with torch.no_grad():
        model[1].running_mean.copy_(torch.tensor([0.3, -0.2, 0.1, 0.5]))
        model[1].running_var.copy_(torch.tensor([0.5, 2.0, 1.5, 0.8]))
    return model


def drawn_reference(model, loss_fn, X, Y, generator, *, sample_batch, target_batch, min_samples, max_samples, rel_se,
                    train_mode=True):
    """tr(HS), its SE and the stopping point recomputed from dense derivatives of the very batches the
    generator draws: samples (g_B - g)^T H (g_B - g) / c_sample, SE with ddof = 1, the rule run on GNI
    at the target batch size. Also g^T H g and |g|^2."""
    n = X.shape[0]
    H = dense_hessian(model, loss_fn, X, Y, train_mode)
    g = dense_gradient(model, loss_fn, X, Y, train_mode)
    gHg, norm2 = (g @ H @ g).item(), (g @ g).item()
    samples = []
    for idx in drawn_batches(n, sample_batch, generator, max_samples):
        v = dense_gradient(model, loss_fn, X[idx], Y[idx], train_mode) - g
        samples.append((v @ H @ v).item() / noise_factor(n, sample_batch))
    samples = np.array(samples)
    _, _, stop = mean_reference((gHg + noise_factor(n, target_batch) * samples) / norm2, min_samples, max_samples,
                                rel_se)
    used = samples[:stop]
    return used.mean(), used.std(ddof=1) / math.sqrt(stop), stop, gHg, norm2


CASES = {  # the Gram route, plain double backward, the R-operator and BatchNorm in eval mode
    "mlp": lambda: (tiny_mlp(), tiny_data(9, "mse"), False, True),
    "mlp-exact": lambda: (tiny_mlp(), tiny_data(9, "mse"), True, True),
    "cnn": lambda: (tiny_cnn(), tiny_images(9, "mse"), False, True),
    "batchnorm-eval": lambda: (batchnorm_in_eval_mode(), tiny_data(9, "mse"), False, False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_decomposition_is_the_sample_mean_of_the_drawn_batches(case):
    model, (X, Y), exact, train_mode = CASES[case]()
    loss_fn = LOSSES["mse"]
    n, sample_batch, target_batch = 9, 2, 4
    limits = {"min_samples": 10, "max_samples": 200, "rel_se": 0.12}
    trace, trace_se, stop, gHg, norm2 = drawn_reference(
        model, loss_fn, X, Y, measurement_generator(3, 7), sample_batch=sample_batch, target_batch=target_batch,
        train_mode=train_mode, **limits)
    assert 10 < stop < 200

    d = gni_decomposition(model, loss_fn, X, Y, generator=measurement_generator(3, 7), sample_batch=sample_batch,
                          target_batch=target_batch, train_mode=train_mode, exact=exact, chunk_size=4, **limits)
    assert d.samples == stop and d.hvps >= d.samples + 1
    assert (d.grad_norm2, d.gHg) == pytest.approx((norm2, gHg), rel=1e-12)
    assert d.trace_HS == pytest.approx(trace, rel=1e-10)
    assert d.trace_HS_se == pytest.approx(trace_se, rel=1e-8)
    for b in (1, 2, 4, 7, 9):
        est = d.gni(b)
        c = noise_factor(n, b)
        assert est.value == pytest.approx((gHg + c * trace) / norm2, rel=1e-10)
        assert est.se == pytest.approx(c * trace_se / norm2, rel=1e-8, abs=0)


def test_gni_by_batch_size_samples_and_stops_at_the_smallest_batch_size():
    model, (X, Y) = tiny_mlp(), tiny_data(9, "ce")
    loss_fn = LOSSES["ce"]
    limits = {"min_samples": 10, "max_samples": 300, "rel_se": 0.08}
    trace, trace_se, stop, gHg, norm2 = drawn_reference(model, loss_fn, X, Y, measurement_generator(2, 4),
                                                        sample_batch=3, target_batch=3, **limits)
    assert 10 < stop < 300
    by_size = gni_by_batch_size(model, loss_fn, X, Y, [5, 3, 9], generator=measurement_generator(2, 4), **limits)
    assert sorted(by_size) == [3, 5, 9]
    for b in (3, 5, 9):
        c = noise_factor(9, b)
        assert by_size[b].n == stop
        assert by_size[b].value == pytest.approx((gHg + c * trace) / norm2, rel=1e-10)
        assert by_size[b].se == pytest.approx(c * trace_se / norm2, rel=1e-8, abs=0)
    assert by_size[3].se < limits["rel_se"] * abs(by_size[3].value)
    assert by_size[3].se > by_size[5].se > by_size[9].se == 0
    # b = n alone: the batches are drawn at n - 1, and GNI(n) = g^T H g / |g|^2 is exact at once.
    (whole,) = gni_by_batch_size(model, loss_fn, X, Y, [9], generator=measurement_generator(2, 4), **limits).values()
    assert whole.se == 0 and whole.n == 10 and whole.value == pytest.approx(gHg / norm2, rel=1e-12)
    with pytest.raises(ValueError, match="BatchNorm"):
        gni_decomposition(tiny_mlp(batchnorm=True), loss_fn, X, Y, sample_batch=2, generator=measurement_generator(1, 1))


def test_decomposition_standard_errors_are_honest():
    model, (X, Y) = tiny_mlp(), tiny_data(8, "mse")
    loss_fn = LOSSES["mse"]
    trace_HS, _, _ = exact_trace_HS(model, loss_fn, X, Y)
    estimates = [gni_decomposition(model, loss_fn, X, Y, sample_batch=2, generator=measurement_generator(seed, 3),
                                   min_samples=40, max_samples=40)
                 for seed in range(150)]
    check_honest([e.trace_HS for e in estimates], [e.trace_HS_se for e in estimates], trace_HS)
    assert all(math.isfinite(e.seconds) for e in estimates)
