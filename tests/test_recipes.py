"""Recipes: every experiment of the paper defines a valid sweep at both scales, the README's
Quick start (a recipe) shows the edge at a small size, and recipe mistakes are one line."""

import glob
import os
import re
import shlex

import pandas as pd
import pytest

import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "*.yaml")))


def quick_start_command() -> list[str]:
    """The arguments of the sweep.py command in the README's Quick start."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    block = re.search(r"<!-- quick-start -->\n```\n(.*?)```", text, flags=re.DOTALL).group(1)
    (line,) = [line for line in block.splitlines() if "sweep.py" in line]
    words = shlex.split(line)
    return words[words.index("sweep.py") + 1:]


@pytest.mark.parametrize("scale", ["small", "paper"])
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: os.path.basename(path))
def test_every_recipe_defines_a_valid_sweep(results_env, capsys, recipe, scale):
    assert sweep.main(["--recipe", recipe, "--scale", scale, "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 2 and all("training.py" in line for line in lines)
    name = f"{os.path.splitext(os.path.basename(recipe))[0]}_{scale}"
    assert all(os.path.join(str(results_env), "results", "sweeps", name, "runs") in line for line in lines)


def test_the_quick_start_shows_the_edge(results_env, capsys):
    """The README's command at a small size (256 images, 400 steps): GD's lambda_max and SGD's
    Batch Sharpness end within 20 % of 2/eta, SGD's lambda_max below GD's."""
    argv = quick_start_command()
    assert argv[:2] == ["--recipe", "recipes/gd_vs_sgd.yaml"]
    argv[1] = os.path.join(ROOT, argv[1])
    assert sweep.main([*argv, "--batch", "256", "16", "--", "--num-data", "256", "--steps", "400",
                       "--measure-every", "25"]) == 0
    analysis = results_env / "results" / "sweeps" / "gd_vs_sgd_small" / "analysis"
    out = capsys.readouterr().out
    assert f"wrote {analysis / 'results_overlay.png'}" in out and f"wrote {analysis / 'sharpness_gap.png'}" in out
    table = pd.read_csv(analysis / "sharpness_gap.csv").set_index("batch")
    threshold = 2 / 0.4
    gd, sgd = table.loc[256], table.loc[16]
    assert gd["lambda_max"] == pytest.approx(threshold, rel=0.2)
    assert sgd["batch_sharpness"] == pytest.approx(threshold, rel=0.2)
    assert sgd["lambda_max"] < gd["lambda_max"]


@pytest.mark.parametrize("argv,fragment", [
    (["--scale", "small", "--name", "x", "--lr", "0.1", "0.2"], "--scale picks the size of a --recipe"),
    (["--recipe", "recipes/gd_vs_sgd.yaml", "--grid", "g.json"], "--recipe and --grid both define the grid"),
    (["--recipe", "recipes/none.yaml"], "cannot read the recipe recipes/none.yaml"),
    (["--lr", "0.1", "0.2"], "give the sweep a --name (or run a --recipe, which names it)"),
])
def test_recipe_mistakes_are_one_line(results_env, monkeypatch, capsys, argv, fragment):
    monkeypatch.chdir(ROOT)
    assert sweep.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err


def test_a_recipe_with_an_unknown_scale_or_analysis_is_refused(results_env, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("experiment: x\nanalysis: [training.py]\nscales:\n  small:\n    grid: {lr: [0.1, 0.2]}\n")
    assert sweep.main(["--recipe", str(recipe)]) == 2
    assert "the analysis runs sharpness_gap.py" in capsys.readouterr().err
    recipe.write_text("experiment: x\nscales:\n  small:\n    grid: {lr: [0.1, 0.2]}\n")
    assert sweep.main(["--recipe", str(recipe), "--scale", "paper"]) == 2
    assert f"{recipe} has no scale 'paper'; it has small" in capsys.readouterr().err
    recipe.write_text("experiment: x\nscales:\n  small:\n    grid: {lr: [0.1, 0.2]}\n    shared: {width: 8, quiet: true}\n")
    assert sweep.main(["--recipe", str(recipe), "--dry-run", "--lr", "0.3", "0.4", "--", "--steps", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [re.search(r"--lr (\S+)", line).group(1) for line in lines] == ["0.3", "0.4"]
    assert all("--width 8 --quiet --steps 2" in line for line in lines)
