"""The README's commands: every one in README.md and docs/*.md names flags its script has
(training.py and the analysis scripts parse theirs, sweep.py's grid and shared flags are
training.py's, a laptop sweep dry-runs, a benchmark's flags are among those it declares), and the
short tour and the laptop sweep of the Sweeps section run end to end at a tiny size. (The Quick
start runs in test_recipes.)"""

import glob
import os
import re
import shlex

import pytest

import compute_final_fullbs
import compute_final_gHg
import plot_results
import sharpness_gap
import sweep
import training
from utils import config, sweep_grid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
PARSERS = {
    "training.py": config.build_parser,
    "compute_final_fullbs.py": compute_final_fullbs.build_parser,
    "compute_final_gHg.py": compute_final_gHg.build_parser,
    "plot_results.py": plot_results.build_parser,
    "sharpness_gap.py": sharpness_gap.build_parser,
}
# Words that stand for a value the reader fills in, and what the parser gets instead.
PLACEHOLDERS = {"N": "1", "K": "2", "k": "2", "E": "1", "x": "0.1", "μ": "0.9", "σ": "0.1", "h": "0.01",
                "m": "64", "p": "8", "n": "64", "B": "8"}


def shell_commands(path: str) -> list[str]:
    """The command lines of the shell blocks of a markdown file (not ```python blocks), with
    continuation lines joined, and the inline commands that start with ``python``."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    commands = []
    for block in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE):
        language, body = block
        if language not in ("", "sh", "bash", "shell"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            if re.search(r"\b[\w/]+\.py\b", line):
                commands.append(line)
    # Inline commands in the prose: `python training.py --resume RUN_DIR`.
    commands += re.findall(r"`((?:\.venv/bin/)?python3? [\w/]+\.py[^`]*)`", text)
    return commands


def script_and_arguments(line: str) -> tuple[str, list[str]] | None:
    """The Python script a command line runs (``training.py``, ``benchmarks/bench_noise.py``)
    and its arguments up to the end of the line or a shell operator; None when it runs none."""
    words = shlex.split(line, comments=True)
    for i, word in enumerate(words):
        if word.endswith(".py") and not word.startswith("-"):
            arguments = []
            for argument in words[i + 1:]:
                if argument in ("&&", "||", ";", "|", ">", "2>"):
                    break
                arguments.append(PLACEHOLDERS.get(argument, argument))
            return word, arguments
    return None


# Shell lines that run one of the project's scripts (not pip, cd, git ...).
COMMANDS = [(os.path.relpath(path, ROOT), line) for path in DOCUMENTS for line in shell_commands(path)
            if script_and_arguments(line) is not None]


def test_the_readme_has_commands_to_check():
    assert sum(path == "README.md" for path, _ in COMMANDS) >= 10


@pytest.mark.parametrize("where, line", COMMANDS, ids=[f"{path}:{line[:60]}" for path, line in COMMANDS])
def test_a_documented_command_names_flags_its_script_has(where, line, results_env):
    script, arguments = script_and_arguments(line)
    if "..." in arguments:  # an elided command line: only what is written can be checked
        arguments = arguments[:arguments.index("...")]
    name = os.path.basename(script)
    if arguments == ["--help"]:
        arguments = []
    if script.startswith("benchmarks/"):
        with open(os.path.join(ROOT, script), encoding="utf-8") as f:
            declared = set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", f.read()))
        assert {a.split("=")[0] for a in arguments if a.startswith("--")} <= declared, f"{where}: {line}"
    elif name == "sweep.py":
        if arguments[:1] == ["status"]:
            sweep_grid.build_status_parser().parse_args(arguments[1:])
            return
        options, grid_tokens, shared = sweep_grid.parse_command_line(arguments)
        sweep_grid.parse_grid_tokens(grid_tokens)
        config.build_parser().parse_args(shared)
        if options.executor == "local" and not options.grid:  # a laptop sweep: every point's command is checked
            cut = arguments.index("--") if "--" in arguments else len(arguments)
            recipe = [os.path.join(ROOT, a) if a.startswith("recipes/") else a for a in arguments[:cut]]
            assert sweep.main([*recipe, "--dry-run", *arguments[cut:]]) == 0, f"{where}: {line}"
    elif name in PARSERS:
        PARSERS[name]().parse_args(arguments)
    else:
        assert os.path.exists(os.path.join(ROOT, script)), f"{where} runs {script}, which does not exist"



def section_commands(heading: str) -> list[str]:
    """The command lines of the shell blocks of the README's section ``heading``, in order."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = re.search(rf"^## {heading}\n(.*?)^## ", text, flags=re.DOTALL | re.MULTILINE).group(1)
    return [line for body in re.findall(r"^```\n(.*?)^```", section, flags=re.DOTALL | re.MULTILINE)
            for line in body.replace("\\\n", " ").splitlines() if ".py" in line]


# A sweep's runs at a tiny size: after its grid and shared flags (later flags replace earlier ones).
SWEEP_SMALL = ["--num-data", "64", "--steps", "2", "--measure-every", "1"]


def tiny_sweep(arguments: list[str]) -> list[str]:
    """A laptop sweep command cut to two grid points (the first value of every axis but the last,
    the first two of that) of two steps on 64 images."""
    cut = arguments.index("--") if "--" in arguments else len(arguments)
    _, grid_tokens, _ = sweep_grid.parse_command_line(arguments)
    grid = sweep_grid.parse_grid_tokens(grid_tokens)
    axes = list(grid)
    points = [[f"--{flag.replace('_', '-')}", *map(str, grid[flag][:2 if flag == axes[-1] else 1])] for flag in axes]
    kept, rest = [], list(grid_tokens)  # sweep.py's own options, in order: the grid tokens taken out
    for argument in arguments[:cut]:
        if rest and argument == rest[0]:
            rest.pop(0)
        else:
            kept.append(argument)
    return [*kept, *[word for point in points for word in point], "--", *arguments[cut + 1:], *SWEEP_SMALL]


# What makes each command of the tour small enough for a test (later flags replace earlier ones).
TOUR_SMALL = {
    "training.py": ["--num-data", "64", "--steps", "20", "--measure-every", "10", "--quiet"],
    "compute_final_fullbs.py": ["--quiet"],
    "compute_final_gHg.py": ["--batch-sizes", "8", "16", "--max-samples", "20", "--quiet"],
    "sharpness_gap.py": [],
    "plot_results.py": [],
}


def test_the_short_tour_runs(results_env, monkeypatch):
    """Every command of the README's tour, in order, on 64 images and 20 steps (the sweep: two
    points of two steps)."""
    mains = {"training.py": training.main, "sweep.py": sweep.main, "compute_final_fullbs.py": compute_final_fullbs.main,
             "compute_final_gHg.py": compute_final_gHg.main, "sharpness_gap.py": sharpness_gap.main,
             "plot_results.py": plot_results.main}
    monkeypatch.chdir(results_env)  # the tour's relative results/... paths are $RESULTS's
    lines = section_commands("A short tour")
    assert [script_and_arguments(line)[0] for line in lines][:3] == [
        "training.py", "compute_final_fullbs.py", "compute_final_gHg.py"]
    for line in lines:
        script, arguments = script_and_arguments(line)
        arguments = [os.path.join(ROOT, a) if a.startswith("examples/") else a for a in arguments]
        small = tiny_sweep(arguments) if script == "sweep.py" else arguments + TOUR_SMALL[script]
        assert mains[script](small) == 0, line


def test_the_laptop_sweep_runs(results_env, monkeypatch, capsys):
    """The Sweeps section's laptop commands, in order: the sweep (two points of two steps), its
    status table and the overlay of its runs."""
    monkeypatch.chdir(results_env)  # plot_results.py's results/sweeps/NAME is $RESULTS's
    lines = section_commands("Sweeps")[:3]
    (_, train), (_, status), (_, plot) = [script_and_arguments(line) for line in lines]
    assert "--jobs" in train and status[0] == "status" and "plot_results.py" in lines[2], lines
    assert sweep.main(tiny_sweep(train)) == 0
    assert sweep.main(status) == 0
    table = capsys.readouterr().out
    assert table.count("finished") >= 2, table
    assert plot_results.main(plot) == 0
    assert "results_overlay" in capsys.readouterr().out
