"""--device: names, machines that lack the device, mps without float64, and TF32 recorded."""

import json

import pytest
import torch

import compute_final_fullbs
import training
from utils.devices import float64_device, resolve_device, set_tf32
from utils.errors import UserError

SMALL = ["--width", "8", "--num-data", "40", "--batch", "8", "--steps", "2", "--quiet"]


def test_device_names_resolve_on_this_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == resolve_device("cpu") == resolve_device("cuda", force_cpu=True) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device(None) == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(UserError, match=r"--device cuda:2: this machine has 2 CUDA GPUs \(cuda:0 to cuda:1\); pick one"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("name,fragment", [("gpu", "'gpu' is not a device name; use cpu, cuda, cuda:N or mps"),
                                           ("cuda:x", "is not a device name"),
                                           ("cuda", "PyTorch sees no CUDA GPU on this machine; use --device cpu"),
                                           ("mps", "Metal backend is not available here; use --device cpu")])
def test_a_device_this_machine_lacks_is_one_line_exit_2(results_env, monkeypatch, capsys, tmp_path, name, fragment):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert training.main([*SMALL, "--device", name, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_cpu_is_device_cpu_and_both_are_recorded_with_tf32(results_env, tmp_path, capsys):
    assert training.main([*SMALL, "--cpu", "--device", "cuda", "--run-dir", str(tmp_path / "both")]) == 2
    assert "--cpu and --device cuda contradict each other" in capsys.readouterr().err
    assert training.main([*SMALL, "--device", "cpu", "--run-dir", str(tmp_path / "run")]) == 0
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (record["config"]["device"], record["config"]["tf32"], record["device"]) == ("cpu", False, "cpu")
    assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False
    try:
        assert training.main([*SMALL, "--cpu", "--tf32", "--run-dir", str(tmp_path / "tf32")]) == 0
        assert torch.backends.cuda.matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32 is True
        assert json.loads((tmp_path / "tf32" / "config.json").read_text())["config"]["tf32"] is True
    finally:
        set_tf32(False)
    assert compute_final_fullbs.main([str(tmp_path / "tf32"), "--device", "cpu", "--quiet"]) == 0
    assert torch.backends.cuda.matmul.allow_tf32 is False  # measurements of analysis scripts: always exact float32


def test_mps_has_no_float64(results_env, monkeypatch, tmp_path, capsys):
    assert float64_device(torch.device("mps")) == torch.device("cpu")
    assert float64_device(torch.device("cuda:1")) == torch.device("cuda:1")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert training.main([*SMALL, "--device", "mps", "--final", "--run-dir", str(tmp_path / "run")]) == 2
    assert "--final solves lambda_max in float64, which mps lacks" in capsys.readouterr().err


def test_resume_may_move_a_run_to_another_device(results_env, monkeypatch, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert training.main([*SMALL, "--steps", "4", "--checkpoint-every", "2", "--device", "cpu", "--run-dir", str(run_dir)]) == 0
    (run_dir / "summary.json").unlink()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    record = json.loads((run_dir / "config.json").read_text())
    record["config"]["device"] = "cuda"  # as if trained on a GPU, resumed where there is none
    (run_dir / "config.json").write_text(json.dumps(record))
    assert training.main(["--resume", str(run_dir), "--quiet"]) == 2
    assert "--device cuda: PyTorch sees no CUDA GPU on this machine; use --device cpu" in capsys.readouterr().err
    assert training.main(["--resume", str(run_dir), "--device", "cpu", "--quiet"]) == 0
