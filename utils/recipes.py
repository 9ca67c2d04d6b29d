"""Recipes: one YAML file per experiment of the paper, run by ``sweep.py --recipe FILE --scale S``.

A recipe holds, for each scale (``paper``: the paper's settings, for a cluster; ``small``: a
CPU-sized version on the offline ``digits`` data that shows the same result in minutes), the
grid and the training flags shared by every run, both as mappings of ``training.py`` flag to
value(s), and says what the runs should show::

    experiment: GD and SGD at the edge
    paper: what the paper shows, and which settings here come from it
    expect: what the figures of the runs show
    analysis: [sharpness_gap.py --tail 0.5, plot_results.py]
    scales:
      small:
        grid: {batch: [1497, 64, 16]}
        shared: {dataset: digits, lr: 0.4, steps: 1000, lambdamax: true, batch-sharpness: true}
      paper:
        grid: ...
        shared: ...

The sweep is named ``<file stem>_<scale>`` unless ``--name`` says otherwise; grid flags on the
command line replace the recipe's values of that flag, and flags after ``--`` are added to (or
override) its shared flags. Once every run of a local sweep has ended, ``sweep.py`` runs the
``analysis`` commands on the sweep folder, writing into its ``analysis/`` folder.
"""

from __future__ import annotations

import os
import shlex

from utils.errors import UserError
from utils.results import read_text

SCALES = ("small", "paper")
# The scripts a recipe's analysis may run; each takes run folders and --out.
ANALYSIS_SCRIPTS = ("sharpness_gap.py", "plot_results.py", "compute_final_gHg.py", "compute_final_fullbs.py")
_KEYS = {"experiment", "paper", "expect", "analysis", "scales"}
RECIPES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")


def load_recipe(path: str) -> dict:
    """The recipe in the YAML file ``path``, its top-level keys checked; a UserError names any problem."""
    try:
        import yaml
    except ImportError:
        raise UserError("recipes are YAML files: pip install pyyaml (it is in requirements.txt)")
    try:
        text = read_text(path, fix="--recipe takes a YAML file such as recipes/gd_vs_sgd.yaml")
    except OSError as exc:
        raise UserError(f"cannot read the recipe {path} ({exc.strerror}); see the files in recipes/")
    try:
        recipe = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML ({str(exc).splitlines()[0]}); fix the file")
    if not isinstance(recipe, dict) or not isinstance(recipe.get("scales"), dict):
        raise UserError(f"{path} is not a recipe: it needs a mapping with 'scales' (see recipes/)")
    unknown = sorted(set(recipe) - _KEYS)
    if unknown:
        raise UserError(f"{path} has unknown keys {', '.join(unknown)}; a recipe has {', '.join(sorted(_KEYS))}")
    analysis_commands(recipe, path, "SWEEP")  # a mistake there must stop the sweep before it trains
    return recipe


def analysis_commands(recipe: dict, path: str, sweep_dir: str) -> list[list[str]]:
    """The recipe's analysis as argument lists ``[script, sweep_dir, *flags, --out sweep_dir/analysis]``."""
    commands = recipe.get("analysis") or []
    if not isinstance(commands, list) or not all(isinstance(c, str) and c.split() for c in commands):
        raise UserError(f"{path}: 'analysis' must be a list of commands such as 'sharpness_gap.py --tail 0.5'")
    parsed = []
    for command in commands:
        script, *flags = shlex.split(command)
        if script not in ANALYSIS_SCRIPTS:
            raise UserError(f"{path}: the analysis runs {', '.join(ANALYSIS_SCRIPTS)}, not {script}")
        parsed.append([script, sweep_dir, *flags, "--out", os.path.join(sweep_dir, "analysis")])
    return parsed


def recipe_scale(recipe: dict, path: str, scale: str) -> tuple[dict, dict]:
    """The (grid, shared) mappings of flag to value(s) of ``scale`` in the recipe."""
    scales = recipe["scales"]
    if scale not in scales:
        raise UserError(f"{path} has no scale {scale!r}; it has {', '.join(scales)}")
    entry = scales[scale]
    if not isinstance(entry, dict) or not isinstance(entry.get("grid"), dict) or not isinstance(entry.get("shared", {}), dict):
        raise UserError(f"{path}: scale {scale} needs 'grid' and 'shared' mappings of training flag to value(s)")
    return entry["grid"], entry.get("shared") or {}


def shared_flags(shared: dict) -> list[str]:
    """A recipe's shared mapping as training.py flags: ``true`` switches on, ``false`` leaves out,
    a list gives several values to one flag (``classes: [1, 9]``)."""
    argv = []
    for key, value in shared.items():
        flag = "--" + str(key).lstrip("-").replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, list):
            argv += [flag, *(str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    return argv


def default_sweep_name(path: str, scale: str) -> str:
    return f"{os.path.splitext(os.path.basename(path))[0]}_{scale}"
