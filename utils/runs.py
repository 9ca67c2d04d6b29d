"""Run folders as inputs of the analysis scripts: selecting them, reading them, rebuilding them.

A run is read through its contract only: ``config.json`` (settings, format version),
``results.txt`` (columns by name) and ``checkpoints/step_<N>.pt``. Folder names are never
parsed, so runs keep working after they are moved or renamed. Every problem with an input is a
:class:`~utils.errors.UserError`, raised before anything is written.
"""

from __future__ import annotations

import dataclasses
import datetime
import glob
import hashlib
import math
import os
import sys
from dataclasses import dataclass

import torch

from utils import distributed, sharded
from utils.checkpoints import CHECKPOINT_DIR, list_checkpoints, load_checkpoint
from utils.config import RunConfig, results_root
from utils.cli import OneLineParser, run_cli
from utils.devices import check_device_name, float64_device, resolve_device
from utils.errors import UserError
from utils.launch import USER_LOOP, read_run_config, refuse_user_loop
from utils.resources import memory_for
from utils.results import ENDED, atomic_write_bytes, atomic_write_text, ended_last_row, read_json, read_results_table
from utils.training import Setup, build

CONFIG_FILE = "config.json"
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class Run:
    """One run folder: its path, its config.json record and the settings in it."""

    run_dir: str
    record: dict
    cfg: RunConfig

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.run_dir))


def load_run(run_dir: str) -> Run:
    """The run in ``run_dir``; a missing folder or an unreadable config.json is a UserError."""
    record = read_run_config(run_dir)
    return Run(run_dir, record, RunConfig.from_dict(record["config"]))


def find_run_dirs(root: str) -> list[str]:
    """Every folder under ``root`` (itself included) that holds a config.json, sorted."""
    found = []
    for folder, subfolders, files in os.walk(root):
        if CONFIG_FILE in files:
            found.append(folder)
            subfolders.clear()  # a run folder holds no runs
        else:
            subfolders[:] = [s for s in subfolders if s != CHECKPOINT_DIR]
    return sorted(found)


def _start_time(run: Run) -> tuple[float, float]:
    """Sort key for "newest": the recorded start time, then config.json's modification time."""
    try:
        started = datetime.datetime.fromisoformat(run.record["start_time"]).timestamp()
    except (KeyError, TypeError, ValueError):
        started = -math.inf
    return started, os.path.getmtime(os.path.join(run.run_dir, CONFIG_FILE))


def _matches(cfg: RunConfig, dataset, model, lr, batch) -> bool:
    return ((dataset is None or cfg.dataset == dataset) and (model is None or cfg.model == model)
            and (lr is None or math.isclose(cfg.lr, lr, rel_tol=1e-9))
            and (batch is None or cfg.batch == batch))


def _runs_under(folder: str) -> tuple[list[Run], int]:
    """The given folder as a run, or the runs below it, and how many run folders below it were
    skipped as damaged: one ``skipping`` line each on stderr and a count, so one broken run
    does not stop the analysis of a whole sweep."""
    if not os.path.isdir(folder):
        problem = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
        raise UserError(f"{folder} {problem}; pass the folder of an EOSS run")
    if os.path.isfile(os.path.join(folder, CONFIG_FILE)):
        return [load_run(folder)], 0
    runs = []
    run_dirs = find_run_dirs(folder)
    for run_dir in run_dirs:
        try:
            runs.append(load_run(run_dir))
        except UserError as exc:
            print(f"skipping {run_dir}: {exc}", file=sys.stderr)
    skipped = len(run_dirs) - len(runs)
    if skipped:
        print(f"skipped {skipped} of {len(run_dirs)} run folders under {folder}", file=sys.stderr)
    return runs, skipped


def select_runs(paths=(), *, latest: bool = False, dataset: str | None = None, model: str | None = None,
                lr: float | None = None, batch: int | None = None, pattern: str | None = None,
                root: str | None = None) -> list[Run]:
    """The runs an analysis works on, oldest first.

    ``paths`` are run folders, or folders holding runs (a sweep, ``$RESULTS/digits_mlp``);
    without paths every run under ``root`` (default ``$RESULTS``) is a candidate, or those whose
    folder matches the glob ``pattern`` relative to ``root``. The filters keep runs whose config
    has that data set, model, step size or batch size; ``latest`` keeps only the newest run.
    """
    root = root or results_root()
    if paths and pattern:
        raise UserError("give run folders or --glob, not both; --glob matches folders below $RESULTS")
    if paths:
        folders = paths
    elif pattern:
        folders = [p for p in sorted(glob.glob(os.path.join(root, pattern))) if os.path.isdir(p)]
    else:
        folders = [root] if os.path.isdir(root) else []
    candidates, skipped = [], 0
    for folder in folders:
        found, damaged = _runs_under(folder)
        candidates += found
        skipped += damaged
    runs = [run for run in candidates if _matches(run.cfg, dataset, model, lr, batch)]
    unique = {os.path.realpath(run.run_dir): run for run in runs}
    runs = sorted(unique.values(), key=_start_time)
    if not runs:
        where = ", ".join(paths) if paths else os.path.join(root, pattern or "")
        filters = {"--dataset": dataset, "--model": model, "--lr": lr, "--batch": batch}
        given = " ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in filters.items() if v is not None)
        if skipped and not candidates:
            raise UserError(f"no readable EOSS runs in {where}: {skipped} damaged run folders were skipped "
                            f"(listed above); repair or remove them, or train a run with training.py")
        damaged = f" ({skipped} damaged run folders were skipped, listed above)" if skipped else ""
        raise UserError(f"no EOSS runs found in {where}{' matching ' + given if given else ''}{damaged}; "
                        f"train one with training.py or check $RESULTS and the filters")
    return runs[-1:] if latest else runs


def add_selection_arguments(parser, *, default_latest: bool) -> None:
    """The shared run-selection flags: folders, --latest, --dataset/--model/--lr/--batch, --glob."""
    parser.add_argument("runs", nargs="*", metavar="RUN_DIR",
                        help="run folders, or folders holding runs (default: " +
                             ("the newest run under $RESULTS)" if default_latest else "every run under $RESULTS)"))
    g = parser.add_argument_group("which runs")
    g.add_argument("--latest", action="store_true", help="only the newest of the selected runs")
    g.add_argument("--dataset", default=None, help="only runs on this data set")
    g.add_argument("--model", default=None, help="only runs of this model")
    g.add_argument("--lr", type=float, default=None, help="only runs with this step size")
    g.add_argument("--batch", type=int, default=None, help="only runs with this batch size")
    g.add_argument("--glob", default=None, metavar="PATTERN",
                   help="only run folders matching this pattern below $RESULTS, such as 'digits_mlp/*_b8'")


def runs_from_args(args, *, default_latest: bool) -> list[Run]:
    """Apply the selection flags of :func:`add_selection_arguments`.

    With ``default_latest`` and no folder, filter or glob given, the newest run is taken.
    """
    nothing_chosen = not args.runs and args.glob is None and all(
        getattr(args, name) is None for name in ("dataset", "model", "lr", "batch"))
    latest = args.latest or (default_latest and nothing_chosen)
    return select_runs(args.runs, latest=latest, dataset=args.dataset, model=args.model, lr=args.lr,
                       batch=args.batch, pattern=args.glob)


def read_run_results(run_dir: str):
    """results.txt as a DataFrame (:meth:`~utils.results.ResultsTable.frame`), after checking
    that every row is complete and, for a run that ended, that the rows reach its end.

    A row cut short by a hard kill (no final newline, or too few fields) is a UserError here,
    not a row of NaNs: ``training.py --resume`` drops it and continues the run. So is a file
    cut at a line boundary (or left with its header only) whose summary.json says the run
    ended: ``training.py --resume`` recomputes the rows it lost.
    """
    path = os.path.join(run_dir, "results.txt")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir} has no results.txt; pass the folder of a run that training.py has started")
    try:
        table = read_results_table(path)
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror or exc}); check the permissions of the run folder")
    if table.cut:
        raise UserError(f"{path} ends in a cut-off row (the run was killed while writing); "
                        f"continue it with training.py --resume {run_dir}, which drops that row")
    frame = table.frame()
    check_rows_reach_the_end(run_dir, int(frame["step"].iloc[-1]) if len(frame) else None)
    return frame


def check_rows_reach_the_end(run_dir: str, last_step: int | None) -> None:
    """A UserError when summary.json says the run ended but results.txt's rows stop short of
    its last step (the rule by which ``training.py --resume`` completes such a run). A user's
    own loop writes only some steps' rows, so its folders are not checked."""
    summary = read_optional_json(run_dir, "summary.json", fix=SUMMARY_FIX)
    final_row = ended_last_row(summary, os.path.join(run_dir, "summary.json"))
    if final_row is None or (last_step is not None and last_step >= final_row):
        return
    if (read_optional_json(run_dir, CONFIG_FILE) or {}).get("written_by") == USER_LOOP:
        return
    path = os.path.join(run_dir, "results.txt")
    reach = "has no rows" if last_step is None else f"stops at step {last_step}"
    raise UserError(f"{path} {reach} although the run {summary['status'].replace('stopped_at_loss', 'stopped at its loss')} (summary.json: its last row is step "
                    f"{final_row}); rows were lost from the file: complete it with training.py --resume {run_dir}, "
                    f"which recomputes them")


SUMMARY_FIX = "delete it, then training.py --resume on the run rewrites it"


def read_optional_json(run_dir: str, name: str, fix: str = "delete it and recompute it") -> dict | None:
    """A json file of the run folder, or None when absent; unreadable JSON (bytes that are not
    UTF-8 included) or JSON that is not an object is a UserError ending in ``fix``."""
    path = os.path.join(run_dir, name)
    if not os.path.isfile(path):
        return None
    try:
        record = read_json(path)
    except (OSError, ValueError):
        raise UserError(f"{path} is not valid JSON; {fix}")
    if not isinstance(record, dict):
        raise UserError(f"{path} does not hold a JSON object; {fix}")
    return record


def checkpoint_list(run: Run) -> list[tuple[int, str]]:
    """(step, path) of the run's checkpoints, oldest first; none at all is a UserError, and so
    is a folder written by a user's own loop (nothing there can be rebuilt)."""
    refuse_user_loop(run.run_dir, run.record, "rebuilt")
    available = list_checkpoints(run.run_dir)
    if not available:
        raise UserError(f"{run.run_dir} has no checkpoints (checkpoints/step_<N>.pt); "
                        f"measurements need a saved state, so rerun training without deleting them")
    return available


def rebuild(run: Run, *, cpu: bool = False, device: str | None = None, dtype: torch.dtype = torch.float32,
            allow_changed: frozenset = frozenset()) -> Setup:
    """Data, model, loss and optimiser of ``run`` from its config.json (model weights as initialised).

    Runs on ``device`` (None: CUDA when available unless ``cpu``), whatever device the run was
    trained on, with TF32 off; float64 asked of mps runs on the CPU, with a note. The
    run's trackers are not needed (nor their packages) to analyse it, and data sets are never
    downloaded (a missing one is a UserError). ``dtype`` is the
    precision of the model and of the inputs and float targets (checkpoints load into it).
    A folder written by a user's own loop is refused; ``allow_changed`` accepts changed user
    files (:func:`utils.training.check_user_files`).
    """
    refuse_user_loop(run.run_dir, run.record, "rebuilt")
    check_device_name(device)
    if cpu and device not in (None, "cpu"):
        raise UserError(f"--cpu and --device {device} contradict each other; give only one of them")
    chosen = resolve_device(device, cpu)
    if dtype == torch.float64 and float64_device(chosen) != chosen:
        print(f"note: {chosen} has no float64; measuring {run.name} on the CPU (--dtype float32 measures on {chosen})",
              file=sys.stderr)
        chosen = float64_device(chosen)
    cfg = dataclasses.replace(run.cfg, cpu=False, device=str(chosen), tf32=False, quiet=True, wandb=False,
                              tensorboard=False, download=False, final=False)
    setup = build(cfg, allow_changed)
    setup.model.to(dtype)

    def cast(t):
        if sharded.is_sharded(t):
            return sharded.Rows(cast(t.local), t.positions, t.total)
        return t.to(dtype) if t.is_floating_point() else t

    data = setup.data
    setup.data = dataclasses.replace(data, X_train=cast(data.X_train), Y_train=cast(data.Y_train),
                                     X_test=cast(data.X_test), Y_test=cast(data.Y_test))
    return setup


def load_weights(setup: Setup, checkpoint: str) -> int:
    """Load a checkpoint's model parameters into ``setup.model``; return the checkpoint's step."""
    state = load_checkpoint(checkpoint, map_location=setup.device)
    try:
        setup.model.load_state_dict(state["model"])
    except RuntimeError:
        raise UserError(f"checkpoint {checkpoint} does not fit the model of its config.json; the run folder is damaged")
    return int(state["step"])


def make_output_folder(folder: str) -> str:
    """Create ``folder`` if needed; an unwritable place is a UserError."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the output folder {folder} ({exc.strerror}); pass a writable --out DIR")
    return folder


def common_folder(runs: list[Run]) -> str:
    """The deepest folder holding all the runs (the run folder itself for one run)."""
    if len(runs) == 1:
        return runs[0].run_dir
    return os.path.commonpath([os.path.abspath(run.run_dir) for run in runs])


def unwritable(path: str, exc: OSError) -> UserError:
    """The one-line error for an output file that cannot be written."""
    return UserError(f"cannot write {path} ({exc.strerror or exc}); pass a writable --out DIR")


def analysis_folder(runs: list[Run], out: str | None) -> str:
    """Where an analysis of ``runs`` as a group writes (created by the functions that write
    into it, so a failed analysis leaves no empty folder): ``out`` when given, else the run folder
    of a single run, else the folder that directly holds every run (a ``<dataset>_<model>``
    folder, a sweep's ``runs/``). Runs that meet only higher up (``$RESULTS``, ``$HOME``, ``/``)
    need ``out``: a UserError.
    """
    if out is not None:
        return out
    if len(runs) == 1:
        return runs[0].run_dir
    base = common_folder(runs)
    if any(os.path.dirname(os.path.abspath(run.run_dir)) != base for run in runs):
        raise UserError(f"the selected runs are not all in one folder of runs (they meet only at {base}); "
                        f"pass --out DIR for the outputs")
    return base


def selection_stem(stem: str, runs: list[Run], out: str | None = None) -> str:
    """``stem`` for one run or into a folder the user named (``out``); else, for several runs,
    ``stem_<hash>``: the first 8 hex digits of the SHA-1 of the runs' paths relative to their
    common folder (sorted, one per line), so different selections written next to the runs
    never overwrite each other's files and the same selection reuses its own."""
    if len(runs) == 1 or out is not None:
        return stem
    base = common_folder(runs)
    names = "\n".join(sorted(os.path.relpath(os.path.abspath(run.run_dir), base) for run in runs))
    return f"{stem}_{hashlib.sha1(names.encode()).hexdigest()[:8]}"


def write_text_files(files: dict[str, str | bytes]) -> list[str]:
    """Write every {path: text} atomically (bytes, such as a figure, as they are), creating
    folders as needed; return the paths written.

    An unwritable place is a UserError.
    """
    for path in files:
        make_output_folder(os.path.dirname(os.path.abspath(path)))
    for path, text in files.items():
        try:
            if isinstance(text, bytes):
                atomic_write_bytes(path, text)
            else:
                atomic_write_text(path, text)
        except OSError as exc:
            raise unwritable(path, exc)
    return list(files)


def output_folders(runs: list[Run], out: str | None) -> list[str]:
    """Where each run's outputs go: its own folder, or ``out`` (one run) or ``out/<run name>`` (several)."""
    if out is None:
        return [run.run_dir for run in runs]
    if len(runs) == 1:
        return [out]
    base = common_folder(runs)
    return [os.path.join(out, os.path.relpath(os.path.abspath(run.run_dir), base)) for run in runs]


def build_analysis_parser(prog: str, description: str, *, default_latest: bool, rebuilds: bool):
    """An analysis script's command line: run selection, --out, --quiet and, for scripts that
    rebuild runs, --cpu; mistakes are one UserError line."""
    parser = OneLineParser(prog=prog, description=description)
    add_selection_arguments(parser, default_latest=default_latest)
    g = parser.add_argument_group("output")
    g.add_argument("--out", default=None, metavar="DIR", help="write into this folder (created if needed); default: the run folder, or for several runs "
                        "the folder that directly holds them all (a <dataset>_<model> folder or a sweep's runs/)")
    if rebuilds:
        g.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: CUDA when available, else the CPU)")
        g.add_argument("--cpu", action="store_true", help="the same as --device cpu")
        g.add_argument("--allow-changed-model", action="store_true", help="measure even though the run's --model file changed")
        g.add_argument("--allow-changed-data", action="store_true", help="measure even though the run's --dataset file changed")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def allowed_changes(args) -> frozenset:
    """The user files whose change an analysis accepts (--allow-changed-model, --allow-changed-data)."""
    return frozenset(kind for kind in ("model", "data") if getattr(args, f"allow_changed_{kind}", False))


def newest_state(run: Run) -> tuple[str, dict]:
    """The checkpoint the end-of-run analyses measure, the run's newest, and what it is:
    {"final": whether it is the run's final state, "run_status": summary.json's status or
    "unfinished" when there is none (still training, or killed)}.

    A results.txt cut by a kill is a UserError (``training.py --resume`` repairs it): the
    folder is not a run that ended, and its measurement would be taken for final.
    """
    read_run_results(run.run_dir)
    step, path = checkpoint_list(run)[-1]
    summary = read_optional_json(run.run_dir, "summary.json", fix=SUMMARY_FIX) or {}
    status = summary.get("status", "unfinished")
    final = status in ENDED and summary.get("final_step") == step
    return path, {"final": final, "run_status": status}


def not_final_note(run: Run, step: int, state: dict) -> str | None:
    """The line that says a measurement is not of the run's final state, or None."""
    if state["final"]:
        return None
    why = "no summary.json: still training, or killed" if state["run_status"] == "unfinished" else state["run_status"]
    return (f"note: {run.run_dir} has not finished ({why}); measured its newest checkpoint, step {step}, "
            f"which is not the run's final state")


ANALYSIS_TOO_BIG = ("take full-batch Hessian products in smaller chunks with --hvp-chunk, or measure where there is "
                    "more memory (--cpu when the GPU's is too small)")


def measure_newest_states(prog: str, argv, build_parser, check_args, measure) -> int:
    """``main()`` of an end-of-run analysis (``compute_final_*.py``).

    Parse and check the command line, select the runs (the newest by default) and find each
    one's newest state (:func:`newest_state`), so every problem with an input is found before
    anything is measured. Then ``measure(run, checkpoint, state, args)`` measures each run and
    returns (step measured, {file name: text}, report lines). The files go into each run's
    output folder (:func:`output_folders`), all written before anything is printed; then the
    report lines, a note for each run not measured at its final state, and the paths written.
    Memory that runs out while a run is measured is one line naming the run and the fix.
    """
    argv = sys.argv[1:] if argv is None else list(argv)

    def work():
        args = build_parser().parse_args(argv)
        check_args(args)
        runs = runs_from_args(args, default_latest=True)
        states = [newest_state(run) for run in runs]
        outputs, report = {}, []
        for run, folder, (path, state) in zip(runs, output_folders(runs, args.out), states):
            with memory_for(f"measuring {run.run_dir} at checkpoint {os.path.basename(path)}", ANALYSIS_TOO_BIG):
                step, files, lines = measure(run, path, state, args)
            outputs.update({os.path.join(folder, name): text for name, text in files.items()})
            report += lines
            report += [note] if (note := not_final_note(run, step, state)) else []
        if not distributed.current().is_main:  # under torchrun rank 0 writes and reports
            return 0
        written = write_text_files(outputs)
        for line in report + [f"wrote {path}" for path in written]:
            print(line)
        return 0

    try:
        return run_cli(work, prog=prog)
    finally:
        distributed.close()
