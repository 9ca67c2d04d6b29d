"""Outputs that cannot be written are one-line errors with exit code 2, not tracebacks; written
figures get ordinary permissions; a read-only sweep folder still shows its status table; an
analysis never downloads a data set."""

import dataclasses
import os

import pytest

import plot_results
import sharpness_gap
import sweep
import utils.data
from analysis_runs import copy_run, runs  # noqa: F401
from utils.errors import UserError
from utils.plotting import new_figure, save_figure
from utils.runs import load_run, rebuild
from utils.sweep import prepare_sweep, sweep_folder
from utils.sweep_grid import define_sweep, parse_grid_tokens

GRID = ["--lr", "0.05", "0.1"]


def one_error_line(capsys, prog, *fragments):
    err = capsys.readouterr().err
    assert err.startswith(f"{prog}: error: cannot write") and err.count("\n") == 1
    for fragment in fragments:
        assert fragment in err


def test_figure_where_a_folder_stands_is_a_user_error(runs, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "results.png").mkdir(parents=True)
    assert plot_results.main([str(runs["a"]), "--out", str(out)]) == 2
    one_error_line(capsys, plot_results.PROG, str(out / "results.png"), "--out DIR")
    assert sorted(p.name for p in out.iterdir()) == ["results.png"]  # no temporary left behind


def test_table_where_a_folder_stands_is_a_user_error(runs, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "sharpness_gap.csv").mkdir(parents=True)
    assert sharpness_gap.main([str(runs["a"]), "--tail", "0.75", "--out", str(out)]) == 2
    one_error_line(capsys, sharpness_gap.PROG, str(out / "sharpness_gap.csv"))


@pytest.mark.parametrize("script,extra", [(plot_results, []), (sharpness_gap, ["--tail", "0.75"])])
def test_permission_denied_on_rename_is_a_user_error(script, extra, runs, tmp_path, monkeypatch, capsys):
    def denied(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", denied)
    assert script.main([str(runs["a"]), *extra, "--out", str(tmp_path / "out")]) == 2
    one_error_line(capsys, script.PROG, "Permission denied")
    assert os.listdir(tmp_path / "out") == []


def test_saved_figures_are_readable_by_others(tmp_path):
    fig, _ = new_figure(1, 1)
    previous = os.umask(0o022)
    try:
        paths = save_figure(fig, str(tmp_path), "figure")
    finally:
        os.umask(previous)
    assert [os.path.basename(p) for p in paths] == ["figure.png", "figure.pdf"]
    assert [os.stat(p).st_mode & 0o777 for p in paths] == [0o644, 0o644]


def test_status_of_an_unwritable_sweep_prints_the_table(results_env, capsys):
    definition = define_sweep("grid", parse_grid_tokens(GRID), ["--steps", "5"], command_line=["sweep.py"])
    sweep_dir = sweep_folder("grid")
    prepare_sweep(sweep_dir, definition)
    # Folders where the lock file and sweep.json go: opening and replacing them fails as on a read-only folder.
    os.unlink(os.path.join(sweep_dir, ".lock"))
    os.mkdir(os.path.join(sweep_dir, ".lock"))
    os.mkdir(os.path.join(sweep_dir, "sweep.json"))
    assert sweep.main(["status", "--name", "grid"]) == 0
    out = capsys.readouterr().out
    assert "2 runs, 2 pending" in out and "lr0.05" in out and "lr0.1" in out
    assert os.listdir(os.path.join(sweep_dir, "sweep.json")) == []


def test_preparing_an_unwritable_sweep_is_a_user_error(results_env):
    definition = define_sweep("grid", parse_grid_tokens(GRID), ["--steps", "5"], command_line=["sweep.py"])
    sweep_dir = sweep_folder("grid")
    os.makedirs(os.path.join(sweep_dir, ".lock"))
    with pytest.raises(UserError, match="^cannot write into the sweep folder .*; set \\$RESULTS"):
        prepare_sweep(sweep_dir, definition)


def test_rebuilding_a_run_never_downloads(runs, tmp_path, monkeypatch):
    run = load_run(str(runs["a"]))
    run.cfg = dataclasses.replace(run.cfg, dataset="cifar10", download=True)
    monkeypatch.setattr(utils.data, "_download", lambda *a: pytest.fail("rebuild reached the network"))
    with pytest.raises(UserError, match="cifar10 files missing"):
        rebuild(run, cpu=True)
