"""Defining a sweep: its command line, the grid of training flags (from the command line or a
file) and the points of the grid, each a list of ``training.py`` flags checked before anything
runs. :mod:`utils.sweep` keeps the sweep's folder and runs its points.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re

from utils.cli import OneLineParser
from utils.errors import UserError
from utils.results import read_text

SWEEP_VERSION = 1
# training.py flags that the sweep itself sets: each point's folder is its own.
RESERVED_FLAGS = ("run_dir", "resume", "resume_step", "cont_run", "cont_step")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_TRUE, _FALSE = ("true", "on", "yes", "1"), ("false", "off", "no", "0")


def _training_actions() -> dict:
    """training.py's options by long flag name without dashes (``init-seed``)."""
    from utils.config import build_parser

    actions = {}
    for action in build_parser()._actions:
        for option in action.option_strings:
            if option.startswith("--") and action.dest != "help":
                actions[option[2:]] = action
    return actions


def _flag_action(key: str, actions: dict, where: str):
    flag = key.lstrip("-").replace("_", "-")
    action = actions.get(flag)
    if action is None:
        raise UserError(f"{where}: --{flag} is not a training.py flag; see python training.py --help")
    if action.dest in RESERVED_FLAGS:
        raise UserError(f"{where}: --{flag} is set by the sweep for every run; drop it")
    return flag, action


def _normalise_value(flag: str, action, value, where: str):
    """One grid value as JSON data: a string, a bool (switch flags) or a list of strings (--classes)."""
    if action.nargs == 0:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise UserError(f"{where}: --{flag} is a switch; its values must be true or false, got {value!r}")
    if isinstance(value, bool) or value is None or isinstance(value, dict):
        raise UserError(f"{where}: --{flag} needs values such as numbers or names, got {json.dumps(value)}")
    if action.nargs == "+":
        parts = value if isinstance(value, list) else str(value).split(",")
        if not parts or any(isinstance(p, (list, dict, bool)) or p is None for p in parts):
            raise UserError(f"{where}: --{flag} takes a list of values per run, such as 1,9 (or [1, 9] in a grid file)")
        return [str(p) for p in parts]
    if isinstance(value, list):
        raise UserError(f"{where}: --{flag} takes one value per run, got the list {json.dumps(value)}")
    return str(value)


def parse_grid_tokens(tokens: list[str]) -> dict:
    """``--lr 0.01 0.02 --batch 8 16`` -> {"lr": ["0.01", "0.02"], "batch": ["8", "16"]}.

    A token starting with ``--`` opens a flag (``--flag=value`` works too); the tokens up to the
    next flag are its values. Switch flags take true/false, ``--classes`` takes comma lists.
    """
    actions = _training_actions()
    grid: dict[str, list] = {}
    flag = action = None
    for token in tokens:
        value = None
        if token.startswith("--"):
            name, has_value, value = token.partition("=")
            flag, action = _flag_action(name, actions, "grid")
            if flag in grid:
                raise UserError(f"grid: --{flag} is given twice; list all its values after one --{flag}")
            grid[flag] = []
            if not has_value:
                continue
        elif flag is None:
            raise UserError(f"grid: {token!r} comes before any flag; write grid flags as --flag value1 value2 ...")
        grid[flag].append(_normalise_value(flag, action, token if value is None else value, "grid"))
    for flag, values in grid.items():
        if not values:
            raise UserError(f"grid: --{flag} has no values; give them after it (--{flag} v1 v2) "
                            f"or put flags shared by every run after --")
    return grid


def load_grid_file(path: str) -> dict:
    """A grid file: a JSON (or, with PyYAML, YAML) mapping of flag -> list of values."""
    try:
        text = read_text(path, fix='--grid takes a JSON or YAML text file such as {"lr": [0.01, 0.02], "batch": [8, 16]}')
    except OSError as exc:
        raise UserError(f"cannot read the grid file {path} ({exc.strerror}); check the --grid path")
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise UserError(f"reading {path} needs PyYAML (pip install pyyaml); or write the grid as JSON")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UserError(f"{path} is not valid YAML ({str(exc).splitlines()[0]}); fix the file")
    else:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise UserError(f"{path} is not valid JSON ({exc}); write it like {{\"lr\": [0.01, 0.02], \"batch\": [8, 16]}}")
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of flag to values, like {{\"lr\": [0.01, 0.02], \"batch\": [8, 16]}}")
    return grid_from_mapping(data, path)


def grid_from_mapping(data: dict, path: str) -> dict:
    """A grid file's (or recipe's) mapping of flag -> value or list of values, checked and normalised."""
    actions = _training_actions()
    grid = {}
    for key, values in data.items():
        flag, action = _flag_action(str(key), actions, path)
        if flag in grid:
            raise UserError(f"{path}: --{flag} is given twice; keep one entry")
        if not isinstance(values, list) or (action.nargs == "+" and values and not isinstance(values[0], list)):
            values = [values]  # one value: a scalar, or a single list such as "classes": [1, 9]
        if not values:
            raise UserError(f"{path}: --{flag} has no values; give at least one")
        grid[flag] = [_normalise_value(flag, action, v, path) for v in values]
    return grid


def merge_grids(*grids: dict) -> dict:
    merged = {}
    for grid in grids:
        for flag, values in grid.items():
            if flag in merged:
                raise UserError(f"--{flag} is in both the command-line grid and the grid file; keep it in one place")
            merged[flag] = values
    return merged


def _value_argv(flag: str, value) -> list[str]:
    if isinstance(value, bool):
        return [f"--{flag}"] if value else []
    if isinstance(value, list):
        return [f"--{flag}", *value]
    return [f"--{flag}", value]


def _value_label(flag: str, value) -> str:
    if isinstance(value, bool):
        text = f"{flag}-{'on' if value else 'off'}"
    elif isinstance(value, list):
        text = flag + "-".join(value)
    else:
        text = flag + value
    return re.sub(r"[^A-Za-z0-9.+-]", "-", text)


def grid_points(grid: dict) -> list[dict]:
    """The Cartesian product, first flag varying slowest: [{"name", "settings", "argv"}]."""
    flags = list(grid)
    points = []
    for combination in itertools.product(*(grid[f] for f in flags)):
        settings = dict(zip(flags, combination))
        points.append({"name": "_".join(_value_label(f, v) for f, v in settings.items()),
                       "settings": settings,
                       "argv": [token for f, v in settings.items() for token in _value_argv(f, v)]})
    return points


def shared_settings(shared: list[str]) -> dict:
    """The explicit settings of the shared flags (what they change, independent of their order)."""
    from utils.config import explicit_settings

    try:
        return explicit_settings(shared)
    except UserError as exc:
        raise UserError(f"flags after --: {exc}")


def define_sweep(name: str, grid: dict, shared: list[str], command_line: list[str] | None = None) -> dict:
    """Check the grid and every point's training flags; return the sweep definition (grid.json)."""
    from utils.config import build_parser, check_cadences_have_measurements, config_from_args, validate

    if not _NAME.match(name or ""):
        raise UserError(f"--name {name!r} must be a folder name of letters, digits, '.', '_' and '-'")
    if not grid:
        raise UserError("the grid is empty; give flags with several values (--lr 0.01 0.02) or --grid FILE")
    explicit = shared_settings(shared)
    reserved = sorted(set(explicit) & set(RESERVED_FLAGS))
    if reserved:
        raise UserError(f"flags after --: --{reserved[0].replace('_', '-')} is set by the sweep for every run; drop it")
    actions = _training_actions()
    for flag in grid:
        if actions[flag].dest in explicit:
            raise UserError(f"--{flag} is both a grid flag and a flag after --; keep it in one place")
    points = grid_points(grid)
    names = [p["name"] for p in points]
    clash = next((n for n in names if names.count(n) > 1), None)
    if clash:
        raise UserError(f"two grid points get the folder name {clash}; use values that differ in letters, digits, '.', '+' or '-'")
    seen = {}
    for point in points:
        try:
            args = build_parser().parse_args([*point["argv"], *shared])
            cfg = config_from_args(args)
            validate(cfg)
            check_cadences_have_measurements(cfg)
        except UserError as exc:
            raise UserError(f"grid point {point['name']}: {exc}")
        key = json.dumps(cfg.to_dict(), sort_keys=True)
        if key in seen:
            raise UserError(f"grid points {seen[key]} and {point['name']} are the same run; remove the repeated value")
        seen[key] = point["name"]
    return {"version": SWEEP_VERSION, "name": name, "grid": grid, "shared": list(shared),
            "points": points, "command_line": command_line}


def build_parser() -> argparse.ArgumentParser:
    """sweep.py's own flags; every other flag before ``--`` is a grid flag of training.py."""
    p = OneLineParser(prog="sweep.py", allow_abbrev=False,
                       usage="sweep.py --name NAME [--lr V1 V2 ...] [--grid FILE] [options] [-- TRAINING FLAGS]\n"
                             "       sweep.py status (--name NAME | SWEEP_DIR)",
                       description="Run a grid of training.py runs: any training flag followed by several values "
                                   "is a grid axis; the flags after -- go to every run.")
    p.add_argument("--name", default=None, help="the sweep's name: its folder is $RESULTS/sweeps/NAME "
                                                "(required, except with --recipe: <recipe>_<scale>)")
    p.add_argument("--grid", metavar="FILE", help="grid file: JSON (or YAML with PyYAML) mapping flag to values")
    p.add_argument("--recipe", metavar="FILE", help="an experiment of the paper (recipes/*.yaml): its grid and shared "
                                                   "flags; grid flags given here replace its values, flags after -- add to them")
    p.add_argument("--scale", choices=("small", "paper"), default=None,
                   help="with --recipe: small (CPU-sized, on digits; the default) or paper (the paper's settings)")
    p.add_argument("--executor", choices=("local", "slurm"), default="local",
                   help="local: processes on this machine; slurm: a job array through submitit")
    p.add_argument("--dry-run", action="store_true", help="print the training.py command of every run and stop")
    g = p.add_argument_group("local executor")
    g.add_argument("--jobs", type=int, default=1, metavar="J", help="runs at a time; CPU threads are split evenly among them unless OMP_NUM_THREADS is set")
    g = p.add_argument_group("slurm executor")
    g.add_argument("--partition", metavar="NAME", help="SLURM partition")
    g.add_argument("--time-min", type=int, default=240, metavar="MINUTES", help="time limit per job in minutes (a job that hits it "
                                                             "is requeued and resumes from its last checkpoint)")
    g.add_argument("--gpus-per-run", type=int, default=1, metavar="N", help="GPUs per run; above 1, one torchrun launch across them (one node)")
    g.add_argument("--cpus-per-run", type=int, default=4, metavar="N", help="CPU cores per run (its torch threads)")
    g.add_argument("--mem-gb", type=float, default=None, metavar="GB", help="memory per run in GB (default: the partition's)")
    g.add_argument("--array-parallelism", type=int, default=None, metavar="N", help="at most this many runs of the array at once")
    g.add_argument("--wait", action="store_true", help="wait for the jobs to end and print the status table")
    return p


def build_status_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="sweep.py status", allow_abbrev=False,
                       description="Show each run's status and progress and rewrite sweep.json "
                                   "(where the sweep folder is writable).")
    p.add_argument("sweep_dir", nargs="?", default=None, help="the sweep folder")
    p.add_argument("--name", default=None, help="the sweep's name (its folder is $RESULTS/sweeps/NAME)")
    return p


SLURM_ONLY = ("partition", "time_min", "gpus_per_run", "cpus_per_run", "mem_gb", "array_parallelism", "wait")


def parse_command_line(argv: list[str]) -> tuple[argparse.Namespace, list[str], list[str]]:
    """Split ``argv`` into sweep.py's options, the grid tokens and the flags after ``--``."""
    own = build_parser()
    if "--" in argv:
        cut = argv.index("--")
        before, shared = argv[:cut], argv[cut + 1:]
    else:
        before, shared = argv, []
    options = {opt: action for action in own._actions for opt in action.option_strings}
    own_tokens, grid_tokens, given = [], [], []
    i = 0
    while i < len(before):
        token = before[i]
        action = options.get(token.split("=", 1)[0])
        if action is None:
            grid_tokens.append(token)
            i += 1
            continue
        takes = 0 if action.nargs == 0 or "=" in token else 1
        own_tokens.extend(before[i:i + 1 + takes])
        given.append(action.dest)
        i += 1 + takes
    args = own.parse_args(own_tokens)
    if args.recipe is None and args.name is None:
        raise UserError("give the sweep a --name (or run a --recipe, which names it)")
    if args.scale is not None and args.recipe is None:
        raise UserError("--scale picks the size of a --recipe; add --recipe FILE or drop --scale")
    if args.recipe is not None and args.grid is not None:
        raise UserError("--recipe and --grid both define the grid; give one of them")
    if args.jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {args.jobs}")
    # Flags of the other executor would be silently ignored; defaults do not count, only what was typed.
    if args.executor == "local":
        slurm_only = [name for name in given if name in SLURM_ONLY]
        if slurm_only:
            raise UserError(f"--{slurm_only[0].replace('_', '-')} applies to --executor slurm only; drop it or add --executor slurm")
    elif "jobs" in given:
        raise UserError("--jobs applies to --executor local only; with --executor slurm use --array-parallelism")
    return args, grid_tokens, shared
