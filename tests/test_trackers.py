"""training.py --wandb / --tensorboard: every results.txt row, the config and the summary mirrored."""

import json
import math
import sys
import types

import pytest

import training
from utils.results import read_results

SMALL = ["--width", "16", "--num-data", "120", "--batch", "8", "--steps", "20", "--quiet",
         "--lambdamax", "--batch-sharpness", "--measure-every", "5", "--checkpoint-every", "5"]


class FakeRun:
    """Records what a wandb run is given."""

    def __init__(self, settings):
        self.settings, self.logged, self.summary, self.exit_code = settings, [], {}, None

    def log(self, data, step):
        self.logged.append((step, dict(data)))

    def finish(self, exit_code=0):
        self.exit_code = exit_code


@pytest.fixture
def fake_wandb(monkeypatch):
    module = types.ModuleType("wandb")
    module.runs = []

    def init(**settings):
        module.runs.append(FakeRun(settings))
        return module.runs[-1]

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return module


def logged_rows(frame):
    """results.txt rows as the trackers should receive them: by step, NaN cells left out."""
    return [(int(row["step"]), {k: v for k, v in row.items() if k != "step" and not math.isnan(v)})
            for row in frame.to_dict("records")]


def test_wandb_mirrors_rows_config_and_summary_offline(results_env, fake_wandb):
    run_dir = results_env / "run"
    assert training.main([*SMALL, "--wandb", "--run-dir", str(run_dir)]) == 0
    (run,) = fake_wandb.runs
    record = json.loads((run_dir / "config.json").read_text())
    assert run.settings["mode"] == "offline" and run.settings["dir"] == str(run_dir) and run.settings["name"] == "run"
    assert run.settings["project"] == "eoss"
    assert run.settings["config"] == {**record["config"], "resolved": record["resolved"], "start_step": 0}
    assert record["config"]["wandb"] is True
    assert run.logged == logged_rows(read_results(run_dir / "results.txt"))
    assert run.summary == json.loads((run_dir / "summary.json").read_text())
    assert run.exit_code == 0


def test_wandb_mode_set_by_the_user_is_kept(results_env, fake_wandb, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_PROJECT", "sweep-42")
    assert training.main([*SMALL, "--steps", "3", "--wandb", "--run-dir", str(results_env / "run")]) == 0
    assert fake_wandb.runs[0].settings["mode"] is None and fake_wandb.runs[0].settings["project"] == "sweep-42"


def test_wandb_project_group_and_tags(results_env, fake_wandb, capsys):
    run_dir = results_env / "run"
    assert training.main([*SMALL, "--steps", "2", "--wandb", "--wandb-project", "edge", "--wandb-group", "lr-sweep",
                          "--wandb-tags", "digits", "gd", "--run-dir", str(run_dir)]) == 0
    settings = fake_wandb.runs[0].settings
    assert (settings["project"], settings["group"], settings["tags"]) == ("edge", "lr-sweep", ["digits", "gd"])
    config = json.loads((run_dir / "config.json").read_text())["config"]
    assert (config["wandb_project"], config["wandb_group"], config["wandb_tags"]) == ("edge", "lr-sweep", ["digits", "gd"])
    assert training.main([*SMALL, "--wandb-group", "g", "--run-dir", str(results_env / "no")]) == 2
    assert "--wandb-group only applies to --wandb; add --wandb" in capsys.readouterr().err


def test_a_sweep_is_one_wandb_group(results_env, fake_wandb, capsys):
    import sweep

    assert sweep.main(["--name", "edge", "--lr", "0.1", "0.2", "--dry-run", "--", "--steps", "2", "--wandb"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("--wandb-group edge" in line for line in lines)
    assert sweep.main(["--name", "own", "--lr", "0.1", "0.2", "--dry-run", "--", "--wandb", "--wandb-group", "mine"]) == 0
    assert "--wandb-group own" not in capsys.readouterr().out
    assert sweep.main(["--name", "plain", "--lr", "0.1", "0.2", "--dry-run"]) == 0
    assert "--wandb-group" not in capsys.readouterr().out


def read_events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def test_tensorboard_writes_every_row_the_config_and_the_summary(results_env):
    run_dir = results_env / "run"
    assert training.main([*SMALL, "--tensorboard", "--run-dir", str(run_dir)]) == 0
    events = read_events(run_dir)
    expected = logged_rows(read_results(run_dir / "results.txt"))
    for column in ("batch_loss", "full_loss", "lambda_max", "batch_sharpness", "batch_sharpness_se", "wall_time"):
        want = [(step, values[column]) for step, values in expected if column in values]
        got = [(e.step, e.value) for e in events.Scalars(column)]
        assert [s for s, _ in got] == [s for s, _ in want] and len(want) > 0
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)  # stored as float32
    summary = json.loads((run_dir / "summary.json").read_text())
    (final_loss,) = events.Scalars("summary/final_train_loss")
    assert final_loss.step == 20 and final_loss.value == pytest.approx(summary["final_train_loss"], rel=1e-6)
    assert {"config/text_summary", "summary/text_summary"} <= set(events.Tags()["tensors"])
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"tensorboard": true' in config_text


def test_tensorboard_resume_replaces_the_steps_after_the_checkpoint(results_env):
    run_dir = results_env / "run"
    assert training.main([*SMALL, "--tensorboard", "--run-dir", str(run_dir)]) == 0
    assert training.main(["--resume", str(run_dir), "--resume-step", "10", "--quiet"]) == 0
    steps = [e.step for e in read_events(run_dir).Scalars("batch_loss")]
    assert steps == list(range(20))


@pytest.mark.parametrize("flag,module,package", [("--wandb", "wandb", "wandb"),
                                                  ("--tensorboard", "torch.utils.tensorboard", "tensorboard")])
def test_missing_tracker_package_is_one_line_and_no_run_folder(results_env, monkeypatch, capsys, flag, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # makes the import fail as if not installed
    run_dir = results_env / "run"
    assert training.main([*SMALL, flag, "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"pip install {package}" in err and flag in err
    assert not run_dir.exists()


def test_only_finite_numbers_of_a_row_are_sent(fake_wandb, tmp_path):
    from utils.trackers import WandbTracker

    tracker = WandbTracker(fake_wandb, str(tmp_path), {"config": {}}, 0)
    tracker.log_row({"step": 3, "loss": 0.5, "lambda_max_se": math.nan, "inf": math.inf, "diverged": True, "note": "x"})
    assert fake_wandb.runs[0].logged == [(3, {"loss": 0.5, "diverged": 1.0})]
