"""Results that a change of structure must not change: fixed short command lines with every
measurement on (MLP, CNN and resnet_bn; mse and ce; SGD with momentum and Adam) against the
values stored in tests/golden/ by the code that first computed them (see tests/golden/cases.py).

Sample counts (``_n``) must match exactly: a different count would mean a different stopping
decision, not round-off. Values agree to a relative 1e-6.
"""

import json
import math
import os

import pandas as pd
import pytest

from golden.cases import CASES, FINAL_FILES, HERE, run_case
from run_checks import is_timing_column
from utils.results import read_results

RTOL = 1e-6


def close(stored, now, where):
    if isinstance(stored, dict):
        assert set(stored) == set(now), where
        for key in stored:
            if not is_timing_column(key) and key not in ("seconds", "device"):
                close(stored[key], now[key], f"{where}.{key}")
    elif isinstance(stored, float) or isinstance(now, float):
        both_missing = stored is None and now is None
        assert both_missing or math.isclose(stored, now, rel_tol=RTOL, abs_tol=1e-12), f"{where}: {stored} != {now}"
    else:
        assert stored == now, f"{where}: {stored!r} != {now!r}"


@pytest.mark.parametrize("name", CASES)
def test_outputs_equal_the_stored_ones(tmp_path, name):
    run_dir = run_case(name, str(tmp_path))
    stored, now = read_results(os.path.join(HERE, name, "results.txt")), read_results(os.path.join(run_dir, "results.txt"))
    assert list(stored.columns) == list(now.columns)
    kept = [c for c in stored.columns if not is_timing_column(c)]
    counts = [c for c in kept if c.endswith("_n") or c.endswith("_hvps") or c in ("step", "epoch")]
    pd.testing.assert_frame_equal(stored[counts], now[counts])
    pd.testing.assert_frame_equal(stored[kept], now[kept], rtol=RTOL, atol=1e-12)
    for file in FINAL_FILES:
        with open(os.path.join(HERE, name, file)) as f, open(os.path.join(run_dir, file)) as g:
            close(json.load(f), json.load(g), f"{name}/{file}")


@pytest.fixture
def stored_run(tmp_path):
    """A copy of the run folder kept in tests/golden/stored_run: written by an earlier version of
    the code and interrupted by SIGTERM after step 5 of 12."""
    import shutil

    run_dir = tmp_path / "stored_run"
    shutil.copytree(os.path.join(HERE, "stored_run"), run_dir)
    return run_dir


def test_a_stored_run_resumes_bit_identically(stored_run):
    import training

    assert training.main(["--resume", str(stored_run), "--quiet"]) == 0
    finished, now = read_results(os.path.join(HERE, "stored_run_finished_results.txt")), read_results(stored_run / "results.txt")
    kept = [c for c in finished.columns if not is_timing_column(c)]
    pd.testing.assert_frame_equal(finished[kept], now[kept], check_exact=True)


def test_a_stored_run_forks_and_is_analysed(stored_run, tmp_path):
    import compute_final_fullbs
    import plot_results
    import sharpness_gap
    import training

    fork = tmp_path / "fork"
    assert training.main(["--cont-run", str(stored_run), "--cont-step", "6", "--lr", "0.1", "--steps", "9",
                          "--quiet", "--run-dir", str(fork)]) == 0
    assert read_results(fork / "results.txt")["step"].tolist() == [6, 7, 8]
    assert compute_final_fullbs.main([str(stored_run), "--quiet"]) == 0
    with open(stored_run / "final_fullbs.json") as f:
        assert json.load(f)["step"] == 6
    assert sharpness_gap.main([str(stored_run), "--tail", "1", "--out", str(tmp_path / "gap")]) == 0
    assert plot_results.main([str(stored_run), str(fork), "--out", str(tmp_path / "figures")]) == 0
    assert (tmp_path / "figures" / "results_overlay.png").exists()
