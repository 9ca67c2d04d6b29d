"""The second curvature family against exact dense float64 values on a tiny network.

Expectations over random batches are exact averages over all C(8, 3) batches; Gauss–Newton
matrices are assembled from explicit per-sample Jacobians; optimiser-dependent quantities are
checked against what torch.optim.SGD and torch.optim.Adam actually do.
"""

import copy
import math

import numpy as np
import pytest
import torch

from curvature_reference import (LOSSES, all_batches, batch_derivatives, check_honest_estimates, dense_gauss_newton,
                                 dense_gradient, dense_hessian, mean_reference, tiny_data, tiny_mlp)
from utils.estimators import measurement_generator
from utils.gauss_newton import GaussNewtonOperator
from utils.hvp import flat_grad, flat_params
from utils.measures import (adam_preconditioner, batch_lambda_max, batch_sharpness, gn_batch_sharpness, gn_lambda_max,
                            gni, gradient_norms, hessian_trace, momentum_buffer, momentum_direction, momentum_sharpness,
                            param_distance, preconditioned_sharpness, rademacher_probe, unseen_with_curvature)

N, B = 8, 3


@pytest.mark.parametrize("loss_name", ["mse", "ce"])
def test_batch_lambda_max_converges_to_the_mean_top_eigenvalue(loss_name):
    model, (X, Y) = tiny_mlp(), tiny_data(N, loss_name)
    loss_fn = LOSSES[loss_name]
    exact = np.mean([torch.linalg.eigvalsh(H)[-1].item() for _, H in batch_derivatives(model, loss_fn, X, Y, B)])
    est = batch_lambda_max(model, loss_fn, X, Y, B, generator=measurement_generator(0, 3), tol=1e-8)
    assert 10 <= est.n <= 100 and (est.se < 0.02 * abs(est.value) or est.n == 100)
    assert abs(est.value - exact) < 4 * est.se
    assert est.hvps >= est.n


def test_batch_lambda_max_of_a_single_batch_is_its_exact_top_eigenvalue():
    # With b = n every batch is the whole data: the estimate is exact and stops at once.
    model, (X, Y) = tiny_mlp(), tiny_data(N, "mse")
    loss_fn = LOSSES["mse"]
    top = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, X, Y))[-1].item()
    est = batch_lambda_max(model, loss_fn, X, Y, N, generator=measurement_generator(0, 0), tol=1e-10)
    assert est.n == 10 and est.value == pytest.approx(top, rel=1e-9) and est.se < 1e-9 * top


@pytest.mark.parametrize("loss_name", ["mse", "ce"])
def test_hessian_trace_matches_the_dense_trace(loss_name):
    model, (X, Y) = tiny_mlp(), tiny_data(10, loss_name)
    loss_fn = LOSSES[loss_name]
    exact = torch.trace(dense_hessian(model, loss_fn, X, Y)).item()
    est = hessian_trace(model, loss_fn, X, Y, generator=measurement_generator(0, 4))
    assert est.se < 0.01 * abs(est.value) or est.n == 1000
    assert abs(est.value - exact) < 4 * est.se
    assert est.n <= est.hvps < est.n + 10
    # Chunks and blocks change the cost only: the probes drawn one by one from the generator,
    # recomputed here, give the estimate, its SE and its stopping point.
    H = dense_hessian(model, loss_fn, X, Y)
    probes = measurement_generator(0, 4)
    Z = torch.stack([rademacher_probe(H.shape[0], probes, torch.float64, "cpu") for _ in range(1000)], dim=1)
    value, se, n = mean_reference((Z * (H @ Z)).sum(0).numpy(), 10, 1000, 0.05)
    for chunk_size, block_size in ((3, 7), (None, 1), (None, 10)):
        other = hessian_trace(model, loss_fn, X, Y, generator=measurement_generator(0, 4), rel_se=0.05,
                              chunk_size=chunk_size, block_size=block_size)
        assert other.n == n and other.value == pytest.approx(value, rel=1e-10)
        assert other.se == pytest.approx(se, rel=1e-8)


def test_hessian_trace_standard_error_follows_the_rademacher_variance():
    # Var(z^T H z) = 2 sum_{j != k} H_jk^2; here H is the 2 x 2 Hessian of w x + c under mse.
    model = torch.nn.Linear(1, 1).double()
    X = torch.full((6, 1), 0.5, dtype=torch.float64)
    Y = torch.randn(6, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    H = dense_hessian(model, LOSSES["mse"], X, Y)
    est = hessian_trace(model, LOSSES["mse"], X, Y, generator=measurement_generator(1, 1), min_samples=400,
                        max_samples=400, block_size=400)
    sd = math.sqrt(2 * (H.square().sum() - H.diagonal().square().sum()).item())
    assert est.se == pytest.approx(sd / math.sqrt(400), rel=0.1)
    assert abs(est.value - torch.trace(H).item()) < 4 * est.se


def test_hessian_trace_standard_errors_are_honest():
    model, (X, Y) = tiny_mlp(), tiny_data(N, "ce")
    loss_fn = LOSSES["ce"]
    exact = torch.trace(dense_hessian(model, loss_fn, X, Y)).item()
    estimates = [hessian_trace(model, loss_fn, X, Y, generator=measurement_generator(seed, 0), min_samples=40,
                               max_samples=40, block_size=40)
                 for seed in range(100)]
    check_honest_estimates(estimates, exact)


@pytest.mark.parametrize("loss_name", ["mse", "ce"])
@pytest.mark.parametrize("batchnorm, train_mode", [(False, True), (True, True), (True, False)])
def test_gauss_newton_products_match_explicit_jacobians(loss_name, batchnorm, train_mode):
    model, (X, Y) = tiny_mlp(batchnorm=batchnorm), tiny_data(10, loss_name)
    loss_fn = LOSSES[loss_name]
    G = dense_gauss_newton(model, loss_name, X, Y, train_mode)
    V = torch.randn(G.shape[0], 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    op = GaussNewtonOperator(model, loss_fn, X, Y, train_mode=train_mode)
    torch.testing.assert_close(op.matvec(V), G @ V, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.matvec(V[:, 0]), G @ V[:, 0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.gradient(), flat_grad(model, loss_fn, X, Y, train_mode=train_mode),
                               rtol=1e-10, atol=1e-13)
    assert op.hvps == 4
    if not batchnorm:  # chunks share no statistics, so G = sum_c (n_c / n) G_c is the same matrix
        chunked = GaussNewtonOperator(model, loss_fn, X, Y, chunk_size=3, train_mode=train_mode)
        torch.testing.assert_close(chunked.matvec(V), G @ V, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(chunked.gradient(), op.gradient(), rtol=1e-10, atol=1e-13)


def test_gauss_newton_is_the_hessian_of_a_linear_model():
    # With outputs linear in the parameters the second term of H vanishes: G = H exactly.
    model = torch.nn.Linear(3, 2).double()
    for loss_name in ("mse", "ce"):
        X, Y = tiny_data(10, loss_name)
        H = dense_hessian(model, LOSSES[loss_name], X, Y)
        op = GaussNewtonOperator(model, LOSSES[loss_name], X, Y)
        torch.testing.assert_close(op.matvec(torch.eye(H.shape[0], dtype=torch.float64)), H, rtol=1e-10, atol=1e-12)


def exact_gn_batch_sharpness(model, loss_name, X, Y):
    """E_B[g_B^T G_B g_B / |g_B|^2] over every batch, G_B from explicit Jacobians."""
    quotients = []
    for idx in all_batches(N, B):
        g_B = dense_gradient(model, LOSSES[loss_name], X[idx], Y[idx])
        quotients.append((g_B @ dense_gauss_newton(model, loss_name, X[idx], Y[idx]) @ g_B / (g_B @ g_B)).item())
    return float(np.mean(quotients))


@pytest.mark.parametrize("loss_name", ["mse", "ce"])
def test_gn_lambda_max_and_gn_batch_sharpness_match_exact_values(loss_name):
    model, (X, Y) = tiny_mlp(), tiny_data(N, loss_name)
    loss_fn = LOSSES[loss_name]
    eig, top = gn_lambda_max(model, loss_fn, X, Y, tol=1e-9, chunk_size=3)
    G = dense_gauss_newton(model, loss_name, X, Y)
    assert top.value == pytest.approx(torch.linalg.eigvalsh(G)[-1].item(), rel=1e-9)
    assert eig.converged and top.hvps == eig.matvecs and math.isnan(top.se)
    exact = exact_gn_batch_sharpness(model, loss_name, X, Y)
    est = gn_batch_sharpness(model, loss_fn, X, Y, B, generator=measurement_generator(0, 5))
    assert est.se < 0.005 * abs(est.value) or est.n == 1000
    assert abs(est.value - exact) < 4 * est.se and est.hvps == est.n


def test_gn_batch_sharpness_standard_errors_are_honest():
    model, (X, Y) = tiny_mlp(), tiny_data(N, "ce")
    exact = exact_gn_batch_sharpness(model, "ce", X, Y)
    estimates = [gn_batch_sharpness(model, LOSSES["ce"], X, Y, B, generator=measurement_generator(seed, 0),
                                    min_samples=40, max_samples=40)
                 for seed in range(100)]
    check_honest_estimates(estimates, exact)


def test_gn_batch_sharpness_partition_draws_are_unbiased_with_honest_standard_errors():
    """Means over the two disjoint batches of random permutations (n = 8, b = 3): against the
    average over all C(8, 3) batches; the operator loop of ``exact`` takes the same batches."""
    model, (X, Y) = tiny_mlp(), tiny_data(N, "ce")
    exact = exact_gn_batch_sharpness(model, "ce", X, Y)
    options = {"min_samples": 40, "max_samples": 40, "partition_draws": True}
    estimates = [gn_batch_sharpness(model, LOSSES["ce"], X, Y, B, generator=measurement_generator(seed, 0), **options)
                 for seed in range(100)]
    assert all(e.n == e.hvps == 40 for e in estimates)
    check_honest_estimates(estimates, exact)
    plain = gn_batch_sharpness(model, LOSSES["ce"], X, Y, B, generator=measurement_generator(0, 0), exact=True,
                               **options)
    assert plain.value == pytest.approx(estimates[0].value, rel=1e-10) and plain.n == 40


def test_gradient_norms_match_enumeration_and_the_sampling_formula():
    model, (X, Y) = tiny_mlp(), tiny_data(N, "mse")
    loss_fn = LOSSES["mse"]
    g = dense_gradient(model, loss_fn, X, Y)
    exact = np.mean([(gb @ gb).item() for gb, _ in batch_derivatives(model, loss_fn, X, Y, B)])
    per_sample = torch.stack([dense_gradient(model, loss_fn, X[i:i + 1], Y[i:i + 1]) for i in range(N)])
    spread = (per_sample - g).square().sum(dim=1).mean().item()
    assert exact == pytest.approx((g @ g).item() + (N - B) / (B * (N - 1)) * spread, rel=1e-10)
    batch, full = gradient_norms(model, loss_fn, X, Y, B, generator=measurement_generator(0, 6), chunk_size=3,
                                 closed_form=False)
    assert full.value == pytest.approx((g @ g).item(), rel=1e-12) and math.isnan(full.se) and full.hvps == 0
    assert batch.se < 0.01 * batch.value or batch.n == 1000
    assert abs(batch.value - exact) < 4 * batch.se and batch.hvps == 0


def test_gradient_norm_standard_errors_are_honest():
    model, (X, Y) = tiny_mlp(), tiny_data(N, "ce")
    loss_fn = LOSSES["ce"]
    exact = np.mean([(gb @ gb).item() for gb, _ in batch_derivatives(model, loss_fn, X, Y, B)])
    estimates = [gradient_norms(model, loss_fn, X, Y, B, generator=measurement_generator(seed, 0), closed_form=False,
                                min_samples=40,
                                max_samples=40)[0]
                 for seed in range(100)]
    check_honest_estimates(estimates, exact)


def sgd_with_history(model, loss_fn, X, Y, nesterov, steps):
    """torch.optim.SGD with momentum after ``steps`` real steps on fixed batches."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=nesterov)
    for t in range(steps):
        idx = [t % N, (t + 3) % N, (t + 5) % N]
        optimizer.zero_grad()
        loss_fn(model(X[idx]), Y[idx]).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("history", [0, 3])
def test_momentum_direction_is_the_update_sgd_takes(nesterov, history):
    model, (X, Y) = tiny_mlp(), tiny_data(N, "mse")
    loss_fn = LOSSES["mse"]
    optimizer = sgd_with_history(model, loss_fn, X, Y, nesterov, history)
    idx = [1, 4, 6]
    g = flat_grad(model, loss_fn, X[idx], Y[idx])
    s = momentum_direction(g, momentum_buffer(optimizer, model), 0.9, nesterov)
    twin, twin_optimizer = copy.deepcopy((model, optimizer))
    before = flat_params(twin)
    loss_fn(twin(X[idx]), Y[idx]).backward()
    twin_optimizer.step()
    torch.testing.assert_close(s, (before - flat_params(twin)) / 0.1, rtol=1e-10, atol=1e-12)


def exact_momentum_sharpness(model, loss_fn, X, Y, buffer, nesterov):
    """E_B[s^T H_B s] / E_B[s^T g_B] over every batch, s written out for mu = 0.9."""
    quadratic, slope = [], []
    for g, H in batch_derivatives(model, loss_fn, X, Y, B):
        s = g + 0.9 * (0.9 * buffer + g) if nesterov else g + 0.9 * buffer
        quadratic.append((s @ H @ s).item())
        slope.append((s @ g).item())
    return float(np.mean(quadratic) / np.mean(slope))


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_sharpness_converges_to_the_exact_ratio_of_means(nesterov):
    model, (X, Y) = tiny_mlp(), tiny_data(N, "ce")
    loss_fn = LOSSES["ce"]
    optimizer = sgd_with_history(model, loss_fn, X, Y, nesterov, 4)
    exact = exact_momentum_sharpness(model, loss_fn, X, Y, momentum_buffer(optimizer, model), nesterov)
    est = momentum_sharpness(model, loss_fn, X, Y, B, optimizer=optimizer, generator=measurement_generator(0, 7))
    assert est.se < 0.005 * abs(est.value) or est.n == 1000
    assert abs(est.value - exact) < 4 * est.se and est.hvps == est.n
    assert all(p.grad is None for p in model.parameters())


def test_momentum_sharpness_standard_errors_are_honest():
    model, (X, Y) = tiny_mlp(), tiny_data(N, "ce")
    loss_fn = LOSSES["ce"]
    optimizer = sgd_with_history(model, loss_fn, X, Y, False, 4)
    exact = exact_momentum_sharpness(model, loss_fn, X, Y, momentum_buffer(optimizer, model), False)
    estimates = [momentum_sharpness(model, loss_fn, X, Y, B, optimizer=optimizer,
                                    generator=measurement_generator(seed, 0), min_samples=40, max_samples=40)
                 for seed in range(100)]
    check_honest_estimates(estimates, exact)


def adam_with_state(model, step, seed=3):
    """torch.optim.Adam whose moments after ``step`` steps are set by hand."""
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        optimizer.state[p] = {"step": torch.tensor(float(step)),
                              "exp_avg": torch.randn(p.shape, generator=generator, dtype=p.dtype),
                              "exp_avg_sq": torch.rand(p.shape, generator=generator, dtype=p.dtype) * 1e-2}
    return optimizer


def test_adam_preconditioner_from_a_hand_built_state():
    model = tiny_mlp()
    assert adam_preconditioner(torch.optim.Adam(model.parameters()), model) is None
    optimizer = adam_with_state(model, 7)
    v = torch.cat([optimizer.state[p]["exp_avg_sq"].reshape(-1) for p in model.parameters()])
    expected = (1 - 0.9 ** 7) * (torch.sqrt(v / (1 - 0.999 ** 7)) + 1e-8)
    P, seen = adam_preconditioner(optimizer, model)
    torch.testing.assert_close(P, expected, rtol=1e-13, atol=0)
    assert torch.equal(seen, v > 0)


def test_adam_preconditioner_is_what_adam_divides_its_next_update_by():
    model, (X, Y) = tiny_mlp(), tiny_data(N, "mse")
    loss_fn = LOSSES["mse"]
    optimizer = adam_with_state(model, 5)
    before = flat_params(model)
    loss_fn(model(X), Y).backward()
    optimizer.step()
    # After update k = 6: theta' - theta = -lr P^{-1} m, the bias correction of m inside P.
    m = torch.cat([optimizer.state[p]["exp_avg"].reshape(-1) for p in model.parameters()])
    step = -0.01 * m / adam_preconditioner(optimizer, model)[0]
    torch.testing.assert_close(flat_params(model) - before, step, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("loss_name", ["mse", "ce"])
def test_preconditioned_sharpness_matches_the_dense_preconditioned_hessian(loss_name):
    model, (X, Y) = tiny_mlp(), tiny_data(10, loss_name)
    loss_fn = LOSSES[loss_name]
    optimizer = adam_with_state(model, 7)
    v = torch.cat([optimizer.state[p]["exp_avg_sq"].reshape(-1) for p in model.parameters()])
    D = torch.diag(((1 - 0.9 ** 7) * (torch.sqrt(v / (1 - 0.999 ** 7)) + 1e-8)).rsqrt())
    H = dense_hessian(model, loss_fn, X, Y)
    exact = torch.linalg.eigvalsh(D @ H @ D)[-1].item()
    eig, est = preconditioned_sharpness(model, loss_fn, X, Y, optimizer=optimizer, tol=1e-9, chunk_size=4)
    assert eig.converged and est.value == pytest.approx(exact, rel=1e-8) and est.hvps == eig.matvecs
    # The same spectrum as P^{-1} H, the curvature along which Adam steps.
    assert est.value == pytest.approx(torch.linalg.eigvals(D @ D @ H).real.max().item(), rel=1e-8)
    with pytest.raises(ValueError):
        preconditioned_sharpness(model, loss_fn, X, Y, optimizer=torch.optim.Adam(model.parameters()))


def test_param_distance_is_the_euclidean_distance_over_trainable_parameters():
    model = tiny_mlp(batchnorm=True)
    reference = flat_params(model)
    assert param_distance(model, reference).value == 0
    with torch.no_grad():
        model[0].weight[0, 0] += 3.0
        model[3].bias[1] -= 4.0
    est = param_distance(model, reference)
    assert est.value == pytest.approx(5.0, rel=1e-12) and est.hvps == 0 and math.isnan(est.se)


def test_batch_lambda_max_warns_when_solves_miss_their_tolerance():
    model, (X, Y) = tiny_mlp(), tiny_data(N, "mse")
    with pytest.warns(UserWarning, match="batch solves stopped above tol"):
        batch_lambda_max(model, LOSSES["mse"], X, Y, 3, generator=torch.Generator().manual_seed(0),
                         min_samples=10, max_samples=10, tol=1e-12, max_iter=2)


def test_batch_lambda_max_standard_errors_are_honest():
    model, (X, Y) = tiny_mlp(), tiny_data(N, "mse")
    loss_fn = LOSSES["mse"]
    exact = np.mean([torch.linalg.eigvalsh(H)[-1].item() for _, H in batch_derivatives(model, loss_fn, X, Y, B)])
    estimates = [batch_lambda_max(model, loss_fn, X, Y, B, generator=measurement_generator(seed, 0),
                                  min_samples=20, max_samples=20)
                 for seed in range(100)]
    check_honest_estimates(estimates, exact)


@pytest.mark.parametrize("train_mode", [True, False])
def test_batchnorm_measurements_take_the_requested_mode(train_mode):
    """With b = n every batch is the whole data, so each Monte Carlo measurement equals a dense
    value of the requested mode: BatchNorm normalises by the data's own statistics in train
    mode and by running statistics (set far from them here) in eval mode."""
    model, (X, Y) = tiny_mlp(batchnorm=True), tiny_data(N, "mse")
    with torch.no_grad():
        model[1].running_mean.copy_(torch.tensor([0.3, -0.2, 0.1, 0.5]))
        model[1].running_var.copy_(torch.tensor([0.5, 2.0, 1.5, 0.8]))
    loss_fn = LOSSES["mse"]
    H = dense_hessian(model, loss_fn, X, Y, train_mode=train_mode)
    assert not torch.allclose(H, dense_hessian(model, loss_fn, X, Y, train_mode=not train_mode), rtol=0.05)
    g = dense_gradient(model, loss_fn, X, Y, train_mode=train_mode)
    G = dense_gauss_newton(model, "mse", X, Y, train_mode)
    rayleigh = (g @ H @ g / (g @ g)).item()

    def limits(samples=4):
        return {"generator": measurement_generator(0, 0), "min_samples": samples, "max_samples": samples,
                "train_mode": train_mode}

    chunk_size = None if train_mode else 3  # train-mode chunks would normalise by their own statistics
    assert gni(model, loss_fn, X, Y, N, chunk_size=chunk_size, **limits()).value == pytest.approx(rayleigh, rel=1e-10)
    assert batch_sharpness(model, loss_fn, X, Y, N, **limits()).value == pytest.approx(rayleigh, rel=1e-10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # empty buffer: s_B = g_B
    assert momentum_sharpness(model, loss_fn, X, Y, N, optimizer=optimizer, **limits()).value == pytest.approx(
        rayleigh, rel=1e-10)
    top = torch.linalg.eigvalsh(H)[-1].item()
    assert batch_lambda_max(model, loss_fn, X, Y, N, tol=1e-10, **limits(2)).value == pytest.approx(top, rel=1e-9)
    assert gn_batch_sharpness(model, loss_fn, X, Y, N, **limits()).value == pytest.approx(
        (g @ G @ g / (g @ g)).item(), rel=1e-10)
    _, gn_top = gn_lambda_max(model, loss_fn, X, Y, tol=1e-10, train_mode=train_mode)
    assert gn_top.value == pytest.approx(torch.linalg.eigvalsh(G)[-1].item(), rel=1e-9)
    batch, full = gradient_norms(model, loss_fn, X, Y, N, chunk_size=chunk_size, **limits())
    assert batch.value == pytest.approx((g @ g).item(), rel=1e-10)
    assert full.value == pytest.approx((g @ g).item(), rel=1e-10)
    # The trace's probes are drawn one by one from the generator: recompute them.
    probes = measurement_generator(0, 0)
    Z = torch.stack([rademacher_probe(H.shape[0], probes, torch.float64, "cpu") for _ in range(5)], dim=1)
    trace = hessian_trace(model, loss_fn, X, Y, block_size=5, **limits(5))
    assert trace.value == pytest.approx((Z * (H @ Z)).sum(0).mean().item(), rel=1e-10)


def test_preconditioned_sharpness_leaves_out_and_counts_the_coordinates_adam_has_not_seen():
    """Adam steps only on samples whose first input is 0, so the first-layer weights of that input
    never get a gradient (v = 0) although the full-batch Hessian has curvature there."""
    model, (X, Y) = tiny_mlp(), tiny_data(N, "mse")
    X[: N // 2, 0] = 0.0
    loss_fn = LOSSES["mse"]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        loss_fn(model(X[: N // 2]), Y[: N // 2]).backward()
        optimizer.step()
    P, seen = adam_preconditioner(optimizer, model)
    assert (~seen).sum() == 4  # W_1[:, 0], one weight per hidden unit
    H = dense_hessian(model, loss_fn, X, Y)
    S = torch.nonzero(seen)[:, 0]
    D = torch.diag(P[S].rsqrt())
    exact = torch.linalg.eigvalsh(D @ H[S][:, S] @ D)[-1].item()
    generator = torch.Generator().manual_seed(3)
    eig, est = preconditioned_sharpness(model, loss_fn, X, Y, optimizer=optimizer, tol=1e-10, generator=generator)
    assert est.value == pytest.approx(exact, rel=1e-8)
    # With the unseen block the top eigenvalue is set by eps = 1e-8: orders of magnitude larger.
    everything = torch.linalg.eigvalsh(torch.diag(P.rsqrt()) @ H @ torch.diag(P.rsqrt()))[-1].item()
    assert everything > 1e5 * exact
    unseen = unseen_with_curvature(model, loss_fn, X, Y, optimizer=optimizer, generator=generator)
    assert unseen.value == int(((H != 0).any(dim=1) & ~seen).sum()) == 4 and unseen.hvps == 1


def test_preconditioned_sharpness_is_nan_while_adam_has_seen_no_coordinate():
    """After a step on a batch whose gradient is 0 everywhere (targets equal the outputs) Adam's
    second moments are all 0: there is no coordinate to measure on, although H is not 0."""
    model, (X, Y) = tiny_mlp(), tiny_data(N, "mse")
    loss_fn = LOSSES["mse"]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    optimizer.zero_grad()
    with torch.no_grad():
        fitted = model(X[:3])
    loss_fn(model(X[:3]), fitted).backward()
    optimizer.step()
    assert not adam_preconditioner(optimizer, model)[1].any()
    assert torch.linalg.eigvalsh(dense_hessian(model, loss_fn, X, Y))[-1] > 0
    eig, est = preconditioned_sharpness(model, loss_fn, X, Y, optimizer=optimizer, generator=torch.Generator().manual_seed(0))
    assert math.isnan(est.value) and est.hvps == 0 and eig.converged


def frozen_adam_diverges(H: np.ndarray, P: np.ndarray, lr: float, beta1: float = 0.9, steps: int = 20000) -> bool:
    """Adam with its preconditioner P frozen, on the quadratic (1/2) e^T H e:
    m <- beta1 m + (1 - beta1) H e, e <- e - lr m / P (heavy-ball momentum on P^{-1} H)."""
    e, m = np.ones(len(P)), np.zeros(len(P))
    for _ in range(steps):
        m = beta1 * m + (1 - beta1) * (H @ e)
        e = e - lr * m / P
        if not np.linalg.norm(e) < 1e3:
            return True
    return False


@pytest.mark.parametrize("k", [2, 5, 40])
def test_frozen_adam_is_stable_just_below_38_over_eta_of_the_measured_sharpness(k):
    """On a quadratic (a linear model with mse), after k real Adam steps: with the preconditioner
    frozen, Adam converges at lr = 0.97 * 38 / S and diverges at 1.03 * 38 / S, S the measured
    preconditioned sharpness; without the factor 1 - beta_1^k the threshold would be off by
    1 / (1 - beta_1^k) (x 2.4 at k = 5)."""
    generator = torch.Generator().manual_seed(k)
    X = torch.randn(12, 4, generator=generator, dtype=torch.float64)
    Y = torch.randn(12, 1, generator=generator, dtype=torch.float64)
    model = torch.nn.Linear(4, 1, bias=False).double()
    loss_fn = LOSSES["mse"]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(k):
        optimizer.zero_grad()
        loss_fn(model(X), Y).backward()
        optimizer.step()
    _, est = preconditioned_sharpness(model, loss_fn, X, Y, optimizer=optimizer, tol=1e-12,
                                      generator=torch.Generator().manual_seed(0))
    H = dense_hessian(model, loss_fn, X, Y).numpy()
    # The frozen step written as torch's Adam writes it (not through adam_preconditioner):
    # e <- e - lr * m_hat / (sqrt(v_hat) + eps), m_hat = m / (1 - beta1^k), v_hat = v / (1 - beta2^k).
    state = optimizer.state[model.weight]
    beta1, beta2 = optimizer.param_groups[0]["betas"]
    eps, steps = optimizer.param_groups[0]["eps"], int(state["step"])
    v_hat = (state["exp_avg_sq"] / (1 - beta2 ** steps)).flatten().numpy()
    P = (1 - beta1 ** steps) * (np.sqrt(v_hat) + eps)
    threshold_lr = 38 / est.value
    assert not frozen_adam_diverges(H, P, 0.97 * threshold_lr)
    assert frozen_adam_diverges(H, P, 1.03 * threshold_lr)
    if k <= 5:  # the threshold without the factor is visibly wrong early on
        assert frozen_adam_diverges(H, P, 0.97 * 38 / (est.value * (1 - 0.9 ** k)))
