"""The first curvature family (lambda_max, Batch Sharpness, its ratio form, step sharpness, GNI)
against dense float64 values on tiny networks: exact expectations over all batches, and each
estimate recomputed from the very batches its generator draws, on every route."""

import functools
import math

import numpy as np
import pytest
import torch

from curvature_reference import (LOSSES, check_honest_estimates, dense_gradient, dense_hessian, drawn_batches,
                                 exact_ghg_family, forbid_fast_routes, mean_reference, ratio_reference, tiny_cnn,
                                 tiny_data, tiny_images, tiny_mlp)
from utils import batch_forms
from utils.config import RunConfig
from utils.errors import UserError
from utils.estimators import draw_partitions, measurement_generator
from utils.measures import (batch_sharpness, batch_sharpness_ratio, gni, gni_by_batch_size, lambda_max, partition_size,
                            step_sharpness)
from utils.monitor import partition_draw_measurements

N, B = 8, 3


@pytest.mark.parametrize("loss_name", ["mse", "ce"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_lambda_max_and_top_k_match_dense_spectrum(loss_name, chunk_size):
    model, (X, Y) = tiny_mlp(), tiny_data(10, loss_name)
    loss_fn = LOSSES[loss_name]
    spectrum = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, X, Y)).flip(0)
    eig, est = lambda_max(model, loss_fn, X, Y, tol=1e-8, chunk_size=chunk_size)
    assert est.value == pytest.approx(spectrum[0].item(), rel=1e-9)
    assert eig.converged and est.hvps == eig.matvecs and est.n == 1 and math.isnan(est.se)
    top, top_est = lambda_max(model, loss_fn, X, Y, k=3, tol=1e-8, chunk_size=chunk_size)
    torch.testing.assert_close(top.values, spectrum[:3], rtol=1e-9, atol=1e-12)
    assert top.vectors.shape == (26, 3) and top_est.value == top.values[0].item()


def test_lambda_max_methods_and_warm_start():
    model, (X, Y) = tiny_mlp(), tiny_data(10, "mse")
    loss_fn = LOSSES["mse"]
    spectrum = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, X, Y))
    largest_magnitude = spectrum[spectrum.abs().argmax()].item()
    power, _ = lambda_max(model, loss_fn, X, Y, tol=1e-7, method="power", max_iter=20000)
    assert power.values[0].item() == pytest.approx(largest_magnitude, rel=1e-6)
    lobpcg, _ = lambda_max(model, loss_fn, X, Y, tol=1e-8, method="lobpcg")
    assert lobpcg.values[0].item() == pytest.approx(spectrum[-1].item(), rel=1e-9)
    cold, cold_est = lambda_max(model, loss_fn, X, Y, tol=1e-8)
    warm, warm_est = lambda_max(model, loss_fn, X, Y, tol=1e-8, warm_start=cold)
    assert warm.values[0].item() == pytest.approx(spectrum[-1].item(), rel=1e-9)
    assert warm_est.hvps < cold_est.hvps
    with pytest.raises(UserError):
        lambda_max(model, loss_fn, X, Y, method="arnoldi")
    with pytest.raises(UserError):
        lambda_max(model, loss_fn, X, Y, k=2, method="power")


@pytest.mark.parametrize("train_mode", [True, False])
def test_lambda_max_batchnorm_mode_and_no_side_effects(train_mode):
    model, (X, Y) = tiny_mlp(batchnorm=True), tiny_data(10, "mse")
    loss_fn = LOSSES["mse"]
    model.train(not train_mode)
    buffers = [b.clone() for b in model.buffers()]
    params = [p.detach().clone() for p in model.parameters()]
    spectrum = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, X, Y, train_mode=train_mode))
    _, est = lambda_max(model, loss_fn, X, Y, tol=1e-8, train_mode=train_mode)
    assert est.value == pytest.approx(spectrum[-1].item(), rel=1e-9)
    assert model.training is (not train_mode)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_step_sharpness_is_the_batch_rayleigh_quotient():
    model, (X, Y) = tiny_mlp(), tiny_data(N, "ce")
    loss_fn = LOSSES["ce"]
    xb, yb = X[[1, 4, 6]], Y[[1, 4, 6]]
    g, H = dense_gradient(model, loss_fn, xb, yb), dense_hessian(model, loss_fn, xb, yb)
    est = step_sharpness(model, loss_fn, xb, yb)
    assert est.value == pytest.approx((g @ H @ g / (g @ g)).item(), rel=1e-12)
    assert est.hvps == 1 and est.n == 1 and math.isnan(est.se)


GHG = {"batch_sharpness": (batch_sharpness, 0.005), "batch_sharpness_ratio": (batch_sharpness_ratio, 0.005),
       "gni": (functools.partial(gni, closed_form=False), 0.01)}  # measurement and default relative SE target


@pytest.mark.parametrize("loss_name", ["mse", "ce"])
@pytest.mark.parametrize("name", sorted(GHG))
def test_ghg_family_converges_to_the_exact_expectations(name, loss_name):
    model, (X, Y) = tiny_mlp(), tiny_data(N, loss_name)
    loss_fn = LOSSES[loss_name]
    measure, target = GHG[name]
    exact = exact_ghg_family(model, loss_fn, X, Y, B)[name]
    est = measure(model, loss_fn, X, Y, B, generator=measurement_generator(0, 1))
    assert est.se < target * abs(est.value) or est.n == 1000
    assert abs(est.value - exact) < 4 * est.se
    assert est.n <= est.hvps and est.seconds > 0


@pytest.mark.parametrize("name, loss_name", [("batch_sharpness", "ce"), ("batch_sharpness_ratio", "ce"), ("gni", "mse")])
def test_ghg_family_standard_errors_are_honest(name, loss_name):
    model, (X, Y) = tiny_mlp(), tiny_data(N, loss_name)
    loss_fn = LOSSES[loss_name]
    exact = exact_ghg_family(model, loss_fn, X, Y, B)[name]
    estimates = [GHG[name][0](model, loss_fn, X, Y, B, generator=measurement_generator(seed, 0), min_samples=40,
                              max_samples=40)
                 for seed in range(100)]
    check_honest_estimates(estimates, exact)


def frozen_bias(model):
    """A frozen parameter: neither a Gram nor an R-operator chain, so one double backward per batch."""
    model[0].bias.requires_grad_(False)
    return model


ROUTES = {  # (model, loss, data, exact, train_mode) for each route of the per-batch forms on the CPU
    "stacked-gram": lambda: (tiny_mlp(), LOSSES["ce"], tiny_data(10, "ce"), False, True),
    "r-operator": lambda: (tiny_cnn(), LOSSES["mse"], tiny_images(10, "mse"), False, True),
    "double-backward": lambda: (frozen_bias(tiny_mlp()), LOSSES["mse"], tiny_data(10, "mse"), False, True),  # forced
    "batchnorm-eval": lambda: (tiny_mlp(batchnorm=True), LOSSES["ce"], tiny_data(10, "ce"), False, False),
    "exact": lambda: (tiny_mlp(), LOSSES["mse"], tiny_data(10, "mse"), True, True),
    "vmap-double-backward": lambda: (tiny_cnn(), LOSSES["ce"], tiny_images(10, "ce"), False, True),  # forced
}


class DenseBatches:
    """Dense g_B, H_B of any batch (cached), and g, H on all the data."""

    def __init__(self, model, loss_fn, X, Y, train_mode):
        self.args, self.train_mode, self.cache = (model, loss_fn), train_mode, {}
        self.X, self.Y = X, Y
        self.H = dense_hessian(model, loss_fn, X, Y, train_mode)
        self.g = dense_gradient(model, loss_fn, X, Y, train_mode)

    def __call__(self, idx):
        key = tuple(idx)
        if key not in self.cache:
            X, Y = self.X[idx], self.Y[idx]
            self.cache[key] = (dense_gradient(*self.args, X, Y, self.train_mode),
                               dense_hessian(*self.args, X, Y, self.train_mode))
        return self.cache[key]


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_estimates_are_those_of_the_drawn_batches_on_every_route(route, monkeypatch):
    """Batch Sharpness, its ratio form, step sharpness and GNI equal their values recomputed from
    dense derivatives of the batches the generator draws, with the stopping rule applied by brute
    force: the same samples, stopping point and standard error whatever route computes them."""
    model, loss_fn, (X, Y), exact, train_mode = ROUTES[route]()
    if route in ("vmap-double-backward", "double-backward"):  # small batches would take vmap on the CPU
        monkeypatch.setattr(batch_forms, "batch_route", lambda *args, **kwargs: route)
    dense = DenseBatches(model, loss_fn, X, Y, train_mode)
    limits = {"min_samples": 5, "max_samples": 200, "train_mode": train_mode, "exact": exact}
    batches = [dense(idx) for idx in drawn_batches(10, B, measurement_generator(4, 2), limits["max_samples"])]
    quadratic = np.array([(g @ H @ g).item() for g, H in batches])
    norm2 = np.array([(g @ g).item() for g, _ in batches])
    noise = np.array([(g @ dense.H @ g).item() for g, _ in batches]) / (dense.g @ dense.g).item()
    expected = {batch_sharpness: (0.04, mean_reference, (quadratic / norm2,)),
                batch_sharpness_ratio: (0.04, ratio_reference, (quadratic, norm2)),
                functools.partial(gni, closed_form=False): (0.1, mean_reference, (noise,))}
    for measure, (rel_se, reference, samples) in expected.items():
        value, se, n = reference(*samples, limits["min_samples"], limits["max_samples"], rel_se)
        got = measure(model, loss_fn, X, Y, B, generator=measurement_generator(4, 2), rel_se=rel_se, **limits)
        assert n < limits["max_samples"] and got.n == n and got.hvps >= n
        assert got.value == pytest.approx(value, rel=1e-10)
        assert got.se == pytest.approx(se, rel=1e-8)
    g, H = dense([2, 5, 7])
    step = step_sharpness(model, loss_fn, X[[2, 5, 7]], Y[[2, 5, 7]], train_mode=train_mode, exact=exact)
    assert step.value == pytest.approx((g @ H @ g / (g @ g)).item(), rel=1e-11) and step.hvps == 1


@pytest.mark.parametrize("chunk_size, block_size, exact", [(None, 10, False), (3, 10, False), (None, 1, True),
                                                           (2, 7, True)])
def test_gni_chunks_and_blocks_change_the_cost_only(chunk_size, block_size, exact):
    """GNI of a BatchNorm network (Hessian-vector products on the whole data) equals its value from
    the drawn batches for any chunking and block size; the products spent are the samples drawn,
    whole blocks of ``block_size`` after the first ``min_samples``."""
    model, (X, Y) = tiny_mlp(batchnorm=True), tiny_data(N, "ce")
    loss_fn = LOSSES["ce"]
    dense = DenseBatches(model, loss_fn, X, Y, train_mode=False)
    noise = np.array([(g @ dense.H @ g).item()
                      for g, _ in map(dense, drawn_batches(N, B, measurement_generator(5, 9), 1000))])
    value, se, n = mean_reference(noise, 20, 1000, 0.01)
    got = gni(model, loss_fn, X, Y, B, generator=measurement_generator(5, 9), chunk_size=chunk_size,
              block_size=block_size, train_mode=False, exact=exact, closed_form=False)
    norm2 = (dense.g @ dense.g).item()
    assert got.n == n and got.hvps == 20 + math.ceil((n - 20) / block_size) * block_size
    assert got.value == pytest.approx(value / norm2, rel=1e-10)
    assert got.se == pytest.approx(se / norm2, rel=1e-8)
    with pytest.raises(UserError):
        gni(model, loss_fn, X, Y, B, generator=measurement_generator(5, 9), block_size=0)


def test_measurements_are_reproducible_and_leave_global_state_alone():
    model, (X, Y) = tiny_mlp(batchnorm=True), tiny_data(N, "mse")
    loss_fn = LOSSES["mse"]
    model.eval()
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    rng_state = torch.get_rng_state()
    runs = []
    for _ in range(2):
        runs.append((
            batch_sharpness(model, loss_fn, X, Y, B, generator=measurement_generator(11, 40),
                            rel_se=0.05),
            gni(model, loss_fn, X, Y, B, generator=measurement_generator(11, 40), chunk_size=3,
                rel_se=0.2),
            lambda_max(model, loss_fn, X, Y, generator=measurement_generator(11, 40))[1],
            step_sharpness(model, loss_fn, X[:B], Y[:B]),
        ))
    for first, second in zip(*runs):
        assert (first.value, first.n, first.hvps) == (second.value, second.n, second.hvps)
        assert first.se == second.se or (math.isnan(first.se) and math.isnan(second.se))
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert model.training is False
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert all(p.grad is None for p in model.parameters())


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
        assert record["resolved"]["closed_forms"] == ([] if flag else ["gni"])
        frames[bool(flag)] = read_results(run_dir / "results.txt")
    columns = ["batch_sharpness", "batch_sharpness_se", "batch_sharpness_n", "step_sharpness", "batch_sharpness_ratio"]
    fast, exact = (frames[False][columns].dropna(), frames[True][columns].dropna())
    assert len(fast) == 3
    np.testing.assert_allclose(fast.to_numpy(), exact.to_numpy(), rtol=2e-4)
    # GNI: sampled either way, or in closed form (no batches) without the flag where that is cheaper.
    fast, exact = frames[False].dropna(subset=["gni"]), frames[True].dropna(subset=["gni"])
    assert (exact["gni_n"] >= 20).all()
    closed = (fast["gni_n"] == 0).to_numpy()
    assert (fast["gni_se"].to_numpy()[closed] == 0).all()
    assert (np.abs(fast["gni"] - exact["gni"]).to_numpy()[closed] < 4 * exact["gni_se"].to_numpy()[closed]).all()
    np.testing.assert_allclose(fast[~closed][["gni", "gni_se", "gni_n"]].to_numpy(),
                               exact[~closed][["gni", "gni_se", "gni_n"]].to_numpy(), rtol=2e-4)


def test_exact_measurements_use_plain_double_backward_for_every_hessian_product(results_env, monkeypatch):
    """On a GPU the default HVP mode is a faster one; --exact-measurements must not ask for it."""
    import json

    import training

    forbid_fast_routes(monkeypatch)
    model, (X, Y) = tiny_mlp(), tiny_data(12, "mse")
    with pytest.raises(AssertionError, match="fast route"):
        lambda_max(model, LOSSES["mse"], X, Y)
    cnn, (images, labels) = tiny_cnn(), tiny_images(10, "ce")  # the default mode would be the R-operator
    limits = {"min_samples": 5, "max_samples": 10}
    with pytest.raises(AssertionError, match="fast route"):
        gni_by_batch_size(cnn, LOSSES["ce"], images, labels, [3], generator=measurement_generator(0, 0), **limits)
    gni_by_batch_size(cnn, LOSSES["ce"], images, labels, [3], generator=measurement_generator(0, 0), exact=True,
                      **limits)
    common = ["--width", "16", "--num-data", "120", "--batch", "8", "--steps", "11", "--quiet", "--measure-every", "5",
              "--exact-measurements"]
    runs = {"sgd": ["--lambdamax", "--batch-lambdamax", "--hessian-trace", "--gni", "--batch-sharpness", "--final"],
            "adam": ["--adam", "--lr", "0.001", "--preconditioned-sharpness"]}
    for name, flags in runs.items():
        run_dir = results_env / name
        assert training.main([*common, *flags, "--run-dir", str(run_dir)]) == 0
        resolved = json.loads((run_dir / "config.json").read_text())["resolved"]
        assert resolved["hvp_mode"] == resolved["batch_route"] == "double-backward"


PARTITIONED = {"batch_sharpness": batch_sharpness, "batch_sharpness_ratio": batch_sharpness_ratio}


@pytest.mark.parametrize("n", [8, 10])
@pytest.mark.parametrize("name", sorted(PARTITIONED))
def test_partition_draws_converge_to_the_exact_expectations(name, n):
    """Means over the floor(n/b) disjoint batches of random permutations: no bias against the
    average over all C(n, b) batches, and _n counts batches (a multiple of floor(n/b))."""
    model, (X, Y) = tiny_mlp(), tiny_data(n, "ce")
    loss_fn = LOSSES["ce"]
    exact = exact_ghg_family(model, loss_fn, X, Y, B)[name]
    est = PARTITIONED[name](model, loss_fn, X, Y, B, generator=measurement_generator(0, 1), partition_draws=True)
    assert est.se < 0.005 * abs(est.value) or est.capped
    assert abs(est.value - exact) < 4 * est.se
    assert est.n % (n // B) == 0 and est.n <= est.hvps <= 1000


@pytest.mark.parametrize("name", sorted(PARTITIONED))
def test_partition_draws_standard_errors_are_honest(name):
    model, (X, Y) = tiny_mlp(), tiny_data(N, "ce")
    loss_fn = LOSSES["ce"]
    exact = exact_ghg_family(model, loss_fn, X, Y, B)[name]
    estimates = [PARTITIONED[name](model, loss_fn, X, Y, B, generator=measurement_generator(seed, 0), min_samples=40,
                                   max_samples=40, partition_draws=True)
                 for seed in range(100)]
    assert all(e.n == 40 and e.capped for e in estimates)
    check_honest_estimates(estimates, exact)


def test_partition_draws_are_the_means_of_the_drawn_partitions():
    """Batch Sharpness and its ratio form equal the stopping rule applied by brute force to the
    group means of dense per-batch terms of the very partitions the generator draws; each group's
    batches are disjoint."""
    n = 10
    model, loss_fn, (X, Y) = tiny_mlp(), LOSSES["mse"], tiny_data(n, "mse")
    per_group, groups = n // B, 60
    idx = draw_partitions(n, B, groups, per_group, measurement_generator(4, 2))
    assert all(len(set(part.reshape(-1).tolist())) == per_group * B for part in idx.view(groups, per_group, B))
    terms = [(dense_gradient(model, loss_fn, X[rows], Y[rows]), dense_hessian(model, loss_fn, X[rows], Y[rows]))
             for rows in idx]
    quadratic = np.array([(g @ H @ g).item() for g, H in terms]).reshape(groups, per_group)
    norm2 = np.array([(g @ g).item() for g, _ in terms]).reshape(groups, per_group)
    limits = {"min_samples": 5 * per_group, "max_samples": groups * per_group}
    expected = {batch_sharpness: (mean_reference, ((quadratic / norm2).mean(1),)),
                batch_sharpness_ratio: (ratio_reference, (quadratic.mean(1), norm2.mean(1)))}
    for measure, (reference, samples) in expected.items():
        value, se, k = reference(*samples, 5, groups, 0.02)
        got = measure(model, loss_fn, X, Y, B, generator=measurement_generator(4, 2), rel_se=0.02,
                      partition_draws=True, **limits)
        assert k < groups and got.n == k * per_group and got.hvps >= got.n
        assert got.value == pytest.approx(value, rel=1e-10) and got.se == pytest.approx(se, rel=1e-8)


def test_partition_draws_only_where_the_data_hold_few_batches():
    assert [partition_size(n, 3, True) for n in (5, 6, 8, 26, 27)] == [1, 2, 2, 8, 1]
    assert partition_size(8, 3, False) == 1
    # What a new run records in config.json (resolved.partition_draws): the enabled measurements
    # of the same-batch family, where floor(n / b) is small.
    cfg = RunConfig(batch=16, batch_sharpness=True, gauss_newton=True, gni=True)
    assert partition_draw_measurements(cfg, torch.zeros(64, 2)) == ["batch_sharpness", "gauss_newton"]
    assert partition_draw_measurements(cfg, torch.zeros(160, 2)) == []
