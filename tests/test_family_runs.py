"""The second curvature family inside training.py: flags, columns, final.json, bad inputs, exact resume."""

import functools
import json

import pytest
import torch

import training
from test_resume import interrupt_at, same_parameters, same_results
from utils import measures
from utils.config import RunConfig
from utils.plotting import plot_runs
from utils.results import read_results
from utils.runs import load_run, read_run_results
from utils.training import build

SMALL = ["--width", "16", "--depth", "1", "--num-data", "120", "--batch", "8", "--quiet"]
SGD_FAMILY = ["--momentum", "0.9", "--batch-sharpness-ratio", "--batch-lambdamax", "--hessian-trace",
              "--gauss-newton", "--gradient-norm", "--momentum-sharpness", "--param-distance"]
ADAM_FAMILY = ["--adam", "--lr", "0.003", "--preconditioned-sharpness", "--param-distance", "--gauss-newton"]
COLUMNS = {"batch_sharpness_ratio": True, "batch_lambda_max": True, "hessian_trace": True, "gn_lambda_max": False,
           "gn_batch_sharpness": True, "grad_norm_sq_batch": True, "grad_norm_sq_full": False,
           "momentum_sharpness": True, "param_distance": False}
CLOSED_FORMS = {"grad_norm_sq_batch"}


@pytest.fixture
def cheap(monkeypatch):
    """Fewer Monte Carlo samples per measurement, so that runs take seconds (the code paths are unchanged)."""
    limits = {"batch_sharpness_ratio": (10, 30), "batch_lambda_max": (10, 12), "hessian_trace": (10, 30),
              "gn_batch_sharpness": (10, 30), "gradient_norms": (10, 30), "momentum_sharpness": (10, 30),
              "batch_sharpness": (10, 30), "gni": (10, 30)}
    for name, (low, high) in limits.items():
        monkeypatch.setattr(measures, name, functools.partial(getattr(measures, name), min_samples=low,
                                                              max_samples=high))


def test_every_new_flag_fills_its_columns_and_final_json(results_env, cheap):
    run_dir = results_env / "sgd"
    assert training.main([*SMALL, *SGD_FAMILY, "--steps", "8", "--measure-every", "4", "--final",
                          "--run-dir", str(run_dir)]) == 0
    frame = read_results(run_dir / "results.txt")
    expected = [c for name, with_se in COLUMNS.items()
                for c in [name, *([f"{name}_se", f"{name}_n"] if with_se else []), f"{name}_seconds", f"{name}_hvps"]]
    assert [c for c in frame.columns if c in expected] == expected
    measured = frame.set_index("step").loc[[0, 4], expected]
    assert measured.notna().all().all() and frame.set_index("step").drop(index=[0, 4])[expected].isna().all().all()
    assert measured.loc[0, "param_distance"] == 0 and measured.loc[4, "param_distance"] > 0
    assert (measured["grad_norm_sq_batch"] > measured["grad_norm_sq_full"]).all()
    assert (measured["batch_lambda_max_hvps"] >= measured["batch_lambda_max_n"]).all()
    assert (measured["hessian_trace_n"] == measured["hessian_trace_hvps"]).all()

    schedule = json.loads((run_dir / "config.json").read_text())["resolved"]["schedule"]
    assert {"batch_sharpness_ratio", "batch_lambdamax", "hessian_trace", "gauss_newton", "gradient_norm",
            "momentum_sharpness", "param_distance"} <= set(schedule)
    final = json.loads((run_dir / "final.json").read_text())
    assert final["step"] == 8
    for name, with_se in COLUMNS.items():
        # E_B|g_B|^2 may be taken in closed form from the per-sample gradients: exact, so SE 0
        assert final[name] == final[name] and (not with_se or final[f"{name}_se"] > 0
                                               or name in CLOSED_FORMS and final[f"{name}_se"] == 0), name
    assert final["param_distance"] > measured.loc[4, "param_distance"]

    run = load_run(str(run_dir))
    axes = {ax.get_title(): ax for ax in plot_runs([run], [read_run_results(run.run_dir)]).axes if ax.get_visible()}
    assert {r"$\lambda_{\max}$", "Batch Sharpness", "Gauss–Newton", "momentum sharpness", "Hessian trace", "gradient norm²",
            "distance to θ₀"} <= set(axes)
    for title in (r"$\lambda_{\max}$", "Batch Sharpness", "Gauss–Newton", "momentum sharpness"):
        assert "(2+2μ)/η = 76" in [line.get_label() for line in axes[title].get_lines()], title
    assert not any("η" in line.get_label() for line in axes["Hessian trace"].get_lines())


def test_adam_preconditioned_sharpness_starts_after_the_first_step(results_env, cheap):
    run_dir = results_env / "adam"
    assert training.main([*SMALL, *ADAM_FAMILY, "--steps", "6", "--measure-every", "3", "--final",
                          "--run-dir", str(run_dir)]) == 0
    rows = read_results(run_dir / "results.txt").set_index("step")
    assert rows["preconditioned_sharpness"].isna().loc[0] and rows["preconditioned_sharpness"].notna().loc[3]
    # Adam's preconditioner divides by sqrt(v_hat) + eps << 1, so this exceeds lambda_max(GN) by far.
    assert rows.loc[3, "preconditioned_sharpness"] > 10 * rows.loc[3, "gn_lambda_max"]
    final = json.loads((run_dir / "final.json").read_text())
    assert final["preconditioned_sharpness"] > 0 and "momentum_sharpness" not in final
    run = load_run(str(run_dir))
    axes = {ax.get_title(): ax for ax in plot_runs([run], [read_run_results(run.run_dir)]).axes if ax.get_visible()}
    assert "38/η = 1.267e+04" in [line.get_label() for line in axes["preconditioned sharpness"].get_lines()]
    assert not any("η" in line.get_label() for line in axes["Gauss–Newton"].get_lines())


def test_param_file_sets_the_reference(results_env, tmp_path):
    setup = build(RunConfig(width=16, depth=1, num_data=120, batch=8))
    init = tmp_path / "init.pt"
    torch.save(setup.model.state_dict(), init)
    zeros = tmp_path / "zeros.pt"
    torch.save({name: torch.zeros_like(p) for name, p in setup.model.named_parameters()}, zeros)
    runs = {}
    for name, extra in (("own", []), ("init", ["--param-file", str(init)]), ("zeros", ["--param-file", str(zeros)])):
        assert training.main([*SMALL, "--steps", "4", "--param-distance", "--param-distance-every", "2", *extra,
                              "--run-dir", str(results_env / name)]) == 0
        runs[name] = read_results(results_env / name / "results.txt").dropna(subset=["param_distance"])
    assert list(runs["own"]["step"]) == [0, 2]
    assert list(runs["init"]["param_distance"]) == list(runs["own"]["param_distance"])
    norm = torch.linalg.vector_norm(torch.cat([p.detach().reshape(-1) for p in setup.model.parameters()])).item()
    assert runs["zeros"]["param_distance"].iloc[0] == pytest.approx(norm, rel=1e-6)


def _bad_param_files(folder):
    setup = build(RunConfig(width=16, depth=1, num_data=120, batch=8))
    state = setup.model.state_dict()
    files = {"garbage.pt": None, "keys.pt": {**state, "extra.weight": torch.zeros(2)},
             "missing.pt": dict(list(state.items())[1:]),
             "shape.pt": {k: (v[:, :-1] if v.dim() == 2 else v) for k, v in state.items()},
             "nan.pt": {k: v.clone().fill_(float("nan")) for k, v in state.items()},
             "inf.pt": {k: v.clone().fill_(float("inf")) for k, v in state.items()}}
    for name, content in files.items():
        if content is None:
            (folder / name).write_bytes(b"not a torch file")
        else:
            torch.save(content, folder / name)


@pytest.mark.parametrize("argv, fragment", [
    (["--param-distance", "--param-file", "{tmp}/nowhere.pt"], "does not exist"),
    (["--param-distance", "--param-file", "{tmp}/garbage.pt"], "cannot be read"),
    (["--param-distance", "--param-file", "{tmp}/keys.pt"], "extra.weight"),
    (["--param-distance", "--param-file", "{tmp}/shape.pt"], "shape"),
    (["--param-distance", "--param-file", "{tmp}/nan.pt"], "NaN or infinite"),
    (["--param-distance", "--param-file", "{tmp}/inf.pt"], "NaN or infinite"),
    (["--param-file", "{tmp}/nan.pt"], "--param-distance"),
    (["--momentum-sharpness"], "--momentum"),
    (["--momentum-sharpness", "--adam"], "--momentum"),
    (["--preconditioned-sharpness", "--momentum", "0.9"], "--adam"),
    (["--hessian-trace", "--hessian-trace-every", "0"], "--hessian-trace-every"),
])
def test_bad_measurement_settings_exit_2_with_one_line(results_env, capsys, argv, fragment):
    _bad_param_files(results_env)
    run_dir = results_env / "run"
    argv = [a.format(tmp=results_env) for a in argv]
    assert training.main([*SMALL, "--steps", "2", *argv, "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err
    assert not run_dir.exists()


@pytest.mark.parametrize("family, at_step", [
    (SGD_FAMILY, 6), ([*SGD_FAMILY, "--nesterov"], 3), (ADAM_FAMILY, 6),
])
def test_interrupted_and_resumed_run_is_bit_identical_with_the_family_on(results_env, monkeypatch, cheap, family,
                                                                         at_step):
    argv = [*SMALL, *family, "--steps", "12", "--measure-every", "4", "--checkpoint-every", "4"]
    reference, interrupted = results_env / "ref", results_env / "int"
    assert training.main([*argv, "--run-dir", str(reference)]) == 0
    with monkeypatch.context() as patch:
        interrupt_at(patch, at_step)
        assert training.main([*argv, "--run-dir", str(interrupted)]) == 130
    assert training.main(["--resume", str(interrupted), "--quiet"]) == 0
    same_results(reference, interrupted)
    same_parameters(reference, interrupted, 12)
