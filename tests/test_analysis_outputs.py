"""Where analyses of several runs write without --out, names that keep different selections apart,
and legends that ignore how runs were executed."""

import dataclasses
import hashlib
import os

import plot_results
import sharpness_gap
from analysis_runs import copy_run, runs  # noqa: F401
from utils.config import RunConfig
from utils.plotting import run_labels
from utils.runs import Run


def test_runs_in_one_folder_write_there_under_a_name_of_the_selection(runs, tmp_path, capsys):
    group = tmp_path / "digits_mlp"
    a, b = copy_run(runs["a"], group, "a"), copy_run(runs["b"], group, "b")
    copy_run(runs["a"], group, "c")
    assert plot_results.main([str(a), str(b)]) == 0
    assert plot_results.main([str(group / "c"), str(b)]) == 0
    assert plot_results.main([str(b), str(a)]) == 0  # the same selection again replaces its own figure
    stems = {"results_overlay_" + hashlib.sha1(names).hexdigest()[:8] for names in (b"a\nb", b"b\nc")}
    assert sorted(p for p in os.listdir(group) if p.startswith("results")) == \
        sorted(f"{stem}.{ext}" for stem in stems for ext in ("pdf", "png"))
    assert sharpness_gap.main([str(group), "--tail", "0.75"]) == 0
    assert (group / ("sharpness_gap_" + hashlib.sha1(b"a\nb\nc").hexdigest()[:8] + ".csv")).is_file()


def test_runs_in_different_folders_need_out(runs, tmp_path, capsys):
    a = copy_run(runs["a"], tmp_path / "one", "a")
    b = copy_run(runs["b"], tmp_path / "two", "b")
    for script, extra in ((plot_results, []), (sharpness_gap, ["--tail", "0.75"])):
        assert script.main([str(a), str(b), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"meet only at {tmp_path}" in err and "--out DIR" in err
    assert sorted(os.listdir(tmp_path)) == ["one", "two"] and sorted(os.listdir(a.parent)) == ["a"]
    assert plot_results.main([str(a), str(b), "--out", str(tmp_path / "figures")]) == 0


def test_settings_of_execution_do_not_label_overlaid_runs():
    base = RunConfig(lr=0.05)
    quiet = dataclasses.replace(base, exact_measurements=True, noise_chunk=7, wandb=True, tensorboard=True,
                                quiet=True, cpu=True, download=True, run_dir="/elsewhere")
    runs = [Run("/r/first", {}, base), Run("/r/second", {}, quiet)]
    assert run_labels(runs) == ["first", "second"]
    runs.append(Run("/r/third", {}, dataclasses.replace(quiet, lr=0.1)))
    assert run_labels(runs) == ["η=0.05", "η=0.05", "η=0.1"]
