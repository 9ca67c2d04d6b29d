"""Noise baselines: closed-form checks on linear regression, the SDE's limits, end-to-end runs and exact resume."""

import json
import math

import pandas as pd
import pytest
import torch

import training
from run_checks import interrupt_at, same_results
from utils.checkpoints import list_checkpoints, load_checkpoint
from utils.losses import ce_loss, mse_loss
from utils.noise import (STATISTICS_BUDGET, NoisyStep, accumulate_gradient, default_statistics_chunk, gradient_moments,
                         noise_generator, sde_substeps, sgd_weights)
from utils.results import read_results

N, D, BATCH = 40, 3, 5


def regression(seed=0):
    """Linear least squares f(x) = theta^T x with per-sample gradients g_i = 2 (theta^T x_i - y_i) x_i."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D, generator=g, dtype=torch.float64) @ torch.tensor([[1.0, 0.8, 0.0], [0.0, 0.6, 0.3], [0.0, 0.0, 1.2]],
                                                                            dtype=torch.float64)
    Y = torch.randn(N, 1, generator=g, dtype=torch.float64)
    model = torch.nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.7, -1.1, 0.4]], dtype=torch.float64))
    residual = X @ model.weight.detach().reshape(-1) - Y.reshape(-1)
    per_sample = 2 * residual[:, None] * X
    mean = per_sample.mean(dim=0)
    sigma = (per_sample - mean).T @ (per_sample - mean) / N
    return model, X, Y, per_sample, mean, sigma


def sampled_gradients(step_fn, model, draws):
    """The flat gradient left in .grad by ``step_fn(step)`` for steps 0..draws-1."""
    rows = []
    for step in range(draws):
        model.zero_grad(set_to_none=True)
        step_fn(step)
        rows.append(model.weight.grad.reshape(-1).clone())
    return torch.stack(rows)


def assert_gaussian_moments(samples, mean, cov, z=5.0):
    """Mean within z standard errors; each covariance entry within z SE of a Gaussian sample covariance."""
    k = samples.shape[0]
    empirical_mean = samples.mean(dim=0)
    empirical_cov = torch.cov(samples.T)
    mean_se = (cov.diagonal() / k).sqrt()
    assert torch.all((empirical_mean - mean).abs() <= z * mean_se), (empirical_mean, mean)
    cov_se = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov ** 2) / k).sqrt()
    assert torch.all((empirical_cov - cov).abs() <= z * cov_se), (empirical_cov, cov)
    return empirical_cov


def test_noise_generator_is_a_pure_function_of_seed_step_and_substep():
    draw = lambda *key: torch.randn(4, generator=noise_generator(*key))
    assert torch.equal(draw(3, 7, 1), draw(3, 7, 1))
    assert not torch.equal(draw(3, 7, 1), draw(3, 7, 0))
    assert not torch.equal(draw(3, 7, 1), draw(3, 8, 1))
    assert not torch.equal(draw(3, 7, 1), draw(4, 7, 1))


@pytest.mark.parametrize("lr, h, m", [(0.05, 0.01, 5), (0.05, 0.03, 2), (0.1, 0.1, 1), (1.0, 0.3, 4), (0.3, 0.1, 3),
                                     (0.07, 0.01, 7)])  # 0.07 / 0.01 = 7.000000000000001 in floating point
def test_sde_substeps_is_ceil_of_lr_over_h(lr, h, m):
    assert sde_substeps(lr, h) == m


@pytest.mark.parametrize("chunk", [1, 7, N])
def test_gradient_moments_match_closed_form(chunk):
    model, X, Y, _, mean, sigma = regression()
    moments = gradient_moments(model, mse_loss, X, Y, chunk)
    torch.testing.assert_close(moments.mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(moments.variance, sigma.diagonal(), rtol=1e-12, atol=1e-12)
    assert moments.trace == pytest.approx(float(sigma.trace()), rel=1e-12)


def test_default_statistics_chunk_bounds_the_per_sample_gradients_held_at_once():
    assert default_statistics_chunk(1_841_162, 2048) == 36  # the paper's MLP: 36 x P numbers per chunk
    assert 36 * 1_841_162 <= STATISTICS_BUDGET
    assert default_statistics_chunk(100, 10) == 10
    assert default_statistics_chunk(10 ** 9, 2048) == 1


def test_gradient_moments_of_cross_entropy_match_a_per_sample_loop():
    g = torch.Generator().manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    X, Y = torch.randn(23, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (23,), generator=g)
    rows = []
    for i in range(23):
        grads = torch.autograd.grad(ce_loss(model(X[i:i + 1]), Y[i:i + 1]), list(model.parameters()))
        rows.append(torch.cat([t.reshape(-1) for t in grads]))
    G = torch.stack(rows)
    moments = gradient_moments(model, ce_loss, X, Y, 5)
    torch.testing.assert_close(moments.mean, G.mean(dim=0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(moments.variance, G.var(dim=0, unbiased=False), rtol=1e-10, atol=1e-12)


def test_sgd_weights_give_the_mean_gradient_plus_centred_per_sample_gradients():
    model, X, Y, per_sample, mean, _ = regression()
    xi = torch.randn(N, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    weights = sgd_weights(xi, BATCH)
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-14)
    model.zero_grad(set_to_none=True)
    loss = accumulate_gradient(model, mse_loss, X, Y, weights, chunk_size=7)
    expected = mean + (xi[:, None] * (per_sample - mean)).sum(dim=0) / math.sqrt(N * BATCH)
    torch.testing.assert_close(model.weight.grad.reshape(-1), expected, rtol=1e-12, atol=1e-12)
    assert loss.item() == pytest.approx(mse_loss(model(X), Y).item(), rel=1e-12)


def test_unweighted_gradient_in_uneven_chunks_is_the_mean_gradient():
    """40 samples in chunks of 7: the last chunk of 5 weighs 5/40, not 7/40."""
    model, X, Y, _, mean, _ = regression()
    model.zero_grad(set_to_none=True)
    loss = accumulate_gradient(model, mse_loss, X, Y, None, chunk_size=7)
    torch.testing.assert_close(model.weight.grad.reshape(-1), mean, rtol=1e-12, atol=1e-12)
    assert loss.item() == pytest.approx(mse_loss(model(X), Y).item(), rel=1e-12)


def _noisy(mode, model, X, Y, **kwargs):
    optimizer = torch.optim.SGD(model.parameters(), lr=kwargs.get("lr", 0.1))
    settings = {"lr": 0.1, "batch": BATCH, "noise_seed": 11, "refresh": 10 ** 9, **kwargs}
    return NoisyStep(mode, model, mse_loss, X, Y, optimizer, **settings)


@pytest.mark.parametrize("mode", ["sgd", "diag", "iso", "const", "sde"])
def test_injected_gradient_has_the_documented_mean_and_covariance(mode):
    model, X, Y, _, mean, sigma = regression()
    expected = {
        "sgd": sigma / BATCH,
        "diag": torch.diag(sigma.diagonal()) / BATCH,
        "iso": torch.eye(D, dtype=torch.float64) * sigma.trace() / (D * BATCH),
        "const": torch.eye(D, dtype=torch.float64) * 0.3 ** 2 / BATCH,
        "sde": 4 * sigma / BATCH,  # each of m = 4 sub-steps carries the noise of batch b / m
    }[mode]
    noisy = _noisy(mode, model, X, Y, noise_mag=0.3 if mode == "const" else None, sde_h=0.025 if mode == "sde" else None)
    samples = sampled_gradients(noisy.loss_and_gradient, model, 4000)
    empirical = assert_gaussian_moments(samples, mean, expected)
    # The test tells the forms apart: the full covariance is far from its diagonal here.
    if mode in ("sgd", "sde"):
        assert (empirical[0, 1] / empirical[0, 0]).abs() > 0.3


def test_sde_without_noise_and_h_equal_lr_is_exactly_the_gd_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    X, Y = torch.randn(30, 5, dtype=torch.float64), torch.randn(30, 2, dtype=torch.float64)
    reference = [p.detach().clone().requires_grad_() for p in model.parameters()]
    gd = torch.optim.SGD(reference, lr=0.07)
    loss = mse_loss(torch.func.functional_call(model, dict(zip([n for n, _ in model.named_parameters()], reference)), (X,)), Y)
    loss.backward()
    gd.step()

    sde = NoisyStep("sde", model, mse_loss, X, Y, torch.optim.SGD(model.parameters(), lr=0.07), lr=0.07,
                    batch=math.inf, sde_h=0.07)
    assert sde(0).item() == loss.item()
    for p, q in zip(model.parameters(), reference):
        assert torch.equal(p, q)


def test_sde_with_h_equal_lr_is_the_sgd_noise_step():
    results = []
    for mode, h in (("sgd", None), ("sde", 0.1)):
        model, X, Y, *_ = regression()
        noisy = _noisy(mode, model, X, Y, sde_h=h)
        for step in range(3):
            model.zero_grad(set_to_none=True)
            noisy(step)
        results.append(model.weight.detach().clone())
    assert torch.equal(*results)


def test_sde_substeps_move_by_dt_along_fresh_noisy_gradients():
    model, X, Y, *_ = regression()
    noisy = _noisy("sde", model, X, Y, sde_h=0.04)  # m = 3, dt = 0.1 / 3
    manual, _, _, *_ = regression()
    for substep in range(3):
        manual.zero_grad(set_to_none=True)
        xi = torch.randn(N, generator=noise_generator(11, 5, substep), dtype=torch.float64)
        accumulate_gradient(manual, mse_loss, X, Y, sgd_weights(xi, BATCH / 3))
        with torch.no_grad():
            manual.weight.add_(manual.weight.grad, alpha=-0.1 / 3)
    noisy(5)
    torch.testing.assert_close(model.weight, manual.weight, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["diag", "iso"])
def test_statistics_are_refreshed_on_multiples_and_restored_from_state(mode):
    model, X, Y, *_ = regression()
    noisy = _noisy(mode, model, X, Y, refresh=3)
    for step in range(5):
        noisy(step)
    state = noisy.state_dict()
    assert state["step"] == 3 and state["mode"] == mode

    twin, *_ = regression()
    with torch.no_grad():
        twin.weight.copy_(model.weight)
    fresh = _noisy(mode, twin, X, Y, refresh=3)
    fresh.load_state_dict(state)
    noisy(5), fresh(5)
    assert torch.equal(model.weight, twin.weight)

    ignored = _noisy("iso" if mode == "diag" else "diag", twin, X, Y, refresh=3)
    ignored.load_state_dict(state)
    assert ignored.state_dict() is None


@pytest.mark.parametrize("mode", ["diag", "iso"])
def test_saved_statistics_follow_a_changed_batch_size(mode):
    model, X, Y, _, mean, _ = regression()
    noises = []
    for batch in (BATCH, 4 * BATCH):
        noisy = _noisy(mode, model, X, Y, batch=batch, refresh=3)
        if noises:
            noisy.load_state_dict(state)
        model.zero_grad(set_to_none=True)
        noisy.loss_and_gradient(3 if batch == BATCH else 4)  # the second never refreshes: it uses the saved statistics
        state = noisy.state_dict()
        noises.append(model.weight.grad.reshape(-1) - mean)
    z3 = torch.randn(D, generator=noise_generator(11, 3), dtype=torch.float64)
    z4 = torch.randn(D, generator=noise_generator(11, 4), dtype=torch.float64)
    torch.testing.assert_close(noises[1] / z4, noises[0] / z3 / 2, rtol=1e-10, atol=0)


def test_batchnorm_models_are_refused(results_env, capsys):
    argv = ["--dataset", "synthetic", "--input-shape", "3,8,8", "--num-data", "32", "--model", "resnet_bn",
            "--batch", "8", "--steps", "1", "--gd-noise", "sgd", "--quiet"]
    assert training.main(argv) == 2
    assert "BatchNorm" in capsys.readouterr().err


@pytest.mark.parametrize("flags, fragment", [
    (["--gd-noise", "sgd", "--sde", "--sde-h", "0.01"], "give only one"),
    (["--gd-noise", "gaussian"], "unknown --gd-noise"),
    (["--gd-noise", "const"], "needs --noise-mag"),
    (["--gd-noise", "diag", "--noise-mag", "0.1"], "only applies to --gd-noise const"),
    (["--noise-mag", "0.1"], "only applies to --gd-noise const"),
    (["--gd-noise", "const", "--noise-mag", "-1"], "non-negative"),
    (["--sde"], "needs --sde-h"),
    (["--sde-h", "0.01"], "only applies to --sde"),
    (["--sde", "--sde-h", "0.1", "--lr", "0.05"], "(0, --lr]"),
    (["--sde", "--sde-h", "0.01", "--momentum", "0.9"], "plain SGD"),
    (["--gd-noise", "diag", "--noise-refresh", "0"], "--noise-refresh"),
])
def test_invalid_noise_settings_are_one_line_errors(results_env, capsys, flags, fragment):
    assert training.main(["--steps", "1", "--quiet", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err


BASE = ["--width", "16", "--num-data", "120", "--batch", "8", "--quiet", "--steps", "24", "--checkpoint-every", "4",
        "--full-loss-every", "3", "--lambdamax", "--batch-sharpness", "--measure-every", "6", "--noise-refresh", "5"]
MODES = {
    "sgd": ["--gd-noise", "sgd"],
    "diag": ["--gd-noise", "diag"],
    "iso": ["--gd-noise", "iso"],
    "const": ["--gd-noise", "const", "--noise-mag", "0.05"],
    "sde": ["--sde", "--sde-h", "0.02"],
}


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_runs_measures_and_resumes_bit_identically(results_env, monkeypatch, mode):
    reference, interrupted = results_env / "ref", results_env / "int"
    assert training.main([*BASE, *MODES[mode], "--run-dir", str(reference)]) == 0
    config = json.loads((reference / "config.json").read_text())["config"]
    assert config["gd_noise"] == (None if mode == "sde" else mode) and config["sde"] == (mode == "sde")
    rows = read_results(reference / "results.txt")
    measured = rows[rows["step"] % 6 == 0]
    assert measured["lambda_max"].notna().all() and measured["batch_sharpness"].notna().all()
    assert rows["batch_loss"].notna().all()

    with monkeypatch.context() as patch:
        interrupt_at(patch, 12)  # checkpoint 13 lies between the refreshes at 10 and 15
        assert training.main([*BASE, *MODES[mode], "--checkpoint-every", "13", "--run-dir", str(interrupted)]) == 130
    assert list_checkpoints(interrupted)[-1][0] == 13
    state = load_checkpoint(str(interrupted / "checkpoints" / "step_13.pt"))
    assert (state["noise_state"] is not None) == (mode in ("diag", "iso"))
    assert training.main(["--resume", str(interrupted), "--quiet"]) == 0

    same_results(reference, interrupted)
    final_a = load_checkpoint(str(reference / "checkpoints" / "step_24.pt"))["model"]
    final_b = load_checkpoint(str(interrupted / "checkpoints" / "step_24.pt"))["model"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_trains_with_cross_entropy(results_env, mode):
    run = results_env / "run"
    assert training.main(["--width", "16", "--num-data", "120", "--batch", "8", "--quiet", "--steps", "4", "--loss", "ce",
                          *MODES[mode], "--run-dir", str(run)]) == 0
    assert read_results(run / "results.txt")["batch_loss"].notna().all()
    first = load_checkpoint(str(run / "checkpoints" / "step_0.pt"))["model"]
    last = load_checkpoint(str(run / "checkpoints" / "step_4.pt"))["model"]
    assert all(torch.isfinite(last[k]).all() and not torch.equal(first[k], last[k]) for k in first)


def test_batch_loss_is_the_full_batch_loss_before_the_update(results_env):
    run = results_env / "run"
    assert training.main([*BASE, "--gd-noise", "sgd", "--run-dir", str(run)]) == 0
    rows = read_results(run / "results.txt")
    logged = rows[rows["full_loss"].notna()]
    pd.testing.assert_series_equal(logged["batch_loss"], logged["full_loss"], check_names=False, rtol=1e-5)
