"""--dataset path/file.npz, mnist1d and --model path/file.py:function: loading, hashes, errors."""

import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import compute_final_fullbs
import compute_final_gHg
import training
from utils.data import load_dataset
from utils.errors import UserError
from utils.user_files import sha256_of

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "residual_mlp.py")
SMALL = ["--batch", "10", "--quiet", "--steps", "3"]


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def toy_arrays(n=40, m=10, shape=(2, 3), classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return {"x_train": rng.normal(2.0, 3.0, size=(n, *shape)).astype(np.float32), "y_train": rng.integers(0, classes, n),
            "x_test": rng.normal(size=(m, *shape)).astype(np.float32), "y_test": rng.integers(0, classes, m)}


def run_folders(root):
    return sorted(p.parent for p in (root / "results").rglob("config.json")) if (root / "results").exists() else []


def one_line_error(capsys, code):
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


# ---------------------------------------------------------------------------------------------
# Data files


def test_npz_data_is_standardised_per_channel_filtered_and_subset(tmp_path):
    arrays = toy_arrays()
    path = write_npz(tmp_path / "toy.npz", **arrays)
    data = load_dataset(path, root=None, loss="ce")
    x = arrays["x_train"].astype(np.float64)
    mean, std = x.mean(axis=(0, 2), keepdims=True), x.std(axis=(0, 2), keepdims=True)
    np.testing.assert_allclose(data.X_train.numpy(), (x - mean) / std, atol=1e-5)
    np.testing.assert_allclose(data.X_test.numpy(), (arrays["x_test"] - mean) / std, atol=1e-5)
    assert data.input_shape == (2, 3) and data.output_dim == 3 and torch.equal(data.Y_train, torch.from_numpy(arrays["y_train"]))

    kept = load_dataset(path, root=None, loss="mse", classes=[2, 0], num_data=5)
    assert kept.X_train.shape == (5, 2, 3) and kept.output_dim == 1  # two classes with mse: one +-1 output
    labels = arrays["y_train"][np.isin(arrays["y_train"], [2, 0])]
    assert set(kept.Y_train.reshape(-1).tolist()) <= {-1.0, 1.0} and len(labels) >= 5
    with pytest.raises(UserError, match="valid labels of .* are 0..2"):
        load_dataset(path, root=None, classes=[0, 3])


def test_npz_without_test_split_trains_and_records_its_hash(results_env, capsys):
    arrays = toy_arrays(shape=(6,))
    path = write_npz(results_env / "tabular.npz", x_train=arrays["x_train"], y_train=arrays["y_train"])
    assert training.main(["--dataset", path, "--width", "8", *SMALL]) == 0
    (run_dir,) = run_folders(results_env)
    assert run_dir.parent.name == "tabular_mlp"  # the file's stem, never the raw path
    cfg = json.loads((run_dir / "config.json").read_text())["config"]
    assert cfg["dataset"] == os.path.abspath(path) and cfg["dataset_sha256"] == sha256_of(path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["final_test_loss"] is None  # no test split: not a number


BAD_DATA = [
    ({"y_train": np.zeros(4, dtype=np.int64)}, "no array x_train"),
    ({"x_train": np.zeros((4, 3))}, "no array y_train"),
    ({"x_train": np.zeros((4, 3)), "y_train": np.zeros(5, dtype=np.int64)}, "x_train has 4 rows but y_train has 5"),
    ({"x_train": np.zeros((4, 3)), "y_train": np.array([0.0, 1.0, 0.5, 1.0])}, "y_train must hold integer class labels"),
    ({"x_train": np.array([[0.0, np.nan]] * 4), "y_train": np.array([0, 1, 0, 1])}, "x_train holds NaN"),
    ({"x_train": np.zeros((4, 3)), "y_train": np.array([0, 1, 0, 1]), "x_test": np.zeros((2, 3))}, "x_test but no y_test"),
    ({"x_train": np.zeros((4, 3)), "y_train": np.array([0, 1, 0, 1]), "x_test": np.zeros((2, 3)),
      "y_test": np.array([0, 1, 1])}, "x_test has 2 rows but y_test has 3"),
    ({"x_train": np.zeros((4, 3)), "y_train": np.array([0, 1, 0, 1]), "x_test": np.array([[np.inf, 0, 0]]),
      "y_test": np.array([0])}, "x_test holds NaN"),
]


@pytest.mark.parametrize("arrays, fragment", BAD_DATA)
def test_bad_data_files_are_one_line_naming_file_and_array(results_env, capsys, arrays, fragment):
    path = write_npz(results_env / "bad.npz", **arrays)
    err = one_line_error(capsys, training.main(["--dataset", path, "--batch", "2", "--quiet", "--steps", "1"]))
    assert path in err and fragment in err
    assert run_folders(results_env) == []


def test_missing_or_unreadable_data_file(results_env, capsys):
    err = one_line_error(capsys, training.main(["--dataset", str(results_env / "none.npz"), *SMALL]))
    assert "none.npz does not exist" in err
    (results_env / "junk.npz").write_text("not an archive")
    err = one_line_error(capsys, training.main(["--dataset", str(results_env / "junk.npz"), *SMALL]))
    assert "cannot read" in err and "junk.npz" in err


def test_vit_refuses_inputs_that_are_not_images(results_env, capsys):
    arrays = toy_arrays(shape=(1, 40))
    path = write_npz(results_env / "signals.npz", **arrays)
    err = one_line_error(capsys, training.main(["--model", "vit", "--dataset", path, *SMALL]))
    assert "model vit needs image inputs (channels, height, width), got shape (1, 40)" in err


def test_changed_data_file_is_refused_on_resume_unless_allowed(results_env, capsys):
    arrays = toy_arrays(shape=(6,))
    path = write_npz(results_env / "toy.npz", **arrays)
    run_dir = str(results_env / "run")
    # Stop after the first checkpoints: the run is then resumable.
    assert training.main(["--dataset", path, "--width", "8", "--run-dir", run_dir, "--checkpoint-every", "1", *SMALL]) == 0
    os.unlink(os.path.join(run_dir, "summary.json"))
    arrays["x_train"][0, 0] += 1
    write_npz(path, **arrays)
    err = one_line_error(capsys, training.main(["--resume", run_dir]))
    assert "toy.npz changed since the run started" in err and "--allow-changed-data" in err
    assert training.main(["--resume", run_dir, "--allow-changed-data", "--quiet"]) == 0
    assert "changed since the run started" in capsys.readouterr().err
    os.unlink(path)
    os.unlink(os.path.join(run_dir, "summary.json"))
    err = one_line_error(capsys, training.main(["--resume", run_dir]))
    assert "toy.npz does not exist" in err and "put it back" in err


def test_mnist1d_is_generated_once_into_datasets_and_read_from_there(results_env, monkeypatch):
    import mnist1d.data

    data = load_dataset("mnist1d", root=str(results_env / "datasets"), loss="ce", num_data=300)
    assert (results_env / "datasets" / "mnist1d" / "mnist1d_default.npz").is_file()
    assert data.input_shape == (1, 40) and data.X_train.shape == (300, 1, 40) and data.X_test.shape == (1000, 1, 40)
    assert data.output_dim == 10 and abs(float(data.X_train.mean())) < 1e-5

    def no_generation(*args, **kwargs):
        raise AssertionError("the cached file must be read, not generated again")
    monkeypatch.setattr(mnist1d.data, "make_dataset", no_generation)
    again = load_dataset("mnist1d", root=str(results_env / "datasets"), loss="ce", num_data=300)
    assert torch.equal(again.X_train, data.X_train)
    assert training.main(["--dataset", "mnist1d", "--num-data", "100", "--width", "8", *SMALL]) == 0


# ---------------------------------------------------------------------------------------------
# Model files


def test_model_file_keeps_its_init_drawn_under_init_seed(results_env):
    from utils.config import RunConfig
    from utils.training import build

    before = torch.random.get_rng_state()
    spec = f"{EXAMPLE}:residual_mlp"
    first = build(RunConfig(model=spec, model_args={"width": 8, "depth": 1}, num_data=50, batch=10)).model
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's global generator is untouched
    again = build(RunConfig(model=spec, model_args={"width": 8, "depth": 1}, num_data=50, batch=10)).model
    other = build(RunConfig(model=spec, model_args={"width": 8, "depth": 1}, num_data=50, batch=10, init_seed=1)).model
    torch.manual_seed(8888)
    import importlib.util
    module_spec = importlib.util.spec_from_file_location("example_model", EXAMPLE)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    reference = module.residual_mlp((1, 8, 8), 10, width=8, depth=1)  # PyTorch's own init after seeding with init_seed
    for a, b, c, d in zip(first.parameters(), again.parameters(), other.parameters(), reference.parameters()):
        assert torch.equal(a, b) and torch.equal(a, d)
    assert not all(torch.equal(a, c) for a, c in zip(first.parameters(), other.parameters()))


def test_model_file_run_records_it_and_refuses_a_changed_file(results_env, capsys, tmp_path):
    source = tmp_path / "my_net.py"
    source.write_text(Path(EXAMPLE).read_text())
    run_dir = str(results_env / "run")
    argv = ["--model", f"{source}:residual_mlp", "--model-args", '{"width": 8, "depth": 1}', "--num-data", "50",
            "--checkpoint-every", "1", "--run-dir", run_dir, *SMALL]
    assert training.main(argv) == 0
    cfg = json.loads(Path(run_dir, "config.json").read_text())["config"]
    assert cfg["model"] == f"{source}:residual_mlp" and cfg["model_args"] == {"width": 8, "depth": 1}
    assert cfg["model_sha256"] == sha256_of(str(source))
    assert training.main(["--model", f"{source}:residual_mlp", "--model-args", '{"width": 8}', "--num-data", "50", *SMALL]) == 0
    assert [p.parent.name for p in run_folders(results_env)] == ["digits_my_net-residual_mlp"]

    source.write_text(Path(EXAMPLE).read_text() + "\n# edited\n")
    os.unlink(os.path.join(run_dir, "summary.json"))
    err = one_line_error(capsys, training.main(["--resume", run_dir]))
    assert "my_net.py changed since the run started" in err and "--allow-changed-model" in err
    err = one_line_error(capsys, compute_final_fullbs.main([run_dir, "--quiet"]))
    assert "changed since the run started" in err
    err = one_line_error(capsys, compute_final_gHg.main([run_dir, "--quiet"]))
    assert "my_net.py changed since the run started" in err and "--allow-changed-model" in err
    folders = run_folders(results_env)
    err = one_line_error(capsys, training.main(["--cont-run", run_dir, "--cont-step", "2", "--quiet"]))
    assert "my_net.py changed since the run started" in err and "--allow-changed-model" in err
    assert run_folders(results_env) == folders  # the refused fork left no folder
    assert training.main(["--resume", run_dir, "--allow-changed-model", "--quiet"]) == 0
    assert "going on with it (--allow-changed-model)" in capsys.readouterr().err

    source.unlink()
    os.unlink(os.path.join(run_dir, "summary.json"))
    err = one_line_error(capsys, training.main(["--resume", run_dir, "--allow-changed-model"]))
    assert f"{source} does not exist; the run was started with it; put it back" in err


BAD_MODELS = [
    ("import numpy as np\ndef net(:\n", "net", "importing"),
    ("raise RuntimeError('no GPU here')\n", "net", "RuntimeError: no GPU here"),
    ("def other(input_shape, num_outputs):\n    pass\n", "net", "net is not defined there"),
    ("net = 3\n", "net", "net is not a function"),
    ("def net(shape):\n    pass\n", "net", "cannot be called as net(input_shape, num_outputs)"),
    ("def net(input_shape, num_outputs):\n    return 7\n", "net", "returned a int, not a torch.nn.Module"),
    ("import torch.nn as nn\ndef net(input_shape, num_outputs):\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))\n",
     "net", "to (2, 3), not (2, 10)"),
    ("import torch.nn as nn\ndef net(input_shape, num_outputs):\n    return nn.Linear(5, num_outputs)\n", "net",
     "fails on a batch of inputs of shape (2, 1, 8, 8)"),
    ("def net(input_shape, num_outputs):\n    raise ValueError('bad width')\n", "net", "failed (ValueError: bad width)"),
]


@pytest.mark.parametrize("source, function, fragment", BAD_MODELS)
def test_bad_model_files_are_one_line_naming_file_and_problem(results_env, capsys, tmp_path, source, function, fragment):
    path = tmp_path / "user_net.py"
    path.write_text(textwrap.dedent(source))
    err = one_line_error(capsys, training.main(["--model", f"{path}:{function}", *SMALL]))
    assert "user_net.py" in err and fragment in err, err
    assert run_folders(results_env) == [] and not (results_env / "results").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["--model", "missing_file.py:net"], "missing_file.py does not exist"),
    (["--model-args", '{"depth": 3}'], "--model-args only applies"),
    (["--model", f"{EXAMPLE}:residual_mlp", "--model-args", "{depth: 3}"], "--model-args is not valid JSON"),
    (["--model", f"{EXAMPLE}:residual_mlp", "--model-args", "[3]"], "JSON object"),
    (["--model", f"{EXAMPLE}:residual_mlp", "--model-args", '{"blocks": 3}'], "cannot be called as residual_mlp"),
    (["--heads", "2"], "--heads and --patch only apply to --model vit"),
    (["--model", "vit", "--heads", "3"], "--heads 3 must divide --width 64"),
    (["--model", "vit", "--patch", "3"], "--patch 3 must divide the image size 8x8"),
])
def test_model_flag_mistakes(results_env, capsys, argv, fragment):
    err = one_line_error(capsys, training.main([*argv, *SMALL]))
    assert fragment in err, err
    assert run_folders(results_env) == []
