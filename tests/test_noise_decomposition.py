"""GNI for every batch size from one estimate of tr(HS) (utils/noise_decomposition.py and
utils.measures.gni_by_batch_size) against dense float64 derivatives."""

import math

import numpy as np
import pytest
import torch

from curvature_reference import (LOSSES, all_batches, check_honest, dense_gradient, dense_hessian, drawn_batches,
                                 exact_ghg_family, exact_trace_HS, mean_reference, per_sample_gradients, tiny_cnn,
                                 tiny_data, tiny_images, tiny_mlp)
from utils.estimators import measurement_generator
from utils.losses import mse_loss
from utils.measures import gni, gni_by_batch_size, gradient_norms
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
                          target_batch=target_batch, train_mode=train_mode, exact=exact, chunk_size=4,
                          closed_form=False, **limits)
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
    limits["closed_form"] = False
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
                                   min_samples=40, max_samples=40, closed_form=False)
                 for seed in range(150)]
    check_honest([e.trace_HS for e in estimates], [e.trace_HS_se for e in estimates], trace_HS)
    assert all(math.isfinite(e.seconds) for e in estimates)


# --- closed forms over per-sample gradients ------------------------------------------------------


def enumerated_noise(model, loss_fn, X, Y, b, train_mode):
    """(GNI, E_B|g_B|^2, |g|^2) averaged over every one of the C(n, b) batches, with dense float64
    derivatives."""
    exact = exact_ghg_family(model, loss_fn, X, Y, b, train_mode)
    return exact["gni"], exact["batch_norm2"], exact["grad_norm2"]


CLOSED_FORM_CASES = {  # (model, loss, data, train_mode)
    "mlp": lambda: (tiny_mlp(), "ce", tiny_data(7, "ce"), True),
    "cnn": lambda: (tiny_cnn(), "mse", tiny_images(7, "mse"), True),
    "batchnorm-eval": lambda: (batchnorm_in_eval_mode(), "mse", tiny_data(7, "mse"), False),
}


@pytest.mark.parametrize("case", sorted(CLOSED_FORM_CASES))
def test_closed_forms_equal_the_average_over_every_batch(case):
    """GNI(b) and E_B|g_B|^2 in closed form (n + 1 <= min_samples: no batch drawn) against the
    enumeration of all C(7, b) batches with the dense float64 Hessian."""
    model, loss_name, (X, Y), train_mode = CLOSED_FORM_CASES[case]()
    loss_fn = LOSSES[loss_name]
    for b in (2, 3, 6):
        noise, batch_norm2, norm2 = enumerated_noise(model, loss_fn, X, Y, b, train_mode)
        est = gni(model, loss_fn, X, Y, b, generator=measurement_generator(0, b), train_mode=train_mode)
        assert est.exact and est.se == 0 and est.n == 0 and est.hvps == 8
        assert est.value == pytest.approx(noise, rel=1e-11)
        batch, full = gradient_norms(model, loss_fn, X, Y, b, generator=measurement_generator(0, b),
                                     train_mode=train_mode)
        assert batch.exact and batch.se == 0 and batch.n == 0 and not full.exact
        assert batch.value == pytest.approx(batch_norm2, rel=1e-11) and full.value == pytest.approx(norm2, rel=1e-12)
    by_size = gni_by_batch_size(model, loss_fn, X, Y, [2, 3, 7], generator=measurement_generator(0, 0),
                                train_mode=train_mode)
    for b in (2, 3):
        assert by_size[b].exact and by_size[b].n == 0
        assert by_size[b].value == pytest.approx(enumerated_noise(model, loss_fn, X, Y, b, train_mode)[0], rel=1e-11)


def test_closed_form_on_a_residual_network_with_batchnorm_in_eval_mode():
    """ResNet-20 with BatchNorm (eval mode) on 4x4 inputs: the closed forms against the average over
    all C(6, 3) batches, each by plain double-backward products in float64."""
    from utils.hvp import PLAIN_HVP_MODE, HessianOperator, flat_grad
    from utils.models import build_model

    model = build_model("resnet_bn", (3, 4, 4), 2).double()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2, generator=torch.Generator().manual_seed(1))
                module.running_var.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(2))
    X, Y = torch.randn(6, 3, 4, 4, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    op = HessianOperator(model, mse_loss, X, Y, train_mode=False, mode=PLAIN_HVP_MODE)
    g = op.gradient()
    batch_gradients = [flat_grad(model, mse_loss, X[idx], Y[idx], train_mode=False) for idx in all_batches(6, 3)]
    noise = np.mean([(v @ op.matvec(v)).item() for v in batch_gradients]) / (g @ g).item()
    est = gni(model, mse_loss, X, Y, 3, generator=measurement_generator(0, 0), train_mode=False)
    batch, _ = gradient_norms(model, mse_loss, X, Y, 3, generator=measurement_generator(0, 0), train_mode=False)
    assert est.exact and est.value == pytest.approx(noise, rel=1e-10)
    assert batch.exact and batch.value == pytest.approx(np.mean([(v @ v).item() for v in batch_gradients]), rel=1e-10)


def test_closed_forms_are_chosen_only_where_cheaper_and_defined():
    """Taken at once for n + 1 <= min_samples; after the first min_samples batches when they predict
    more than n + 1 further ones (then the products count both); never under train-mode BatchNorm
    nor with exact (--exact-measurements), whose estimates sample as before."""
    loss_fn = LOSSES["mse"]
    model, (X, Y) = tiny_mlp(), tiny_data(40, "mse")
    noisy = gni(model, loss_fn, X, Y, 2, generator=measurement_generator(0, 1), rel_se=0.001)
    assert noisy.exact and noisy.n == 0 and noisy.hvps >= 20 + 41
    assert noisy.value == pytest.approx(enumerated_noise(model, loss_fn, X, Y, 2, True)[0], rel=1e-10)
    quiet = gni(model, loss_fn, X, Y, 40, generator=measurement_generator(0, 1))  # c_b = 0: 20 batches do
    assert not quiet.exact and quiet.n == 20 and quiet.hvps == 20
    plain = gni(model, loss_fn, X, Y, 2, generator=measurement_generator(0, 1), rel_se=0.001, exact=True,
                max_samples=60)
    assert not plain.exact and plain.n == 60 and plain.capped
    small = tiny_data(7, "mse")
    batchnorm = tiny_mlp(batchnorm=True)
    for estimate in (gni(batchnorm, loss_fn, *small, 3, generator=measurement_generator(0, 1), max_samples=30),
                     gradient_norms(batchnorm, loss_fn, *small, 3, generator=measurement_generator(0, 1))[0],
                     gradient_norms(model, loss_fn, *small, 3, generator=measurement_generator(0, 1), exact=True)[0]):
        assert not estimate.exact and estimate.n >= 20


class _BatchScaled(torch.nn.Module):
    """A row's output depends on the whole batch (divided by the batch's largest entry)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)

    def forward(self, x):
        h = self.linear(x)
        return h / h.abs().max()


def test_config_lists_closed_forms_only_for_models_whose_samples_separate():
    from utils.config import RunConfig
    from utils.monitor import closed_form_measurements

    cfg = RunConfig(gni=True, gradient_norm=True)
    X, Y = tiny_data(40, "mse")
    assert closed_form_measurements(cfg, tiny_mlp(), LOSSES["mse"], X, Y) == ["gni", "gradient_norm"]
    assert closed_form_measurements(cfg, _BatchScaled().double(), LOSSES["mse"], X, Y) == []
