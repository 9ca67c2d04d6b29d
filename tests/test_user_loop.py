"""The Python surface (utils.api): measurements of a user's model against its dense float64
Hessian, every accepted form of data and loss, and CurvatureLogger's run folder against
training.py's."""

import importlib.util
import json
import math
import os
import re
import runpy
import shlex
import sys

import numpy as np
import pytest
import torch
from curvature_reference import dense_gradient, dense_hessian, exact_ghg_family, per_sample_gradients
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import compute_final_fullbs
import plot_results
import sharpness_gap
import training
from utils.api import MEASUREMENTS, SAMPLED, CurvatureLogger, as_loss, measure
from utils.config import RunConfig
from utils.losses import mse_loss
from utils.results import read_results
from utils.training import build, epoch_permutation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def residual_mlp(input_shape, outputs, **kwargs):
    spec = importlib.util.spec_from_file_location("residual_mlp_example", os.path.join(ROOT, "examples", "residual_mlp.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.residual_mlp(input_shape, outputs, **kwargs)


def user_model_and_data(n=6, loss_name="mse"):
    """The example residual MLP (width 3, one block, LayerNorm, GELU) in float64 on n points in R^3."""
    torch.manual_seed(0)
    model = residual_mlp((3,), 2, width=3, depth=1).double()
    generator = torch.Generator().manual_seed(1)
    X = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    Y = torch.randn(n, 2, generator=generator, dtype=torch.float64) if loss_name == "mse" else torch.tensor([0, 1] * (n // 2))
    return model, X, Y


@pytest.mark.parametrize("loss_name", ["mse", "ce"])
def test_measurements_of_a_user_model_match_its_dense_hessian(loss_name):
    model, X, Y = user_model_and_data(loss_name=loss_name)
    loss_fn = mse_loss if loss_name == "mse" else torch.nn.functional.cross_entropy
    H, g = dense_hessian(model, loss_fn, X, Y), dense_gradient(model, loss_fn, X, Y)
    spectrum = torch.linalg.eigvalsh(H)
    rows = torch.tensor([0, 4])
    g_B, H_B = dense_gradient(model, loss_fn, X[rows], Y[rows]), dense_hessian(model, loss_fn, X[rows], Y[rows])
    values = measure(model, loss_name, (X, Y), ["lambdamax", "lambda_min", "step_sharpness", "batch_sharpness", "gni",
                                                "batch_sharpness_ratio", "hessian_trace", "gradient_norm"],
                     batch_size=2, lr=0.1, batch=(X[rows], Y[rows]), eig_tol=1e-9)
    assert values["lambda_max"].value == pytest.approx(spectrum[-1].item(), rel=1e-7)
    assert values["lambda_min"].value == pytest.approx(spectrum[0].item(), rel=1e-6, abs=1e-8 * spectrum[-1].item())
    assert values["step_sharpness"].value == pytest.approx((g_B @ H_B @ g_B / (g_B @ g_B)).item(), rel=1e-9)
    assert values["grad_norm_sq_full"].value == pytest.approx((g @ g).item(), rel=1e-9)
    exact = exact_ghg_family(model, loss_fn, X, Y, 2)
    for name in ("batch_sharpness", "gni", "batch_sharpness_ratio"):
        estimate = values[name]
        if estimate.exact:  # GNI on six points is taken in closed form
            assert estimate.value == pytest.approx(exact[name], rel=1e-9), name
        else:
            assert abs(estimate.value - exact[name]) < 4 * estimate.se, name
    c_b = (6 - 2) / (2 * 5)
    spread = (per_sample_gradients(model, loss_fn, X, Y) - g).pow(2).sum(dim=1).mean()
    assert values["grad_norm_sq_batch"].value == pytest.approx((g @ g + c_b * spread).item(), rel=1e-9)
    trace = values["hessian_trace"]
    assert abs(trace.value - torch.trace(H).item()) < 4 * trace.se


class DictSamples(Dataset):
    """A map-style dataset of dict samples, as many libraries yield them."""

    def __init__(self, X, Y, keys=("image", "label")):
        self.X, self.Y, self.keys = X, Y, keys

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return {self.keys[0]: self.X[i], self.keys[1]: int(self.Y[i])}


class Stream(IterableDataset):
    def __init__(self, X, Y):
        self.X, self.Y = X, Y

    def __iter__(self):
        return iter(zip(self.X, self.Y))


def test_every_form_of_data_gives_the_same_measurements():
    _, X, Y = user_model_and_data(n=8, loss_name="ce")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    names = ["lambdamax", "batch_sharpness"]

    def values(data, **kwargs):
        result = measure(model, "ce", data, names, batch_size=2, lr=0.1, **kwargs)
        return result["lambda_max"].value, result["batch_sharpness"].value

    reference = values((X, Y))
    assert values(TensorDataset(X, Y)) == reference
    assert values(DictSamples(X, Y)) == reference
    assert values(DataLoader(DictSamples(X, Y), batch_size=3, shuffle=True)) == reference  # read through its dataset
    assert values(DictSamples(X, Y, keys=("a", "b")), batch_to_inputs=lambda s: (s["a"], s["b"])) == reference
    with pytest.raises(ValueError, match="input key"):
        values(DictSamples(X, Y, keys=("a", "b")))
    # float32 data meet a float64 model in its dtype
    assert values((X.float(), Y))[0] == pytest.approx(reference[0], rel=1e-6)

    stream = DataLoader(Stream(X, Y), batch_size=3)
    full = measure(model, "ce", stream, ["lambdamax", "hessian_trace"], batch_size=2, lr=0.1)
    assert full["lambda_max"].value == pytest.approx(reference[0], rel=1e-12)
    for name in SAMPLED:
        with pytest.raises(ValueError, match="iterable Stream cannot give"):
            measure(model, "ce", stream, [name], batch_size=2, lr=0.1)


def test_losses_by_name_callable_and_torch_mse_loss():
    model, X, Y = user_model_and_data()
    names = ["lambdamax", "batch_sharpness"]
    by_name = measure(model, "mse", (X, Y), names, batch_size=6, lr=0.1)  # one batch: 20 samples of it

    def paper_mse(outputs, targets):
        return (outputs - targets).pow(2).sum(dim=1).mean()

    by_callable = measure(model, paper_mse, (X, Y), names, batch_size=6, lr=0.1)
    for column in ("lambda_max", "batch_sharpness"):
        assert by_callable[column].value == pytest.approx(by_name[column].value, rel=1e-9)
    with pytest.warns(UserWarning, match="divided by the number of outputs"):
        torch_mse = measure(model, torch.nn.MSELoss(), (X, Y), ["lambdamax"], batch_size=2, lr=0.1)
    assert torch_mse["lambda_max"].value == pytest.approx(by_name["lambda_max"].value / 2, rel=1e-6)
    loss_fn, _ = as_loss(paper_mse)
    per_sample = loss_fn(model(X), Y, reduction="none")
    assert torch.allclose(per_sample, mse_loss(model(X), Y, reduction="none"))
    with pytest.raises(ValueError, match="unknown loss 'l1'"):
        as_loss("l1")


def test_measurements_read_the_users_optimizer():
    model, X, Y = user_model_and_data()
    with pytest.raises(ValueError, match="torch.optim.SGD with momentum"):
        measure(model, "mse", (X, Y), ["momentum_sharpness"], batch_size=2, lr=0.1)
    with pytest.raises(ValueError, match="torch.optim.Adam"):
        measure(model, "mse", (X, Y), ["preconditioned_sharpness"], batch_size=2, lr=0.1)
    with pytest.raises(ValueError, match="pass the optimizer you step with"):
        measure(model, "mse", (X, Y), ["lambdamax"], batch_size=2)
    with pytest.raises(ValueError, match="unknown measurement sharpness"):
        measure(model, "mse", (X, Y), ["sharpness"], batch_size=2, lr=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mse_loss(model(X), Y).backward()
    optimizer.step()  # a momentum buffer b = g
    g = dense_gradient(model, mse_loss, X, Y)
    result = measure(model, "mse", (X, Y), ["momentum_sharpness"], batch_size=6, optimizer=optimizer)
    buffer = torch.cat([optimizer.state[p]["momentum_buffer"].reshape(-1) for p in model.parameters()])
    s = 0.9 * buffer + g  # one batch of all six points: s = g + mu b exactly
    H = dense_hessian(model, mse_loss, X, Y)
    assert result["momentum_sharpness"].value == pytest.approx((s @ H @ s / (s @ g)).item(), rel=1e-8)
    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    mse_loss(model(X), Y).backward()
    adam.step()
    assert math.isfinite(measure(model, "mse", (X, Y), ["preconditioned_sharpness"], batch_size=2,
                                 optimizer=adam)["preconditioned_sharpness"].value)


LOOP_FLAGS = ["--num-data", "48", "--batch", "8", "--lr", "0.1", "--steps", "8", "--quiet", "--measure-every", "3",
              "--full-loss-every", "2", "--lambdamax", "--batch-sharpness", "--gni", "--step-sharpness"]


def users_loop(run_dir, setup, every=3, full_loss_every=2):
    """training.py's run as a plain loop: the same model, data, batches and update."""
    model, X, Y = setup.model, setup.data.X_train, setup.data.Y_train
    optimizer = torch.optim.SGD(model.parameters(), lr=setup.cfg.lr)
    logger = CurvatureLogger(str(run_dir), model, "mse", (X, Y), every=every, batch_size=8,
                             measurements=["lambdamax", "batch_sharpness", "gni", "step_sharpness"],
                             full_loss_every=full_loss_every, name="digits_mlp")
    for step in range(setup.total_steps):
        epoch, position = divmod(step, setup.steps_per_epoch)
        idx = epoch_permutation(setup.cfg.data_ordering_seed, epoch, X.shape[0])[position * 8:(position + 1) * 8]
        xb, yb = X[idx], Y[idx]
        logger.log(step, optimizer, batch=(xb, yb))
        optimizer.zero_grad()
        mse_loss(model(xb), yb).backward()
        optimizer.step()
    return logger.close(final=True)


def test_the_loggers_folder_equals_training_pys_and_the_scripts_read_it(results_env, capsys):
    assert training.main([*LOOP_FLAGS, "--run-dir", str(results_env / "trained")]) == 0
    setup = build(RunConfig(num_data=48, batch=8, lr=0.1, steps=8))
    summary = users_loop(results_env / "own", setup)
    ours, theirs = read_results(results_env / "own" / "results.txt"), read_results(results_env / "trained" / "results.txt")
    assert list(ours.columns) == list(theirs.columns)
    timeless = [c for c in ours.columns if c != "wall_time" and not c.endswith("_seconds")]
    np.testing.assert_allclose(ours[timeless].to_numpy(float), theirs[timeless].to_numpy(float), rtol=1e-5, atol=1e-7)
    assert summary["final_step"] == 8 and summary["status"] == "finished"
    final_trained = json.loads((results_env / "trained" / "summary.json").read_text())
    assert summary["final_train_loss"] == pytest.approx(final_trained["final_train_loss"], rel=1e-5)

    # The suite's scripts read the folder, and those that rebuild the model refuse it.
    run_dir = results_env / "own"
    record = json.loads((run_dir / "config.json").read_text())
    assert record["written_by"] == "user_loop" and record["config"]["lr"] == 0.1
    trained = json.loads((results_env / "trained" / "config.json").read_text())
    for key in ("measurement_mode", "hvp_mode", "batch_route", "closed_forms", "partition_draws"):
        assert record["resolved"][key] == trained["resolved"][key]  # how the measurements were computed
    assert record["versions"] == trained["versions"]
    assert plot_results.main([str(run_dir), "--quiet"]) == 0 and (run_dir / "results.png").exists()
    assert sharpness_gap.main([str(run_dir), "--quiet", "--out", str(results_env / "gap")]) == 0
    capsys.readouterr()
    for main, argv in ((training.main, ["--resume", str(run_dir)]),
                       (training.main, ["--cont-run", str(run_dir), "--cont-step", "2"]),
                       (compute_final_fullbs.main, [str(run_dir), "--quiet"])):
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "written by a user's own training loop" in err, err
    with pytest.raises(ValueError, match="not empty"):
        CurvatureLogger(str(run_dir), torch.nn.Linear(2, 1), "mse", (torch.zeros(4, 2), torch.zeros(4, 1)), batch_size=2)


def test_every_registry_measurement_is_reachable_from_python():
    model, X, Y = user_model_and_data(n=8)
    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    mse_loss(model(X), Y).backward()
    adam.step()
    names = [name for name in MEASUREMENTS if name != "momentum_sharpness"]
    values = measure(model, "mse", (X, Y), names, batch_size=8, optimizer=adam, batch=(X[:4], Y[:4]))
    for column in ("lambda_max", "batch_sharpness", "gni", "preconditioned_sharpness", "density_trace",
                   "grad_overlap_full", "param_distance", "gn_lambda_max"):
        value = values[column].value
        assert math.isfinite(value), column


def readme_commands(marker: str) -> list[list[str]]:
    """The command lines of the README's block after ``<!-- marker -->``, each as [script, *args]."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        block = re.search(rf"<!-- {marker} -->\n```\n(.*?)```", f.read(), flags=re.DOTALL).group(1)
    return [shlex.split(line)[1:] for line in block.splitlines() if line.startswith("python ")]


def test_the_readmes_commands_run(results_env, monkeypatch, capsys):
    """The README's three doors at a tiny size (flags given last override the README's)."""
    monkeypatch.chdir(results_env)
    tiny = ["--num-data", "32", "--steps", "2", "--batch", "16", "--measure-every", "1", "--quiet"]
    model_file, data_file = readme_commands("own-model")
    assert model_file[:3] == ["training.py", "--model", "examples/residual_mlp.py:residual_mlp"]
    os.symlink(os.path.join(ROOT, "examples"), results_env / "examples")
    assert training.main([*model_file[1:], *tiny]) == 0
    run_dir = next((results_env / "results" / "digits_residual_mlp-residual_mlp").iterdir())
    assert json.loads((run_dir / "config.json").read_text())["config"]["model_args"] == {"depth": 3}
    assert data_file[:3] == ["training.py", "--dataset", "my_data.npz"]
    rng = np.random.default_rng(0)
    np.savez(results_env / "my_data.npz", x_train=rng.normal(size=(40, 1, 8, 8)).astype(np.float32),
             y_train=rng.integers(0, 3, 40))
    assert training.main([*data_file[1:], *tiny, "--width", "8", "--heads", "2"]) == 0
    assert (results_env / "results" / "my_data_vit").is_dir()

    own_loop, gap = readme_commands("own-loop")
    assert own_loop[0] == "examples/own_loop.py" and gap[0] == "sharpness_gap.py"
    monkeypatch.setattr(sys, "argv", [*own_loop, "--steps", "10", "--num-data", "64"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(os.path.join(ROOT, own_loop[0]), run_name="__main__")
    assert stop.value.code == 0
    out = results_env / "results" / "own_loop"
    frame = read_results(out / "results.txt")
    assert frame["lambda_max"].notna().sum() == 10 and frame["batch_sharpness"].notna().sum() == 10
    assert (out / "results.png").exists() and "final train loss" in capsys.readouterr().out
    assert sharpness_gap.main([*gap[1:], "--quiet"]) == 0 and (out / "sharpness_gap.csv").exists()
    assert len(open(os.path.join(ROOT, own_loop[0])).read().splitlines()) <= 60


def test_a_batchnorm_or_embedding_model_is_measured_without_touching_its_state(tmp_path):
    """The logger leaves a user's running statistics alone (and a BatchNorm1d model, which one row
    cannot pass in train mode, still starts); integer inputs reach an Embedding as integers."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 2)).double()
    X, Y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    buffers = [b.clone() for b in model.buffers()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    logger = CurvatureLogger(str(tmp_path / "bn"), model, "mse", (X, Y), measurements=["batch_sharpness"], every=1,
                             batch_size=4, lr=0.2)
    row = logger.log(0, optimizer, batch=(X[:4], Y[:4]))  # lr= (the thresholds' step size) need not be the optimiser's
    # A learning-rate schedule moves the step size the thresholds were taken from: said once.
    optimizer.param_groups[0]["lr"] = 0.05
    with pytest.warns(UserWarning, match="the step size moved from 0.1 to 0.05"):
        logger.log(1, optimizer, batch=(X[:4], Y[:4]))
    logger.close()
    assert math.isfinite(row["batch_sharpness"]) and math.isfinite(row["batch_loss"])
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))

    tokens = torch.randint(0, 10, (16, 3))
    embedded = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Flatten(), torch.nn.Linear(12, 2)).double()
    assert math.isfinite(measure(embedded, "mse", (tokens, Y), ["lambdamax"], batch_size=4, lr=0.1)["lambda_max"].value)


def test_optimisers_whose_threshold_the_suite_does_not_state_are_measured_with_a_warning():
    from utils.user_loop import optimizer_settings
    params = [torch.nn.Parameter(torch.zeros(3))]
    cases = [(torch.optim.RMSprop(params, lr=0.01), "RMSprop is neither SGD nor Adam", {"lr": 0.01}),
             (torch.optim.SGD(params, lr=0.1, weight_decay=1e-3), "SGD's weight_decay 0.001",
              {"lr": 0.1, "momentum": 0.0, "nesterov": False}),
             (torch.optim.SGD(params, lr=0.1, momentum=0.9, dampening=0.5), "SGD's dampening is 0.5",
              {"lr": 0.1, "momentum": 0.9, "nesterov": False}),
             (torch.optim.AdamW(params, lr=0.001), "AdamW's weight_decay 0.01", {"lr": 0.001, "adam": True})]
    for optimizer, warning, settings in cases:
        with pytest.warns(UserWarning, match=re.escape(warning)):
            assert optimizer_settings(optimizer) == settings
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert optimizer_settings(torch.optim.SGD(params, lr=0.1, momentum=0.9)) == {"lr": 0.1, "momentum": 0.9,
                                                                                      "nesterov": False}
        assert optimizer_settings(torch.optim.Adam(params, lr=0.001)) == {"lr": 0.001, "adam": True}
