import math
from itertools import combinations

import numpy as np
import pytest
import torch
from torch import nn

from curvature_reference import LOSSES, check_honest, dense_gradient, dense_hessian, tiny_data, tiny_mlp
from utils import fast_curvature, measures
from utils.estimators import measurement_generator, sample_batch_indices
from utils.hvp import HessianOperator, flat_grad
from utils.models import ACTIVATIONS, build_model


def perturbed(model, seed=0):
    """Non-zero biases and weights off the initial scale, so every term of H is exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


def image_data(n, loss_name, outputs=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 2, 3, 2, generator=generator, dtype=torch.float64)
    if loss_name == "mse":
        return X, torch.randn(n, outputs, generator=generator, dtype=torch.float64)
    return X, torch.randint(0, outputs, (n,), generator=generator)


def no_bias_mlp():
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 5, bias=False), nn.SiLU(),
                         nn.Linear(5, 3, bias=False)).double()


MODELS = {
    "mlp-1": lambda act: build_model("mlp", (2, 3, 2), 3, width=5, depth=1, activation=act),
    "mlp-3": lambda act: build_model("mlp", (2, 3, 2), 3, width=5, depth=3, activation=act),
    "linear": lambda act: build_model("linear", (2, 3, 2), 3),
    "no-bias": lambda act: no_bias_mlp(),
}


def exact_batch_terms(model, loss_fn, X, Y, idx):
    out = []
    for rows in idx:
        op = HessianOperator(model, loss_fn, X[rows], Y[rows])
        g = op.gradient()
        out.append(((g @ op.matvec(g)).item(), (g @ g).item()))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("loss_name", ["mse", "ce"])
@pytest.mark.parametrize("shape", sorted(MODELS))
def test_batch_terms_equal_double_backward(activation, loss_name, shape):
    model = perturbed(MODELS[shape](activation).double())
    loss_fn = LOSSES[loss_name]
    X, Y = image_data(9, loss_name)
    idx = torch.stack([torch.randperm(9, generator=torch.Generator().manual_seed(k))[:4]
                       for k in range(3)])
    expected = exact_batch_terms(model, loss_fn, X, Y, idx)
    # Rows gathered from all samples' quantities (12 rows asked >= n = 9), and batch by batch.
    net = fast_curvature.linear_network(model, loss_fn, X, Y)
    for quadratic, norm2 in (fast_curvature.batch_terms(model, loss_fn, X, Y, idx),
                             net.batch_terms(X[idx], Y[idx])):
        torch.testing.assert_close(quadratic, expected[:, 0], rtol=1e-11, atol=1e-14)
        torch.testing.assert_close(norm2, expected[:, 1], rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("loss_name", ["mse", "ce"])
def test_directional_forms_equal_double_backward(activation, loss_name):
    model = perturbed(MODELS["mlp-3"](activation).double())
    loss_fn = LOSSES[loss_name]
    X, Y = image_data(11, loss_name)
    net = fast_curvature.linear_network(model, loss_fn, X, Y)
    idx = torch.tensor([[0, 3, 5], [2, 3, 10], [1, 7, 8], [4, 6, 9]])
    op = HessianOperator(model, loss_fn, X, Y)
    G = torch.stack([flat_grad(model, loss_fn, X[rows], Y[rows]) for rows in idx], dim=1)
    expected = (G * op.matvec(G)).sum(0)
    for chunk_rows in (None, 4):
        forms = net.quadratic_forms(X, Y, X[idx], Y[idx], chunk_rows=chunk_rows)
        torch.testing.assert_close(forms, expected, rtol=1e-11, atol=1e-14)
    v = torch.randn(G.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(net.batch_dot(X[idx], Y[idx], net.split(v)), G.T @ v, rtol=1e-12, atol=1e-14)
    g = op.gradient()
    gradient = net.full_gradient(X, Y, chunk_rows=4)
    torch.testing.assert_close(fast_curvature._norm2(gradient), (g @ g).item(), rtol=1e-12, atol=0)


def test_fast_path_applies_only_to_linear_chains_with_known_losses():
    X, Y = image_data(6, "mse")
    _, labels = image_data(6, "ce")
    mlp = build_model("mlp", (2, 3, 2), 3, width=4, depth=2)
    assert fast_curvature.linear_network(mlp, LOSSES["mse"], X, Y) is not None
    assert fast_curvature.linear_network(mlp, LOSSES["ce"], X, labels) is not None
    assert fast_curvature.linear_network(tiny_mlp(), LOSSES["mse"], *tiny_data(5, "mse")) is not None
    soft = torch.softmax(Y, dim=1)
    frozen = build_model("mlp", (2, 3, 2), 3, width=4, depth=2)
    frozen[1].bias.requires_grad_(False)
    images = torch.randn(4, 3, 16, 16)
    rejected = [
        (build_model("cnn", (3, 16, 16), 3), LOSSES["mse"], images, Y[:4]),
        (build_model("resnet", (3, 16, 16), 3), LOSSES["mse"], images, Y[:4]),
        (tiny_mlp(batchnorm=True), LOSSES["mse"], *tiny_data(5, "mse")),
        (nn.Sequential(nn.Flatten(), nn.Linear(12, 3), nn.GELU("tanh"), nn.Linear(3, 3)),
         LOSSES["mse"], X.float(), Y.float()),
        (nn.Sequential(nn.Linear(2, 3)), LOSSES["mse"], X, Y),  # no Flatten before 4-d inputs
        (frozen, LOSSES["mse"], X, Y),
        (mlp, LOSSES["ce"], X, soft),  # soft ce targets
        (mlp, lambda out, y, reduction="mean": LOSSES["mse"](out, y, reduction), X, Y),
        (mlp, LOSSES["mse"], X, Y[:, :2]),  # targets not of the outputs' size
        (build_model("mlp", (2, 3, 2), 1, width=4), LOSSES["mse"], X, Y[:, 0]),  # (n,) broadcasts
    ]
    for model, loss_fn, inputs, targets in rejected:
        assert fast_curvature.linear_network(model, loss_fn, inputs, targets) is None
    with pytest.raises(ValueError):
        fast_curvature.gni(*rejected[0], 2, generator=measurement_generator(0, 0))


def tiny_cnn():
    torch.manual_seed(5)
    return nn.Sequential(nn.Conv2d(2, 3, 2), nn.ReLU(), nn.MaxPool2d((2, 1)), nn.Flatten(),
                         nn.Linear(3, 3)).double()


@pytest.mark.parametrize("train_mode", [True, False])
def test_other_models_take_the_per_batch_route_with_exact_values(train_mode):
    cases = [(tiny_cnn(), LOSSES["ce"], *image_data(10, "ce")),
             (tiny_mlp(batchnorm=True), LOSSES["mse"], *tiny_data(10, "mse"))]
    for model, loss_fn, X, Y in cases:
        assert fast_curvature.linear_network(model, loss_fn, X, Y) is None
        idx = torch.tensor([[0, 4, 7], [1, 2, 9]])
        quadratic, norm2 = fast_curvature.batch_terms(model, loss_fn, X, Y, idx, train_mode=train_mode)
        for k, rows in enumerate(idx):
            op = HessianOperator(model, loss_fn, X[rows], Y[rows], train_mode=train_mode)
            g = op.gradient()
            assert quadratic[k].item() == pytest.approx((g @ op.matvec(g)).item(), rel=1e-11)
            assert norm2[k].item() == pytest.approx((g @ g).item(), rel=1e-12)
        limits = {"min_samples": 10, "max_samples": 40, "rel_se": 0.02, "train_mode": train_mode}
        got = fast_curvature.batch_sharpness(model, loss_fn, X, Y, 3, generator=measurement_generator(2, 2),
                                             **limits)
        want = measures.batch_sharpness(model, loss_fn, X, Y, 3, generator=measurement_generator(2, 2),
                                         exact=True, **limits)
        assert (got.n, got.hvps) == (want.n, want.hvps)
        assert got.value == pytest.approx(want.value, rel=1e-11)


def test_vmapped_route_reproduces_the_exact_estimates(monkeypatch):
    """The route a GPU takes for models without BatchNorm, forced on here: the same batches,
    estimates and standard errors as the exact loop, whatever it computes ahead."""
    model, loss_fn, (X, Y) = tiny_cnn(), LOSSES["ce"], image_data(10, "ce")
    mlp_X, mlp_Y = tiny_data(10, "mse")
    assert fast_curvature.batch_route(model, loss_fn, X, Y) == "r-operator"  # on the CPU
    assert fast_curvature.batch_route(model, loss_fn, X, Y, exact=True) == "double-backward"
    assert fast_curvature.batch_route(tiny_mlp(batchnorm=True), LOSSES["mse"], *tiny_data(10, "mse")) == "double-backward"
    assert fast_curvature.batch_route(tiny_mlp(), LOSSES["mse"], mlp_X, mlp_Y) == "stacked-gram"
    assert fast_curvature.batch_route(tiny_mlp(), LOSSES["mse"], mlp_X, mlp_Y, exact=True) == "double-backward"
    assert fast_curvature.batch_route(model, loss_fn, X, Y, device="cuda:0") == "vmap-double-backward"
    assert fast_curvature.batch_route(tiny_mlp(batchnorm=True), LOSSES["mse"], mlp_X, mlp_Y,
                                      device="cuda") == "double-backward"
    with_dropout = nn.Sequential(nn.Conv2d(2, 3, 2), nn.Dropout(0.1), nn.Flatten(), nn.Linear(12, 3)).double()
    assert fast_curvature.batch_route(with_dropout, loss_fn, X, Y, device="cuda") == "double-backward"
    monkeypatch.setattr(fast_curvature, "batch_route", lambda *args, **kwargs: "vmap-double-backward")
    limits = {"min_samples": 10, "max_samples": 60, "rel_se": 0.01}
    for fast, exact in [(fast_curvature.batch_sharpness, measures.batch_sharpness),
                        (fast_curvature.batch_sharpness_ratio, measures.batch_sharpness_ratio)]:
        got = fast(model, loss_fn, X, Y, 3, generator=measurement_generator(2, 2), **limits)
        want = exact(model, loss_fn, X, Y, 3, generator=measurement_generator(2, 2), exact=True, **limits)
        assert got.n == want.n > limits["min_samples"] and got.hvps >= got.n
        assert got.value == pytest.approx(want.value, rel=1e-11)
        assert got.se == pytest.approx(want.se, rel=1e-8)


@pytest.mark.parametrize("loss_name", ["mse", "ce"])
def test_estimates_reproduce_the_exact_path_with_the_same_generator(loss_name):
    model = perturbed(build_model("mlp", (2, 3, 2), 3, width=5, depth=2, activation="gelu").double())
    loss_fn = LOSSES[loss_name]
    X, Y = image_data(24, loss_name)
    cases = [
        (fast_curvature.batch_sharpness, measures.batch_sharpness, {"rel_se": 0.02}),
        (fast_curvature.batch_sharpness_ratio, measures.batch_sharpness_ratio, {"rel_se": 0.02}),
        (fast_curvature.gni, measures.gni, {"rel_se": 0.05, "chunk_size": 5}),
    ]
    for fast, exact, options in cases:
        limits = {"min_samples": 10, "max_samples": 120, **options}
        got = fast(model, loss_fn, X, Y, 3, generator=measurement_generator(4, 2), **limits)
        want = exact(model, loss_fn, X, Y, 3, generator=measurement_generator(4, 2), exact=True,
                     **limits)
        assert got.n == want.n and got.hvps >= got.n
        assert got.value == pytest.approx(want.value, rel=1e-11)
        assert got.se == pytest.approx(want.se, rel=1e-8)
    xb, yb = X[[2, 5, 7]], Y[[2, 5, 7]]
    assert fast_curvature.step_sharpness(model, loss_fn, xb, yb).value == pytest.approx(
        measures.step_sharpness(model, loss_fn, xb, yb, exact=True).value, rel=1e-11)


def test_float32_agrees_with_float64():
    model = perturbed(build_model("mlp", (2, 3, 2), 3, width=16, depth=2, activation="tanh").double())
    X, Y = image_data(8, "ce")
    idx = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    want = fast_curvature.batch_terms(model, LOSSES["ce"], X, Y, idx)
    got = fast_curvature.batch_terms(model.float(), LOSSES["ce"], X.float(), Y, idx)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=0)


def per_sample_gradients(model, loss_fn, X, Y):
    return torch.stack([dense_gradient(model, loss_fn, X[i : i + 1], Y[i : i + 1])
                        for i in range(X.shape[0])])


@pytest.mark.parametrize("loss_name", ["mse", "ce"])
def test_noise_identity_holds_for_every_batch_size(loss_name):
    """E_B[g_B^T H g_B] = g^T H g + (n - b)/(b (n - 1)) tr(HS), enumerating every batch."""
    model, (X, Y) = tiny_mlp(), tiny_data(7, loss_name)
    loss_fn = LOSSES[loss_name]
    n = X.shape[0]
    H, g = dense_hessian(model, loss_fn, X, Y), dense_gradient(model, loss_fn, X, Y)
    per_sample = per_sample_gradients(model, loss_fn, X, Y)
    S = (per_sample - g).T @ (per_sample - g) / n
    trace_HS = torch.trace(H @ S).item()
    for b in range(1, n + 1):
        batch_grads = [per_sample[list(batch)].mean(0) for batch in combinations(range(n), b)]
        expectation = np.mean([(v @ H @ v).item() for v in batch_grads])
        assert expectation == pytest.approx((g @ H @ g).item()
                                            + fast_curvature.noise_factor(n, b) * trace_HS,
                                            rel=1e-12)


def exact_trace_HS(model, loss_fn, X, Y):
    H, g = dense_hessian(model, loss_fn, X, Y), dense_gradient(model, loss_fn, X, Y)
    centred = per_sample_gradients(model, loss_fn, X, Y) - g
    return torch.trace(H @ centred.T @ centred).item() / X.shape[0], g, H


def test_decomposition_fast_equals_exact_and_gives_gni_for_every_batch_size():
    model, (X, Y) = tiny_mlp(), tiny_data(9, "ce")
    loss_fn = LOSSES["ce"]
    trace_HS, g, H = exact_trace_HS(model, loss_fn, X, Y)
    options = {"sample_batch": 2, "target_batch": 3, "min_samples": 10, "max_samples": 200,
               "rel_se": 0.05}
    fast = fast_curvature.gni_decomposition(model, loss_fn, X, Y, generator=measurement_generator(1, 1),
                                            **options)
    exact = fast_curvature.gni_decomposition(model, loss_fn, X, Y, generator=measurement_generator(1, 1),
                                             exact=True, chunk_size=4, **options)
    assert fast.samples == exact.samples and fast.hvps >= fast.samples + 1
    for field in ("grad_norm2", "gHg", "trace_HS", "trace_HS_se"):
        assert getattr(fast, field) == pytest.approx(getattr(exact, field), rel=1e-10)
    assert fast.grad_norm2 == pytest.approx((g @ g).item(), rel=1e-12)
    assert fast.gHg == pytest.approx((g @ H @ g).item(), rel=1e-12)
    assert abs(fast.trace_HS - trace_HS) < 4 * fast.trace_HS_se
    at3 = fast.gni(3)
    assert at3.se < 0.05 * abs(at3.value) or fast.samples == 200
    # b = n has no noise: GNI(n) = g^T H g / |g|^2 exactly.
    everything = fast.gni(9)
    assert everything.se == 0 and everything.value == pytest.approx(fast.gHg / fast.grad_norm2)
    by_size = fast_curvature.gni_by_batch_size(model, loss_fn, X, Y, [3, 5, 9],
                                               generator=measurement_generator(1, 1), rel_se=0.05)
    assert sorted(by_size) == [3, 5, 9]
    assert by_size[3].se > by_size[5].se > by_size[9].se == 0
    with pytest.raises(ValueError):
        fast_curvature.gni_decomposition(tiny_mlp(batchnorm=True), loss_fn, X, Y, sample_batch=2,
                                         generator=measurement_generator(1, 1))


def batchnorm_in_eval_mode():
    """tiny_mlp with BatchNorm and running statistics far from any batch's own."""
    model = tiny_mlp(batchnorm=True)
    with torch.no_grad():
        model[1].running_mean.copy_(torch.tensor([0.3, -0.2, 0.1, 0.5]))
        model[1].running_var.copy_(torch.tensor([0.5, 2.0, 1.5, 0.8]))
    return model


@pytest.mark.parametrize("network, train_mode", [("mlp", True), ("batchnorm", False)])
def test_decomposition_is_the_sample_mean_of_the_drawn_batches(network, train_mode):
    """tr(HS), its SE, the stopping point and GNI(b) recomputed from dense derivatives of the
    very batches the generator draws: samples (g_B - g)^T H (g_B - g) / c_2, SE with ddof = 1,
    the rule run on GNI at the target batch size, GNI(b) = (g^T H g + c_b tr(HS)) / |g|^2."""
    model = tiny_mlp() if network == "mlp" else batchnorm_in_eval_mode()
    loss_fn = LOSSES["mse"]
    X, Y = tiny_data(9, "mse")
    n, sample_batch, target_batch, rel_se = 9, 2, 4, 0.12
    c = lambda b: (n - b) / (b * (n - 1))
    H = dense_hessian(model, loss_fn, X, Y, train_mode=train_mode)
    g = dense_gradient(model, loss_fn, X, Y, train_mode=train_mode)
    gHg, norm2 = (g @ H @ g).item(), (g @ g).item()
    generator = measurement_generator(3, 7)
    samples = []
    for _ in range(200):
        idx = sample_batch_indices(n, sample_batch, generator).tolist()
        v = dense_gradient(model, loss_fn, X[idx], Y[idx], train_mode=train_mode) - g
        samples.append((v @ H @ v).item() / c(sample_batch))
    samples = np.array(samples)
    target = (gHg + c(target_batch) * samples) / norm2
    stop = next((k for k in range(10, 201)
                 if target[:k].std(ddof=1) / math.sqrt(k) < rel_se * abs(target[:k].mean())), 200)
    assert 10 < stop < 200
    used = samples[:stop]
    trace, trace_se = used.mean(), used.std(ddof=1) / math.sqrt(stop)

    d = fast_curvature.gni_decomposition(model, loss_fn, X, Y, generator=measurement_generator(3, 7),
                                         sample_batch=sample_batch, target_batch=target_batch, min_samples=10,
                                         max_samples=200, rel_se=rel_se, train_mode=train_mode)
    assert d.samples == stop
    assert d.trace_HS == pytest.approx(trace, rel=1e-10)
    assert d.trace_HS_se == pytest.approx(trace_se, rel=1e-8)
    for b in (1, 2, 4, 7, 9):
        est = d.gni(b)
        assert est.value == pytest.approx((gHg + c(b) * trace) / norm2, rel=1e-10)
        assert est.se == pytest.approx(c(b) * trace_se / norm2, rel=1e-8, abs=0)


def test_gni_by_batch_size_samples_and_stops_at_the_smallest_batch_size():
    model, (X, Y) = tiny_mlp(), tiny_data(9, "ce")
    loss_fn = LOSSES["ce"]
    limits = {"min_samples": 10, "max_samples": 300, "rel_se": 0.08}
    by_size = fast_curvature.gni_by_batch_size(model, loss_fn, X, Y, [5, 3, 9], generator=measurement_generator(2, 4),
                                               **limits)
    d = fast_curvature.gni_decomposition(model, loss_fn, X, Y, generator=measurement_generator(2, 4), sample_batch=3,
                                         **limits)
    assert 10 < d.samples < 300
    for b in (3, 5, 9):
        assert (by_size[b].value, by_size[b].se, by_size[b].n) == (d.gni(b).value, d.gni(b).se, d.samples)
    assert by_size[3].se < limits["rel_se"] * abs(by_size[3].value)
    # Every batch size n alone: the batches are drawn at n - 1 and GNI(n) is exact.
    (whole,) = fast_curvature.gni_by_batch_size(model, loss_fn, X, Y, [9], generator=measurement_generator(2, 4),
                                                **limits).values()
    assert whole.se == 0 and whole.n == 10


def test_decomposition_standard_errors_are_honest():
    model, (X, Y) = tiny_mlp(), tiny_data(8, "mse")
    loss_fn = LOSSES["mse"]
    trace_HS, _, _ = exact_trace_HS(model, loss_fn, X, Y)
    estimates = [fast_curvature.gni_decomposition(model, loss_fn, X, Y, sample_batch=2,
                                                  generator=measurement_generator(seed, 3),
                                                  min_samples=40, max_samples=40)
                 for seed in range(150)]
    check_honest([e.trace_HS for e in estimates], [e.trace_HS_se for e in estimates], trace_HS)


def test_batch_sharpness_standard_errors_are_honest_on_the_fast_path():
    model = perturbed(build_model("mlp", (2, 3, 2), 3, width=5, depth=2, activation="relu").double())
    X, Y = image_data(8, "mse")
    loss_fn = LOSSES["mse"]
    rayleigh = []
    for batch in combinations(range(8), 3):
        idx = torch.tensor([batch])
        quadratic, norm2 = fast_curvature.batch_terms(model, loss_fn, X, Y, idx)
        rayleigh.append((quadratic / norm2).item())
    exact = float(np.mean(rayleigh))
    estimates = [fast_curvature.batch_sharpness(model, loss_fn, X, Y, 3, generator=measurement_generator(seed, 0),
                                                min_samples=40, max_samples=40)
                 for seed in range(150)]
    check_honest([e.value for e in estimates], [e.se for e in estimates], exact)
    assert all(math.isfinite(e.seconds) and e.hvps >= 40 for e in estimates)


def test_exact_measurements_flag_is_recorded_and_gives_the_same_columns(results_env):
    import json

    import training
    from utils.results import read_results

    frames = {}
    for flag in ([], ["--exact-measurements"]):
        run_dir = results_env / ("exact" if flag else "fast")
        argv = ["--width", "16", "--num-data", "120", "--batch", "8", "--steps", "21", "--quiet",
                "--batch-sharpness", "--step-sharpness", "--gni", "--batch-sharpness-ratio",
                "--measure-every", "10", "--run-dir", str(run_dir), *flag]
        assert training.main(argv) == 0
        record = json.loads((run_dir / "config.json").read_text())
        assert record["config"]["exact_measurements"] is bool(flag)
        frames[bool(flag)] = read_results(run_dir / "results.txt")
    columns = ["batch_sharpness", "batch_sharpness_se", "batch_sharpness_n", "step_sharpness",
               "gni", "gni_se", "gni_n", "batch_sharpness_ratio"]
    fast, exact = (frames[False][columns].dropna(), frames[True][columns].dropna())
    assert len(fast) == 3
    np.testing.assert_allclose(fast.to_numpy(), exact.to_numpy(), rtol=2e-4)


def test_exact_measurements_use_plain_double_backward_for_every_hessian_product(results_env, monkeypatch):
    """On a GPU the default HVP mode is a faster one; --exact-measurements must not ask for it."""
    import json

    import training
    from utils import hvp

    def refuse(*args, **kwargs):
        raise AssertionError("a measurement asked for the default (fast) HVP mode")

    monkeypatch.setattr(hvp, "default_hvp_mode", refuse)
    model, (X, Y) = tiny_mlp(), tiny_data(12, "mse")
    with pytest.raises(AssertionError, match="fast"):
        measures.lambda_max(model, LOSSES["mse"], X, Y)
    cnn, (images, labels) = tiny_cnn(), image_data(10, "ce")  # the default mode would be the R-operator
    limits = {"min_samples": 5, "max_samples": 10}
    with pytest.raises(AssertionError, match="fast"):
        fast_curvature.gni_by_batch_size(cnn, LOSSES["ce"], images, labels, [3], generator=measurement_generator(0, 0),
                                         **limits)
    fast_curvature.gni_by_batch_size(cnn, LOSSES["ce"], images, labels, [3], generator=measurement_generator(0, 0),
                                     exact=True, **limits)
    common = ["--width", "16", "--num-data", "120", "--batch", "8", "--steps", "11", "--quiet", "--measure-every", "5",
              "--exact-measurements"]
    runs = {"sgd": ["--lambdamax", "--batch-lambdamax", "--hessian-trace", "--gni", "--batch-sharpness", "--final"],
            "adam": ["--adam", "--lr", "0.001", "--preconditioned-sharpness"]}
    for name, flags in runs.items():
        run_dir = results_env / name
        assert training.main([*common, *flags, "--run-dir", str(run_dir)]) == 0
        resolved = json.loads((run_dir / "config.json").read_text())["resolved"]
        assert resolved["hvp_mode"] == resolved["batch_route"] == "double-backward"
