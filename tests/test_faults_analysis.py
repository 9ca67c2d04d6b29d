"""Damaged and odd inputs of the analysis scripts and sweeps, closed pipes, oversized figures and
failed downloads: one line and exit code 2, or a quiet success, never a traceback, and nothing
left behind."""

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request

import matplotlib.figure
import pytest

import plot_results
import sharpness_gap
import sweep
import utils.sweep
from analysis_runs import check_bad_input, copy_run, runs  # noqa: F401
from utils.data import load_dataset
from utils.errors import UserError
import utils.results
from utils.plotting import MAX_PNG_PIXELS, MAX_PNG_SIDE, new_figure, render_figure
from utils.runs import read_optional_json, select_runs
from utils.sweep import prepare_sweep, sweep_folder
from utils.sweep_grid import define_sweep, parse_grid_tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"plot": (plot_results, []), "gap": (sharpness_gap, ["--tail", "0.75"])}


def results_line(run_dir, row):
    """The lines of results.txt and the index of the ``row``-th data row (0 is the header)."""
    lines = (run_dir / "results.txt").read_text().split("\n")
    return lines, next(i for i, line in enumerate(lines) if not line.startswith("#")) + row


def bad_bytes_in_results(run_dir):
    lines, at = results_line(run_dir, 2)
    data = "\n".join(lines).encode()
    start = data.index(lines[at].encode())
    (run_dir / "results.txt").write_bytes(data[:start + 2] + b"\xff\xfe" + data[start + 2:])
    return f"results.txt line {at + 1} is not UTF-8 text (byte 0xff at column 3)"


def unbalanced_quote(run_dir):
    lines, at = results_line(run_dir, 2)
    lines[at] = '"' + lines[at]
    (run_dir / "results.txt").write_text("\n".join(lines))
    return "results.txt is not comma-separated values"


def step_without_value(run_dir):
    lines, at = results_line(run_dir, 0)
    step = lines[at].split(",").index("step")
    for i in range(at + 1, len(lines) - 1):
        fields = lines[i].split(",")
        fields[step] = "nan"
        lines[i] = ",".join(fields)
    (run_dir / "results.txt").write_text("\n".join(lines))
    return "results.txt has rows without a step"


def bad_bytes_in_final_json(run_dir):
    (run_dir / "final_fullbs.json").write_bytes(b'{"lambda_max": 3.0, "note": "\xff"}')
    return "final_fullbs.json is not valid JSON"


def list_in_final_json(run_dir):
    (run_dir / "final_ghg.json").write_text("[1, 2]")
    return "final_ghg.json does not hold a JSON object"


DAMAGES = [("plot", bad_bytes_in_results), ("gap", bad_bytes_in_results), ("plot", unbalanced_quote),
           ("gap", unbalanced_quote), ("plot", step_without_value), ("gap", step_without_value),
           ("gap", bad_bytes_in_final_json), ("gap", list_in_final_json)]


@pytest.mark.parametrize("script,damage", DAMAGES, ids=[f"{s}-{d.__name__}" for s, d in DAMAGES])
def test_damaged_run_files_are_one_line_exit_2_and_write_nothing(runs, tmp_path, capsys, script, damage):
    module, extra = SCRIPTS[script]
    check_bad_input(module, extra, damage, runs, tmp_path, capsys)


def test_unreadable_results_is_one_line(runs, tmp_path, monkeypatch, capsys):
    run_dir = copy_run(runs["a"], tmp_path)
    opened = open

    def denied(path, *args, **kwargs):  # mode 000 does not stop root, who may run the tests
        if str(path).endswith("results.txt"):
            raise PermissionError(13, "Permission denied", str(path))
        return opened(path, *args, **kwargs)

    monkeypatch.setattr(utils.results, "open", denied, raising=False)
    assert plot_results.main([str(run_dir), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == (f"plot_results.py: error: cannot read {run_dir / 'results.txt'} (Permission denied); "
                   f"check the permissions of the run folder\n")


def test_read_optional_json_with_bytes_that_are_not_utf8(tmp_path):
    (tmp_path / "final_fullbs.json").write_bytes(b'{"lambda_max": "\xc3"}')
    with pytest.raises(UserError, match="final_fullbs.json is not valid JSON; delete it and recompute it"):
        read_optional_json(str(tmp_path), "final_fullbs.json")


@pytest.mark.parametrize("column", ["lambda_max", "batch_sharpness_se"])
def test_values_too_large_to_draw_are_left_out_of_the_figure(runs, tmp_path, capsys, column):
    run_dir = copy_run(runs["a"], tmp_path)
    lines, at = results_line(run_dir, 0)
    column = lines[at].split(",").index(column)
    fields = lines[at + 1].split(",")
    fields[column] = "1e308"  # a diverged float64 run: matplotlib overflowed on such an axis range
    lines[at + 1] = ",".join(fields)
    (run_dir / "results.txt").write_text("\n".join(lines))
    assert plot_results.main([str(run_dir), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "results.png").is_file()


# Item 8: sweeps


def test_binary_grid_file_is_one_line_naming_file_and_line(results_env, capsys):
    grid = results_env / "grid.json"
    grid.write_bytes(b'{"lr": [0.1,\n 0.2], \x89PNG\n}')
    assert sweep.main(["--name", "g", "--grid", str(grid), "--dry-run", "--", "--steps", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sweep.py: error: ")
    assert f"{grid} line 2 is not UTF-8 text (byte 0x89 at column 8)" in err and "--grid" in err
    assert not os.path.exists(sweep_folder("g"))


def test_status_reads_results_with_damaged_bytes(results_env, capsys):
    definition = define_sweep("grid", parse_grid_tokens(["--lr", "0.05", "0.1"]), ["--steps", "5"],
                              command_line=["sweep.py"])
    sweep_dir = sweep_folder("grid")
    prepare_sweep(sweep_dir, definition)
    damaged_header, damaged_row = (os.path.join(sweep_dir, "runs", name) for name in ("lr0.05", "lr0.1"))
    for run_dir in (damaged_header, damaged_row):
        os.makedirs(run_dir)
    with open(os.path.join(damaged_header, "results.txt"), "wb") as f:
        f.write(b"# \xff title\nepoch,step,lo\xffss\n0,0,1.0\n0,1,0.5\n")
    with open(os.path.join(damaged_row, "results.txt"), "wb") as f:
        f.write(b"epoch,step,loss\n0,0,1.0\n0,1,0.\xff5\n")
    assert utils.sweep._last_logged_step(os.path.join(damaged_header, "results.txt")) == 2
    assert utils.sweep._last_logged_step(os.path.join(damaged_row, "results.txt")) == 2
    assert sweep.main(["status", "--name", "grid"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "2 interrupted" in captured.out


def test_status_reads_the_header_and_the_end_of_a_long_results_file(tmp_path):
    """Status reads the first and last 64 KiB only; the rows between them are not needed."""
    path = tmp_path / "results.txt"
    rows = "".join(f"0,{step},{step / 7!r}\n" for step in range(20000))
    path.write_text("# title\nepoch,step,loss\n" + rows + "0,20000,0.")  # the last row cut by a kill
    assert os.path.getsize(path) > 4 * 65536
    assert utils.sweep._last_logged_step(str(path)) == 20000
    path.write_text("# title\nepoch,step,loss\n" + rows.replace("0,19990,", "0,x,"))
    assert utils.sweep._last_logged_step(str(path)) is None


# Item 9: a closed pipe


class ClosedPipe:
    """A stdout whose reader has gone away, as after ``| head -1``."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")


@pytest.mark.parametrize("script", SCRIPTS)
def test_closed_stdout_writes_the_files_and_exits_0(runs, tmp_path, monkeypatch, capsys, script):
    module, extra = SCRIPTS[script]
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    out = tmp_path / "out"
    assert module.main([str(runs["a"]), *extra, "--out", str(out)]) == 0
    assert capsys.readouterr().err == ""
    stem = "results" if module is plot_results else "sharpness_gap"
    expected = ["png", "pdf"] + (["csv"] if module is sharpness_gap else [])
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{stem}.{ext}" for ext in expected)


def test_sharpness_gap_into_a_closed_pipe_is_quiet(runs, tmp_path):
    out = tmp_path / "out"
    # The reading end closes before the script prints anything, as `| head -1` does once its
    # line has come; a real head may read everything first, and then no pipe breaks at all.
    process = subprocess.Popen([sys.executable, "sharpness_gap.py", str(runs["a"]), "--tail", "0.75", "--out", str(out)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()
    err = process.stderr.read()
    assert process.wait() == 0 and err == b""
    assert sorted(p.name for p in out.iterdir()) == ["sharpness_gap.csv", "sharpness_gap.pdf", "sharpness_gap.png"]


# Item 10: oversized figures and output folders


@pytest.mark.parametrize("script", SCRIPTS)
def test_dpi_beyond_the_png_limit_is_refused_before_any_folder_exists(runs, tmp_path, capsys, script):
    module, extra = SCRIPTS[script]
    out = tmp_path / "out"
    assert module.main([str(runs["a"]), *extra, "--dpi", "100000", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{module.PROG}: error: --dpi 100000 makes the PNG 700000 x ")
    largest = int(re.search(r"the largest --dpi that fits this figure is (\d+)", err).group(1))
    assert 100 < largest < 10000
    assert not out.exists()


def test_largest_dpi_named_is_the_largest_that_fits():
    fig, _ = new_figure(2, 2)
    with pytest.raises(UserError, match=r"the largest --dpi that fits this figure is \d+") as info:
        render_figure(fig, dpi=100000)
    largest = int(re.search(r"is (\d+)", str(info.value)).group(1))
    width, height = fig.get_size_inches()

    def fits(dpi):
        w, h = int(width * dpi), int(height * dpi)
        return max(w, h) <= MAX_PNG_SIDE and w * h <= MAX_PNG_PIXELS

    assert fits(largest) and not fits(largest + 1)
    with pytest.raises(UserError, match=f"is {largest}"):
        render_figure(fig, dpi=largest + 1)


def test_a_figure_that_fails_to_draw_leaves_no_folder_and_no_file(runs, tmp_path, monkeypatch):
    savefig = matplotlib.figure.Figure.savefig

    def pdf_fails(self, fname, **kwargs):
        if kwargs.get("format") == "pdf":
            raise RuntimeError("the PDF backend failed")
        return savefig(self, fname, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", pdf_fails)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="the PDF backend failed"):
        plot_results.main([str(runs["a"]), "--out", str(out)])
    assert not out.exists()


def test_out_is_created_when_the_figures_are_written(runs, tmp_path):
    out = tmp_path / "deep" / "out"
    assert sharpness_gap.main([str(runs["a"]), "--tail", "0.75", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["sharpness_gap.csv", "sharpness_gap.pdf", "sharpness_gap.png"]


# Item 12: damaged runs below a folder


def damaged_folders(tmp_path, runs, good=True):
    if good:
        copy_run(runs["a"], tmp_path, "good")
    for name, text in (("broken", "{not json"), ("old", json.dumps({"version": 99})), ("empty", "")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(text)


def test_each_skipped_run_is_one_line_and_a_summary_follows(runs, tmp_path, capsys):
    damaged_folders(tmp_path, runs)
    assert plot_results.main([str(tmp_path), "--out", str(tmp_path / "figures")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in err[:3]] == [f"skipping {tmp_path / name}" for name in ("broken", "empty", "old")]
    assert err[3:] == [f"skipped 3 of 4 run folders under {tmp_path}"]


def test_no_readable_run_left_says_damaged_runs_were_skipped(runs, tmp_path, capsys):
    damaged_folders(tmp_path, runs, good=False)
    assert sharpness_gap.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 5 and err[3] == f"skipped 3 of 3 run folders under {tmp_path}"
    assert err[4].startswith(f"sharpness_gap.py: error: no readable EOSS runs in {tmp_path}: 3 damaged run folders "
                             f"were skipped (listed above)")
    assert not (tmp_path / "out").exists()


def test_select_runs_counts_skips_over_several_folders(runs, tmp_path, capsys):
    damaged_folders(tmp_path / "one", runs)
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "bad").mkdir()
    (tmp_path / "two" / "bad" / "config.json").write_text("[]")
    assert [r.name for r in select_runs([str(tmp_path / "one"), str(tmp_path / "two")])] == ["good"]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 6 and err[3] == f"skipped 3 of 4 run folders under {tmp_path / 'one'}"
    assert err[4].startswith(f"skipping {tmp_path / 'two' / 'bad'}: ") and \
        err[5] == f"skipped 1 of 1 run folders under {tmp_path / 'two'}"


# Item 13: failed downloads


def test_download_without_network_leaves_no_empty_folder(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    root = tmp_path / "datasets"
    with pytest.raises(UserError, match=f"^downloading cifar10 into {root / 'cifar10'} failed: .*name resolution"):
        load_dataset("cifar10", root=root, download=True)
    assert not root.exists()  # torchvision created $DATASETS too


def test_failed_download_removes_what_it_created_and_only_that(tmp_path, monkeypatch):
    import torchvision.datasets

    folder = tmp_path / "cifar10"
    (folder / "mine").mkdir(parents=True)
    (folder / "mine" / "notes.txt").write_text("kept")
    (folder / "cifar-10-python.tar.gz.part").write_bytes(b"an older partial file")

    class BrokenCIFAR10:
        def __init__(self, root, train=True, download=False):
            (folder / "cifar-10-batches-py").mkdir()
            (folder / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"half")
            (folder / "mine" / "new.tmp").write_bytes(b"")
            (folder / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b partial archive")
            raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", BrokenCIFAR10)
    with pytest.raises(UserError, match="Connection reset by peer"):
        load_dataset("cifar10", root=tmp_path, download=True)
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == \
        ["cifar-10-python.tar.gz.part", "mine", "mine/notes.txt"]


@pytest.mark.parametrize("failure", [ConnectionResetError(104, "Connection reset by peer"), KeyboardInterrupt()])
def test_svhn_keeps_a_finished_file_and_removes_the_partial_one(tmp_path, monkeypatch, failure):
    import torchvision.datasets

    folder = tmp_path / "svhn"

    class HalfSVHN:
        def __init__(self, root, split="train", download=False):
            folder.mkdir(exist_ok=True)
            (folder / f"{split}_32x32.mat").write_bytes(b"complete" if split == "train" else b"partial")
            if split == "test":
                raise failure

    monkeypatch.setattr(torchvision.datasets, "SVHN", HalfSVHN)
    with pytest.raises(UserError if isinstance(failure, OSError) else KeyboardInterrupt):
        load_dataset("svhn", root=tmp_path, download=True)
    assert [p.name for p in folder.iterdir()] == ["train_32x32.mat"]
