"""The analysis scripts end to end on short digits runs, their library functions, and bad inputs."""

import json
import math
import os
from types import SimpleNamespace

import matplotlib.image
import pandas as pd
import pytest
import torch

import compute_final_fullbs
import plot_results
import sharpness_gap
import training
from analysis_runs import (check_bad_input, copy_run, final_model, garbled_value, missing_folder,  # noqa: F401
                           mistyped_config, no_checkpoints, renamed_step_column, runs, truncated_results,
                           unknown_version)
from curvature_reference import dense_hessian
from utils.analysis import sharpness_plateaus, stability_label, stability_threshold, tail_median, tail_reaching_last
from utils.config import RunConfig
from utils.errors import UserError
from utils.estimators import measurement_generator
from utils.measures import lambda_max
from plot_results import final_test_accuracy
from utils.plotting import (legend_order, new_figure, plot_runs, plot_sharpness_gap, run_labels, thresholds_differ,
                            use_plain_log_labels)
from utils.runs import Run, load_run, load_weights, read_run_results, select_runs


# Stability thresholds


def diverges(optimizer_factory, curvature, steps=400):
    """Whether the optimiser diverges on L(x) = curvature x^2 / 2 from x = 1."""
    x = torch.ones(1, dtype=torch.float64, requires_grad=True)
    optimizer = optimizer_factory([x])
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * curvature * x ** 2).sum().backward()
        optimizer.step()
    return abs(x.item()) > 1


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.5, False), (0.9, False), (0.5, True), (0.9, True)])
def test_stability_threshold_separates_stable_from_divergent_sgd(momentum, nesterov):
    cfg = RunConfig(lr=0.1, momentum=momentum, nesterov=nesterov)
    line = stability_threshold(cfg)

    def sgd(params):
        return torch.optim.SGD(params, lr=cfg.lr, momentum=momentum, nesterov=nesterov)

    assert not diverges(sgd, 0.98 * line)
    assert diverges(sgd, 1.02 * line)


def test_stability_threshold_values_and_labels():
    assert stability_threshold(RunConfig(lr=0.05)) == pytest.approx(40.0)
    assert stability_threshold(RunConfig(lr=0.1, momentum=0.9)) == pytest.approx(38.0)
    assert stability_threshold(RunConfig(lr=0.1, momentum=0.5, nesterov=True)) == pytest.approx(15.0)
    assert stability_threshold(RunConfig(lr=0.01, adam=True)) == pytest.approx(3800.0)
    assert [stability_label(c) for c in (RunConfig(), RunConfig(momentum=0.9), RunConfig(adam=True))] == \
        ["2/η", "(2+2μ)/η", "38/η"]


# compute_final_fullbs.py


def test_fullbs_all_checkpoints_against_dense_hessian(runs, tmp_path, capsys):
    out = tmp_path / "out"
    assert compute_final_fullbs.main([str(runs["a"]), "--num-eigenvalues", "2", "--all-checkpoints",
                                      "--out", str(out), "--cpu", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'final_fullbs.json'}" in printed and "lambda_2" in printed
    record = json.loads((out / "final_fullbs.json").read_text())
    table = pd.read_csv(out / "fullbs_checkpoints.csv")
    assert list(table["step"]) == [0, 10, 20, 30]
    assert table["converged"].all() and (table["residual"] <= 1e-5).all()
    assert record["step"] == 30 and record["lambda_max"] == table["lambda_max"].iloc[-1]
    assert record["threshold"] == pytest.approx(40.0) and record["tol"] == 1e-5

    run, setup, step = final_model(runs["a"], torch.float64)
    exact = torch.linalg.eigvalsh(dense_hessian(setup.model, setup.loss_fn, setup.data.X_train, setup.data.Y_train))
    for found, true in zip((record["lambda_max"], record["lambda_2"]), exact.flip(0)[:2].tolist()):
        # A Ritz value with relative residual r lies within r |value| of an eigenvalue.
        assert abs(found - true) <= record["residual"] * abs(found)


def test_fullbs_final_checkpoint_equals_the_measurement_function(runs, tmp_path):
    out = tmp_path / "out"
    assert compute_final_fullbs.main([str(runs["a"]), "--out", str(out), "--cpu"]) == 0
    assert not (out / "fullbs_checkpoints.csv").exists()
    record = json.loads((out / "final_fullbs.json").read_text())
    run, setup, step = final_model(runs["a"], torch.float64)
    _, direct = lambda_max(setup.model, setup.loss_fn, setup.data.X_train, setup.data.Y_train, tol=1e-5,
                           generator=measurement_generator(run.cfg.measure_seed, step))
    assert record["lambda_max"] == direct.value
    assert (record["method"], record["dtype"], record["device"]) == ("lanczos", "float64", "cpu")

    assert compute_final_fullbs.main([str(runs["a"]), "--out", str(out), "--cpu", "--dtype", "float32", "--tol", "1e-4"]) == 0
    single = json.loads((out / "final_fullbs.json").read_text())
    assert single["dtype"] == "float32" and single["lambda_max"] == pytest.approx(direct.value, rel=2e-4)


def test_fullbs_exact_measurements_multiply_by_plain_double_backward(runs, tmp_path, monkeypatch):
    from utils import hvp

    assert compute_final_fullbs.main([str(runs["a"]), "--out", str(tmp_path / "fast"), "--cpu"]) == 0

    def refuse(*args, **kwargs):
        raise AssertionError("--exact-measurements asked for the default (fast) HVP mode")

    monkeypatch.setattr(hvp, "default_hvp_mode", refuse)
    assert compute_final_fullbs.main([str(runs["a"]), "--out", str(tmp_path / "exact"), "--cpu",
                                      "--exact-measurements"]) == 0
    fast, exact = (json.loads((tmp_path / kind / "final_fullbs.json").read_text()) for kind in ("fast", "exact"))
    assert (fast["exact_measurements"], exact["exact_measurements"]) == (False, True)
    assert fast["hvp_mode"] == exact["hvp_mode"] == "double-backward"  # on a CPU the default is the plain mode
    assert exact["lambda_max"] == pytest.approx(fast["lambda_max"], rel=1e-12)


def test_fullbs_writes_into_the_latest_run_by_default(runs, tmp_path, monkeypatch):
    root = tmp_path / "results"
    older = copy_run(runs["a"], root, "older")
    newer = copy_run(runs["b"], root, "newer")
    record = json.loads((older / "config.json").read_text())
    record["start_time"] = "2000-01-01T00:00:00+00:00"
    (older / "config.json").write_text(json.dumps(record))
    monkeypatch.setenv("RESULTS", str(root))
    assert compute_final_fullbs.main(["--cpu"]) == 0
    assert (newer / "final_fullbs.json").exists() and not (older / "final_fullbs.json").exists()


# sharpness_gap.py


def test_sharpness_gap_table_and_figure(runs, tmp_path, capsys):
    out = tmp_path / "out"
    assert sharpness_gap.main([str(runs["a"]), str(runs["b"]), "--tail", "0.75", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    stem = "sharpness_gap"  # the plain name in a folder given by --out
    assert f"wrote {out / (stem + '.png')}" in printed
    table = pd.read_csv(out / f"{stem}.csv")
    assert list(table["batch"]) == [8, 16] and list(table["lr"]) == [0.05, 0.1]

    frame = read_run_results(str(runs["a"]))
    late = frame[frame["step"] >= 7.5]
    a = table.iloc[0]
    assert a["lambda_max"] == late["lambda_max"].dropna().median() and a["lambda_max_count"] == 2
    assert a["batch_sharpness"] == late["batch_sharpness"].dropna().median()
    assert a["lambda_max_source"] == "results.txt" and a["threshold"] == pytest.approx(40.0)

    final = json.loads((runs["b"] / "final.json").read_text())
    b = table.iloc[1]
    assert b["lambda_max_source"] == "final.json" and b["lambda_max"] == final["lambda_max"]
    assert b["batch_sharpness_se"] == final["batch_sharpness_se"]
    assert b["gap"] == final["batch_sharpness"] - final["lambda_max"] and b["threshold"] == pytest.approx(20.0)

    image = matplotlib.image.imread(out / f"{stem}.png")
    assert image.shape[1] == 7 * 150
    assert (out / f"{stem}.pdf").read_bytes().startswith(b"%PDF")


def test_sharpness_gap_figure_names_gd_and_writes_the_gap_in_math_text():
    """The batch size of a full-batch run is labelled GD, not only by its number, and the minus of
    the gap is math text like the λ_max beside it (a bare U+2212 comes from another font)."""
    row = {"lr": 0.4, "dynamics": "SGD", "optimizer": "sgd", "threshold": 5.0, "threshold_label": "2/η",
           "lambda_max": 4.0, "batch_sharpness": 4.8, "batch_sharpness_se": 0.02, "gap": 0.8}
    table = pd.DataFrame([{**row, "batch": 16, "full_batch": False}, {**row, "batch": 512, "full_batch": True}])
    left, right = plot_sharpness_gap(table).axes
    for ax in (left, right):
        assert [label.get_text() for label in ax.get_xticklabels()] == ["16", "GD\n(b = n = 512)"]
    assert right.get_ylabel() == r"Batch Sharpness $-$ $\lambda_{\max}$" and "−" not in right.get_title()
    # An SGD run at b = 512 on a larger set beside the full-batch one: 512 is no longer GD alone.
    mixed = pd.concat([table, pd.DataFrame([{**row, "lr": 0.2, "batch": 512, "full_batch": False}])])
    assert [label.get_text() for label in plot_sharpness_gap(mixed).axes[0].get_xticklabels()] == ["16", "512"]


def test_sharpness_gap_keeps_runs_of_other_dynamics_apart(runs, tmp_path, capsys):
    """A noisy-GD baseline at the step size and batch size of an SGD run is its own row, colour
    and legend entry, not averaged with the SGD run."""
    sgd, noisy = copy_run(runs["a"], tmp_path, "sgd"), copy_run(runs["a"], tmp_path, "noisy")
    record = json.loads((noisy / "config.json").read_text())
    record["config"]["gd_noise"] = "iso"
    (noisy / "config.json").write_text(json.dumps(record))
    assert sharpness_gap.main([str(sgd), str(noisy), "--tail", "0.75", "--out", str(tmp_path / "out")]) == 0
    assert "GD + isotropic noise" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "out" / "sharpness_gap.csv")
    assert sorted(table["dynamics"]) == ["GD + isotropic noise", "SGD"]
    fig = plot_sharpness_gap(table)
    assert [text.get_text() for text in fig.legends[0].get_texts()] == ["η=0.05, GD + isotropic noise", "η=0.05, SGD"]
    assert len(fig.axes[0].containers) == 2  # one Batch Sharpness series with error bars per group


def test_sharpness_gap_prefers_final_fullbs_json_unless_tail_only(runs, tmp_path):
    run_dir = copy_run(runs["a"], tmp_path)
    assert compute_final_fullbs.main([str(run_dir), "--cpu"]) == 0
    assert sharpness_gap.main([str(run_dir), "--tail", "0.5"]) == 0
    row = pd.read_csv(run_dir / "sharpness_gap.csv").iloc[0]
    fullbs = json.loads((run_dir / "final_fullbs.json").read_text())
    assert row["lambda_max_source"] == "final_fullbs.json" and row["lambda_max"] == fullbs["lambda_max"]
    assert row["batch_sharpness_source"] == "results.txt"
    assert sharpness_gap.main([str(run_dir), "--tail-only", "--tail", "0.5"]) == 0
    assert pd.read_csv(run_dir / "sharpness_gap.csv").iloc[0]["lambda_max_source"] == "results.txt"


def test_plateaus_from_a_results_table():
    frame = pd.DataFrame({"step": range(10), "lambda_max": [9, math.nan, 9, 9, 9, math.nan, 1, math.nan, 3, 2]})
    assert tail_median(frame, "lambda_max", 0.5) == (2.0, 3)
    # T = 10 steps, tail 0.5: the window starts at step 5 itself (steps 5..9).
    assert tail_median(pd.DataFrame({"step": range(10), "x": [0.0] * 5 + [1.0, 5.0, 6.0, 7.0, 8.0]}), "x", 0.5) == (6.0, 5)
    value, count = tail_median(frame, "batch_sharpness", 0.5)
    assert math.isnan(value) and count == 0
    frame["batch_sharpness"] = 5.0
    row = sharpness_plateaus(RunConfig(lr=0.1), frame, tail=0.5, final={"batch_sharpness": 4.0, "batch_sharpness_se": 0.1})
    assert (row["lambda_max"], row["batch_sharpness"], row["gap"], row["threshold"]) == (2.0, 4.0, 2.0, pytest.approx(20.0))
    assert (row["lambda_max_source"], row["batch_sharpness_source"]) == ("results.txt", "final.json")


def test_sharpness_gap_needs_both_sharpnesses(results_env, tmp_path, capsys):
    run_dir = tmp_path / "plain"
    assert training.main(["--width", "8", "--num-data", "60", "--batch", "8", "--steps", "5", "--quiet",
                          "--run-dir", str(run_dir)]) == 0
    capsys.readouterr()
    assert sharpness_gap.main([str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no lambda_max" in err and "--lambdamax" in err
    assert not (run_dir / "sharpness_gap.csv").exists()


def test_sharpness_gap_says_which_tail_reaches_the_last_measurement(runs, tmp_path, capsys):
    # Run a measured at steps 0, 10, 20 of 30: the default window (steps 24 to 29) holds none.
    assert sharpness_gap.main([str(runs["a"]), "--out", str(tmp_path / "default")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "its last lambda_max is at step 20: pass --tail 0.34 to include it" in err
    assert not (tmp_path / "default").exists()
    assert sharpness_gap.main([str(runs["a"]), "--tail", "0.34", "--out", str(tmp_path / "wider")]) == 0
    assert pd.read_csv(tmp_path / "wider" / "sharpness_gap.csv").iloc[0]["lambda_max_count"] == 1


def test_tail_reaching_the_last_measurement():
    frame = pd.DataFrame({"step": range(1000), "lambda_max": [1.0 if s % 50 == 0 else math.nan for s in range(1000)]})
    assert tail_reaching_last(frame, "lambda_max") == (950, 0.05)
    assert tail_median(frame, "lambda_max", 0.05) == (1.0, 1)
    assert tail_reaching_last(frame.assign(lambda_max=math.nan), "lambda_max") is None
    assert tail_reaching_last(frame.drop(columns="lambda_max"), "lambda_max") is None


# plot_results.py


def test_plot_results_single_run_panels_and_stability_line(runs):
    run = load_run(str(runs["a"]))
    figure = plot_runs([run], [read_run_results(run.run_dir)])
    axes = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["loss", r"$\lambda_{\max}$", "Batch Sharpness", "accuracy"]
    assert [ax.get_ylabel() for ax in axes] == ["training loss", r"$\lambda_{\max}(H)$",
                                                r"$\mathbb{E}_B[g_B^\top H_B g_B/\|g_B\|^2]$", "accuracy"]
    assert axes[0].get_yscale() == "log"
    for ax in axes[1:3]:
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert list(lines["2/η = 40"].get_ydata()) == [40, 40] and lines["2/η = 40"].get_linestyle() == "--"
    assert len(axes[2].collections) == 1  # the standard-error band
    assert all(line.get_marker() == "o" for line in axes[1].get_lines()[:1] + axes[2].get_lines()[:1])  # 4 measurements
    assert not any(line.get_label().startswith("2/η") for line in axes[3].get_lines())
    assert figure.get_size_inches()[0] == 7.0


def test_the_standard_error_band_spans_two_standard_errors_either_side(runs):
    """With a large standard error (10 % of Batch Sharpness) the band is visibly tall: at every
    measured step it reaches from value − 2 SE to value + 2 SE in data units."""
    run = load_run(str(runs["a"]))
    frame = read_run_results(run.run_dir)
    frame["batch_sharpness_se"] = 0.1 * frame["batch_sharpness"].abs()
    figure = plot_runs([run], [frame])
    (band,) = next(ax for ax in figure.axes if ax.get_title() == "Batch Sharpness").collections
    vertices = band.get_paths()[0].vertices
    measured = frame.dropna(subset=["batch_sharpness"])
    assert len(measured) >= 2
    for step, value, se in zip(measured["step"], measured["batch_sharpness"], measured["batch_sharpness_se"]):
        heights = vertices[vertices[:, 0] == step][:, 1]
        assert heights.min() == pytest.approx(value - 2 * se) and heights.max() == pytest.approx(value + 2 * se)
        assert heights.max() - heights.min() > 0


def test_plot_results_latest_run_by_default(runs, capsys):
    assert plot_results.main([]) == 0
    assert f"wrote {runs['b'] / 'results.png'}" in capsys.readouterr().out
    image = matplotlib.image.imread(runs["b"] / "results.png")
    assert image.shape[1] == 7 * 150 and image.shape[0] > 300
    assert (runs["b"] / "results.pdf").read_bytes().startswith(b"%PDF")


def test_plot_results_overlay_legend_from_configs(runs, tmp_path):
    selected = select_runs(pattern="digits_mlp/*")
    assert run_labels(selected) == ["η=0.05, b=8", "η=0.1, b=16"]
    out = tmp_path / "figures"
    assert plot_results.main(["--glob", "digits_mlp/*", "--out", str(out), "--dpi", "100"]) == 0
    assert sorted(os.listdir(out)) == ["results_overlay.pdf", "results_overlay.png"]
    stem = "results_overlay"
    assert matplotlib.image.imread(out / f"{stem}.png").shape[1] == 700


def test_overlay_panels_name_their_line_styles_and_stability_line(runs):
    selected = [load_run(str(runs["a"])), load_run(str(runs["b"]))]
    figure = plot_runs(selected, [read_run_results(run.run_dir) for run in selected])
    axes = {ax.get_title(): ax for ax in figure.axes if ax.get_visible()}

    def key(title):
        legend = axes[title].get_legend()
        return None if legend is None else [(text.get_text(), line.get_linestyle(), line.get_color())
                                            for text, line in zip(legend.get_texts(), legend.get_lines())]

    # Colours are runs (the figure legend); a panel's own key is grey and names its line styles.
    assert key("loss") == [("step's batch", "-", "0.3"), ("full training set", "-", "0.3")]
    assert key(r"$\lambda_{\max}$") == [(r"$\lambda_{\max}$", "-", "0.3"), ("2/η", ":", "0.3")]
    assert key("accuracy") == [("train", "-", "0.3")]  # named even alone: the star of the test set is not drawn here
    assert [text.get_text() for text in figure.legends[0].get_texts()] == ["η=0.05, b=8", "η=0.1, b=16"]


def test_overlaid_runs_are_ordered_by_the_settings_they_differ_in(runs):
    selected = [load_run(str(runs["b"])), load_run(str(runs["a"]))]
    figure = plot_runs(selected, [read_run_results(run.run_dir) for run in selected])
    assert [text.get_text() for text in figure.legends[0].get_texts()] == ["η=0.05, b=8", "η=0.1, b=16"]

    def run(**settings):
        return SimpleNamespace(cfg=RunConfig(**settings), name=str(settings))

    batches = [run(batch=b) for b in (64, 1497, 32, 16)]
    assert [batches[i].cfg.batch for i in legend_order(batches)] == [16, 32, 64, 1497]
    mixed = [run(lr=0.2, gd_noise="sgd"), run(lr=0.1, gd_noise="sgd"), run(lr=0.2)]
    assert legend_order(mixed) == [1, 2, 0]  # lr first (config order), then plain SGD before noisy GD
    same = [run(), run()]
    assert legend_order(same) == [0, 1]


def test_overlaid_runs_of_different_thresholds_are_drawn_normalized_with_a_note(runs, tmp_path, capsys):
    selected = [load_run(str(runs["a"])), load_run(str(runs["b"]))]  # 2/η = 40 and 20
    assert plot_results.main([str(runs["a"]), str(runs["b"]), "--out", str(tmp_path / "auto")]) == 0
    assert "note: the runs differ in their stability thresholds" in capsys.readouterr().out
    assert plot_results.main([str(runs["a"]), str(runs["b"]), "--out", str(tmp_path / "raw"), "--no-normalize"]) == 0
    assert "note:" not in capsys.readouterr().out
    frames = [read_run_results(run.run_dir) for run in selected]
    figure = plot_runs(selected, frames, normalize=True)
    axes = {ax.get_title(): ax for ax in figure.axes if ax.get_visible()}
    lines = axes[r"$\lambda_{\max}$ ÷ stability threshold"].get_lines()
    for curve, frame, threshold in zip(lines[:2], frames, (40, 20)):
        assert list(curve.get_ydata()) == pytest.approx(list(frame["lambda_max"].dropna() / threshold))
    assert len(lines) == 3 and list(lines[2].get_ydata()) == [1, 1]  # one shared line, drawn once
    assert axes["loss"].get_lines()[1].get_ydata()[0] == pytest.approx(frames[0]["full_loss"].dropna().iloc[0])


def test_runs_differ_in_threshold_when_their_comparable_lines_differ():
    def of(*configs):
        return [SimpleNamespace(cfg=cfg) for cfg in configs]

    assert thresholds_differ(of(RunConfig(lr=0.05), RunConfig(lr=0.1)))
    assert thresholds_differ(of(RunConfig(lr=0.1), RunConfig(lr=0.1, momentum=0.9)))
    assert not thresholds_differ(of(RunConfig(batch=8), RunConfig(batch=64)))
    assert not thresholds_differ(of(RunConfig(lr=0.1), RunConfig(lr=0.1, adam=True)))  # different panels


def test_a_full_batch_run_is_labelled_gd_and_the_test_accuracy_is_marked(runs, tmp_path):
    gd = Run("/r/gd", {"resolved": {"num_train": 120}}, RunConfig(batch=120))
    sgd = Run("/r/sgd", {"resolved": {"num_train": 120}}, RunConfig(batch=16))
    assert run_labels([gd, sgd]) == ["GD", "SGD, b=16"]
    run = load_run(str(runs["b"]))
    figure = plot_runs([run], [read_run_results(run.run_dir)], final_test_accuracy=[final_test_accuracy(run)])
    accuracy = next(ax for ax in figure.axes if ax.get_title() == "accuracy")
    star = next(line for line in accuracy.get_lines() if line.get_marker() == "*")
    summary = json.loads((runs["b"] / "summary.json").read_text())
    assert (star.get_xdata()[0], star.get_ydata()[0]) == (summary["final_step"], summary["final_test_accuracy"])
    assert [text.get_text() for text in accuracy.get_legend().get_texts()] == ["train", "test (end)"]


def test_log_axes_spanning_less_than_two_decades_get_plain_labels():
    figure, (narrow, wide, huge) = new_figure(1, 3)
    for ax, (low, high) in zip((narrow, wide, huge), [(0.3, 1.0), (0.018, 0.8), (1e-4, 1.0)]):
        ax.plot([0, 1], [low, high])
        ax.set_yscale("log")
        use_plain_log_labels(ax)
    figure.canvas.draw()

    def labels(ax):
        low, high = ax.get_ylim()
        ticks = list(ax.yaxis.get_major_ticks()) + list(ax.yaxis.get_minor_ticks())
        return {tick.label1.get_text() for tick in ticks if low <= tick.get_loc() <= high} - {""}

    assert {"0.3", "0.4", "0.6", "1"} <= labels(narrow) and not any("10" in t for t in labels(narrow))
    assert {"0.02", "0.1", "0.2"} <= labels(wide) and not labels(wide) & {"0.03", "0.04", "0.06"}
    assert all("10" in t for t in labels(huge))


# Selecting runs


def test_select_runs_by_filters_and_glob(runs, tmp_path):
    assert [r.run_dir for r in select_runs(batch=16)] == [str(runs["b"])]
    assert [r.run_dir for r in select_runs(lr=0.05, dataset="digits", model="mlp")] == [str(runs["a"])]
    assert [r.name for r in select_runs()] == ["a", "b"]
    assert [r.name for r in select_runs(latest=True)] == ["b"]
    assert [r.name for r in select_runs([str(runs["a"].parent)], batch=8)] == ["a"]
    with pytest.raises(UserError, match="no EOSS runs found .* matching --batch 32"):
        select_runs(batch=32)
    with pytest.raises(UserError, match="matching --model cnn"):
        select_runs(pattern="digits_mlp/*", model="cnn")


def test_moved_and_renamed_run_gives_the_same_numbers(runs, tmp_path):
    moved = copy_run(runs["a"], tmp_path / "elsewhere", "renamed_lr9_b999")
    assert compute_final_fullbs.main([str(moved), "--cpu", "--out", str(tmp_path / "x")]) == 0
    assert compute_final_fullbs.main([str(runs["a"]), "--cpu", "--out", str(tmp_path / "y")]) == 0
    moved_record, original = (json.loads((tmp_path / d / "final_fullbs.json").read_text()) for d in "xy")
    assert {k: v for k, v in moved_record.items() if k != "seconds"} == {k: v for k, v in original.items() if k != "seconds"}


def test_damaged_runs_below_a_folder_are_skipped_with_a_line_each(runs, tmp_path, capsys):
    copy_run(runs["a"], tmp_path, "good")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    found = select_runs([str(tmp_path)])
    assert [r.name for r in found] == ["good"]
    assert capsys.readouterr().err == (f"skipping {tmp_path / 'broken'}: {tmp_path / 'broken' / 'config.json'} is not "
                                       f"valid JSON; the run folder is damaged\nskipped 1 of 2 run folders under {tmp_path}\n")


# Bad inputs: one line, exit code 2, nothing written

SCRIPTS = {"fullbs": compute_final_fullbs, "gap": sharpness_gap, "plot": plot_results}
CASES = [(script, damage) for damage in (missing_folder, unknown_version, mistyped_config) for script in SCRIPTS] + \
        [("fullbs", no_checkpoints)] + \
        [(script, damage) for damage in (truncated_results, renamed_step_column, garbled_value) for script in ("gap", "plot")]


@pytest.mark.parametrize("script,damage", CASES, ids=[f"{s}-{d.__name__}" for s, d in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(runs, tmp_path, capsys, script, damage):
    check_bad_input(SCRIPTS[script], ["--cpu"] if script == "fullbs" else [], damage, runs, tmp_path, capsys)


def test_a_file_given_as_a_run_is_named_as_a_file(runs):
    with pytest.raises(UserError, match="results.txt is a file, not a folder; pass the folder of an EOSS run"):
        select_runs([os.path.join(runs["a"], "results.txt")])


def test_truncated_results_without_newline_and_empty_results(runs, tmp_path):
    run_dir = copy_run(runs["a"], tmp_path)
    text = (run_dir / "results.txt").read_text()
    (run_dir / "results.txt").write_text(text.rstrip("\n"))
    with pytest.raises(UserError, match="cut-off row"):
        read_run_results(str(run_dir))
    (run_dir / "results.txt").write_text("# only a comment\n")
    with pytest.raises(UserError, match="no header line"):
        read_run_results(str(run_dir))
    header = next(line for line in text.split("\n") if not line.startswith("#"))
    (run_dir / "results.txt").write_text(f"# no rows yet\n{header}\n")
    with pytest.raises(UserError, match="has no rows although the run finished"):
        read_run_results(str(run_dir))
    os.unlink(run_dir / "summary.json")  # a run that has not logged its first step
    assert read_run_results(str(run_dir)).empty
    (run_dir / "results.txt").write_text(text)
    pd.testing.assert_frame_equal(read_run_results(str(run_dir)), pd.read_csv(run_dir / "results.txt", comment="#"))


def test_rebuild_reproduces_the_logged_lambda_max(runs):
    run, setup, _ = final_model(runs["a"])
    load_weights(setup, os.path.join(runs["a"], "checkpoints", "step_10.pt"))
    _, estimate = lambda_max(setup.model, setup.loss_fn, setup.data.X_train, setup.data.Y_train, tol=1e-5)
    logged = read_run_results(run.run_dir).set_index("step").loc[10, "lambda_max"]
    assert estimate.value == pytest.approx(logged, rel=2e-3)
    assert setup.data.X_train.shape[0] == run.record["resolved"]["num_train"] == 120


def test_noise_baselines_are_labelled_in_titles_and_legends():
    import pandas as pd

    from utils.config import RunConfig
    from utils.plotting import run_title
    from utils.runs import Run

    configs = [RunConfig(), RunConfig(gd_noise="sgd"), RunConfig(gd_noise="diag"), RunConfig(gd_noise="iso"),
               RunConfig(gd_noise="const", noise_mag=0.5), RunConfig(sde=True, sde_h=0.01)]
    overlay = [Run(f"/runs/{i}", {}, cfg) for i, cfg in enumerate(configs)]
    assert run_labels(overlay) == ["SGD", "GD + SGD noise (Σ/b)", "GD + diagonal noise", "GD + isotropic noise",
                                   "GD + constant noise σ=0.5", "SGD SDE (h=0.01)"]
    frame = pd.DataFrame({"step": [0, 1], "batch_loss": [1.0, 0.5], "full_loss": [1.0, 0.4]})
    figure = plot_runs([overlay[2]], [frame])
    assert figure._suptitle.get_text() == run_title(configs[2]) and "GD + diagonal noise" in run_title(configs[2])
