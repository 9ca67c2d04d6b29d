"""Runs in their folders: start a run, resume it, fork it; config.json, results.txt and summary.json.

:func:`run` claims a new run folder (:mod:`utils.run_lock`), writes ``config.json`` (every
setting resolved, and what was derived from them) and trains it with
:func:`utils.training.train_loop`; :func:`resume` continues a folder from the newest
checkpoint that its ``results.txt`` reaches, recomputing any rows a cut file lost; :func:`fork`
starts a new folder from another run's checkpoint with changed settings. Signals, a full disk
and too little memory end a run with its folder resumable and one line for the user.

Starting, resuming and forking share the writing of config.json, the checks of a stored run and
the handling of signals and faults, which is why they stay in one module of about 600 lines.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import shutil
import signal
import subprocess
import sys

import torch

from utils import distributed, run_lock, sharded
from utils.batch_forms import batch_route
from utils.checkpoints import list_checkpoints, load_checkpoint
from utils.cli import SignalCatcher
from utils.config import CONFIG_VERSION, RunConfig, check_cadences_have_measurements, results_root
from utils.errors import UserError
from utils.hvp import measurement_hvp_mode
from utils.models import count_parameters
from utils.monitor import Monitor, closed_form_measurements, partition_draw_measurements
from utils.resources import OutOfSpace
from utils.results import (BASE_COLUMNS, TIME_COLUMN, ResultsWriter, atomic_write_json, atomic_write_text,
                           ended_last_row, make_run_folder, read_json, read_results_table, read_versioned_json)
from utils.trackers import open_trackers
from utils.training import (EXIT_CODES, Setup, build, default_checkpoint_every, full_loss_schedule, pick_device,
                            restore, row_schedule, train_loop)
from utils.user_files import data_label, model_label


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def config_record(setup: Setup, measurement_plan: dict, command_line: list[str] | None) -> dict:
    """The contents of config.json: every setting resolved, plus what the run was built from."""
    cfg, data = setup.cfg, setup.data
    return {
        "version": CONFIG_VERSION,
        "config": cfg.to_dict(),
        "resolved": {
            "total_steps": setup.total_steps,
            "steps_per_epoch": setup.steps_per_epoch,
            "num_train": int(data.X_train.shape[0]),
            "num_test": int(data.X_test.shape[0]),
            "input_shape": list(data.input_shape),
            "output_dim": data.output_dim,
            "num_params": count_parameters(setup.model),
            "checkpoint_every": cfg.checkpoint_every or default_checkpoint_every(setup.total_steps),
            "schedule": {"full_loss": full_loss_schedule(cfg, setup.total_steps), **measurement_plan},
            **measurement_routes(cfg, setup.model, setup.loss_fn, data.X_train, data.Y_train, setup.device),
        },
        "device": str(setup.device),
        "launch": {"world_size": setup.world.size, "backend": setup.world.backend},
        **provenance(command_line),
    }


def measurement_routes(cfg, model, loss_fn, X, Y, device) -> dict:
    """The part of config.json's ``resolved`` that says how the measurements are computed: the
    BatchNorm mode, the Hessian products' mode, the same-batch route (``sharded`` for batches
    whose parts are summed over ranks), the measurements computed exactly and those drawn as
    partitions. Under ``torchrun`` every rank calls it (the closed forms' check is collective)."""
    return {"measurement_mode": "train",
            **product_routes(cfg, model, loss_fn, X, Y, device),
            "closed_forms": closed_form_measurements(cfg, model, loss_fn, X, Y),
            "partition_draws": partition_draw_measurements(cfg, X)}


def product_routes(cfg, model, loss_fn, X, Y, device) -> dict:
    """``hvp_mode`` and ``batch_route`` of :func:`measurement_routes`: how the Hessian products
    and the same-batch terms are computed."""
    route = "sharded" if sharded.is_sharded(X) else batch_route(model, loss_fn, X, Y, device=device,
                                                                 exact=cfg.exact_measurements, batch_size=cfg.batch)
    return {"hvp_mode": measurement_hvp_mode(model, device, exact=cfg.exact_measurements), "batch_route": route}


def provenance(command_line: list[str] | None) -> dict:
    """Versions, commit, start time and command line of a run, for its config.json."""
    import numpy
    import torchvision

    return {"versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "torchvision": torchvision.__version__, "numpy": numpy.__version__},
            "git_commit": _git_commit(),
            "start_time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command_line": command_line}


class _NoWriter:
    """The results writer of ranks other than 0: the row is written by rank 0."""

    def write_row(self, values: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _signals() -> SignalCatcher:
    """SIGINT and SIGTERM as a flag; under torchrun, which repeats its SIGTERM, only a second SIGINT stops at once."""
    return SignalCatcher(repeated_sigterm_stops=not distributed.launched())


def _join_launch(cfg) -> bool:
    """Join the processes of a torchrun launch, if this is one; whether this process writes files."""
    return distributed.init(pick_device(cfg.device, cfg.cpu)).is_main


def _on_main(claim):
    """(run folder, lock) from ``claim()`` on rank 0; the other ranks get the folder and no lock."""
    held = {}

    def run_dir():
        folder, held["lock"] = claim()
        return folder

    folder = distributed.from_main(run_dir)
    return folder, held.get("lock", contextlib.nullcontext())


def create_run_dir(cfg: RunConfig) -> tuple[str, run_lock.RunLock, bool]:
    """The run folder, claimed for this process (see :mod:`utils.run_lock`): exactly --run-dir,
    which must not hold anything yet, or a new timestamped one. Returns (folder, its lock,
    whether this call created the folder)."""
    try:
        if not cfg.run_dir:
            run_dir = make_run_folder(results_root(), data_label(cfg.dataset), model_label(cfg.model), cfg.lr, cfg.batch)
            return run_dir, run_lock.claim(run_dir, "training"), True
        os.makedirs(os.path.dirname(os.path.abspath(cfg.run_dir)), exist_ok=True)
        try:
            os.mkdir(cfg.run_dir)
            created = True
        except FileExistsError:
            if not os.path.isdir(cfg.run_dir):
                raise UserError(f"--run-dir {cfg.run_dir} is a file; choose a new folder")
            created = False
        try:
            lock = run_lock.claim(cfg.run_dir, "training")
        except run_lock.RunFolderBusy:
            raise UserError(f"--run-dir {cfg.run_dir} is being claimed by another process; choose a new folder")
        held = [name for name in os.listdir(cfg.run_dir) if not _is_scratch(name)]
        if held:
            lock.release()
            if "config.json" in held:
                raise UserError(f"--run-dir {cfg.run_dir} already exists and holds a run; continue it with --resume {cfg.run_dir} "
                                f"or choose a new folder")
            raise UserError(f"--run-dir {cfg.run_dir} already exists and is not empty; choose a new folder")
        return cfg.run_dir, lock, created
    except PermissionError as exc:
        raise UserError(f"cannot write the run folder ({exc.strerror}: {exc.filename}); set $RESULTS or --run-dir to a writable folder")
    except OSError as exc:
        raise UserError(f"cannot create the run folder ({exc.strerror}: {exc.filename}); set $RESULTS or --run-dir to a writable folder")


def _is_scratch(name: str) -> bool:
    """Files that hold nothing of a run: locks, and temporaries of an interrupted atomic write."""
    return name.startswith(run_lock.LOCK_FILE) or name.startswith(".tmp_")


class StoppedBeforeStart(Exception):
    """SIGINT or SIGTERM arrived before the run folder existed: nothing was written."""

    def __init__(self, received: signal.Signals):
        self.exit_code = EXIT_CODES[received]
        super().__init__(f"stopped by {received.name} before the run started; nothing was written")


def _start_folder(cfg: RunConfig, record: dict, signals: SignalCatcher) -> tuple[str, run_lock.RunLock]:
    """Claim the run folder and write config.json into it, the one file a run needs to be
    resumed. A failure before config.json exists leaves no folder behind (none that this call
    made)."""
    if signals.received is not None:
        raise StoppedBeforeStart(signals.received)
    run_dir, lock, created = create_run_dir(cfg)
    try:
        atomic_write_json(os.path.join(run_dir, "config.json"), record)
    except BaseException as exc:
        lock.release()
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        if isinstance(exc, OutOfSpace):
            raise UserError(f"{exc}; free space on that disk and start the run again") from None
        raise
    return run_dir, lock


def results_comments(cfg: RunConfig, command_line) -> list[str]:
    """The comment lines at the head of results.txt."""
    return [f"EOSS results: dataset {cfg.dataset}, model {cfg.model}, loss {cfg.loss}, lr {cfg.lr:g}, batch {cfg.batch}",
            "command: " + " ".join(command_line or [])]


def _finish(run_dir: str, setup: Setup, monitor: Monitor, writer: ResultsWriter, signals: SignalCatcher,
            start_step: int, elapsed_before: float, cadences: dict | None = None) -> dict:
    if not setup.world.is_main:  # rank 0 writes every file
        return train_loop(setup, monitor, writer, run_dir, signals, start_step=start_step,
                          elapsed_before=elapsed_before, cadences=cadences)
    trackers = open_trackers(setup.cfg, run_dir, read_json(os.path.join(run_dir, "config.json")), start_step)
    monitor.folder = run_dir
    summary = None
    try:
        try:
            summary = train_loop(setup, monitor, trackers.mirror(writer), run_dir, signals, start_step=start_step,
                                 elapsed_before=elapsed_before, cadences=cadences)
        finally:
            writer.close()
            trackers.close(summary)
        atomic_write_json(os.path.join(run_dir, "summary.json"), summary)
    except OutOfSpace as exc:
        raise stopped_by_full_disk(run_dir, exc) from None
    return summary


def stopped_by_full_disk(run_dir: str, exc: OutOfSpace) -> UserError:
    """Record a run stopped by a full disk as ``interrupted`` at its newest good checkpoint
    (where the small summary.json still fits) and return the one-line error for it."""
    saved = list_checkpoints(run_dir)
    if not saved:
        return UserError(f"{exc}; free space, then continue with training.py --resume {run_dir}")
    step = saved[-1][0]
    try:
        atomic_write_json(os.path.join(run_dir, "summary.json"),
                          {"status": "interrupted", "final_step": step, "reason": "no space left on device"})
    except OutOfSpace:
        pass  # without a summary the run reads as interrupted all the same
    return UserError(f"{exc}; the run stopped (newest good checkpoint: step {step}); free space, then continue "
                     f"with training.py --resume {run_dir}")


def run(cfg: RunConfig, command_line: list[str] | None = None) -> tuple[str, dict]:
    """Train one run into a new run folder; return (run folder, summary).

    The summary's ``status`` is ``finished``, ``stopped_at_loss``, ``diverged`` or
    ``interrupted`` (then ``signal`` names SIGINT or SIGTERM and ``exit_code`` is 130 / 143).
    A signal that arrives before the folder exists raises :class:`StoppedBeforeStart`.
    """
    check_cadences_have_measurements(cfg)
    main = _join_launch(cfg)
    with _signals() as signals:
        setup = build(cfg)
        monitor = Monitor(cfg, setup.total_steps, setup.model, setup.loss_fn, setup.data.X_train, setup.data.Y_train,
                          setup.optimizer)
        record = config_record(setup, monitor.schedule, command_line)
        run_dir, lock = _on_main(lambda: _start_folder(cfg, record, signals))
        with lock:
            writer = _new_results(run_dir, monitor, results_comments(cfg, command_line)) if main else _NoWriter()
            return run_dir, _finish(run_dir, setup, monitor, writer, signals, start_step=0, elapsed_before=0.0)


def _new_results(run_dir: str, monitor: Monitor, comments: list[str]) -> ResultsWriter:
    """A results.txt with the comments and the header only; a full disk is a one-line error
    (the folder then holds config.json, from which --resume starts the run)."""
    path = os.path.join(run_dir, "results.txt")
    try:
        if os.path.exists(path):
            os.unlink(path)
        return ResultsWriter(path, results_columns(monitor), comments)
    except OutOfSpace as exc:
        raise UserError(f"{exc}; free space, then start the run with training.py --resume {run_dir}") from None


def results_columns(monitor: Monitor) -> list[str]:
    """The columns of results.txt for the measurements of ``monitor``."""
    return list(BASE_COLUMNS) + monitor.columns + [TIME_COLUMN]


def read_run_config(run_dir: str) -> dict:
    """config.json of a run folder, checked; a folder that is not a run is a UserError."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isdir(run_dir):
        problem = "is a file, not a folder" if os.path.exists(run_dir) else "does not exist"
        raise UserError(f"{run_dir} {problem}; pass the folder of an EOSS run")
    record = read_versioned_json(path, version=CONFIG_VERSION, kind="config", folder="run",
                                 missing=f"{run_dir} is not an EOSS run folder (no config.json); "
                                         f"pass the folder that training.py printed")
    if "config" not in record:
        raise UserError(f"{path} has no \"config\" settings; the run folder is damaged")
    try:
        RunConfig.from_dict(record["config"])
    except UserError as exc:
        raise UserError(f"{path}: {exc}")
    return record


# config.json's "written_by" of a folder that a user's own training loop wrote (utils.logger).
USER_LOOP = "user_loop"


def refuse_user_loop(run_dir: str, record: dict, what: str) -> None:
    """A folder written by a user's own loop has no model EOSS can rebuild: it cannot be
    resumed, forked or measured from its checkpoints."""
    if record.get("written_by") == USER_LOOP:
        raise UserError(f"{run_dir} was written by a user's own training loop (CurvatureLogger) and cannot be {what}: "
                        f"EOSS cannot rebuild its model; read it with plot_results.py or sharpness_gap.py")


def _pick_checkpoint(run_dir: str, step: int | None, at_or_before: bool) -> tuple[int, str]:
    available = list_checkpoints(run_dir)
    if not available:
        raise UserError(f"{run_dir} has no checkpoints; a run can only be continued from checkpoints/step_<N>.pt")
    if step is None:
        return available[-1]
    candidates = [(s, p) for s, p in available if (s <= step if at_or_before else s == step)]
    if not candidates:
        steps = ", ".join(str(s) for s, _ in available)
        raise UserError(f"{run_dir} has no checkpoint {'at or before' if at_or_before else 'at'} step {step}; available steps: {steps}")
    return candidates[-1]


def resume(run_dir: str, resume_step: int | None = None, *, quiet: bool | None = None, cpu: bool = False,
           device: str | None = None, command_line: list[str] | None = None,
           allow_changed: frozenset = frozenset()) -> tuple[str, dict]:
    """Continue the run in ``run_dir`` from the newest checkpoint that its results.txt reaches
    (or the one at ``resume_step``).

    Training continues at a step S whose earlier rows are all in results.txt: S is a
    checkpoint at or before the step after the last complete row (or later, when no step in
    between was due to be logged), so rows lost from a cut file are recomputed, never left
    out; where no such checkpoint is left (``--keep-checkpoints``, a deleted ``checkpoints/``)
    S is the run's first step, with a note. Rows at or after S and a cut-off last line are
    dropped first, so the finished file equals that of a run never interrupted (elapsed-time
    columns aside). A folder holding only config.json (stopped before its first checkpoint)
    starts at step 0, a fork at its parent's checkpoint. A run that ended (finished, stopped at its loss, diverged) with all its rows is
    left untouched and returned with ``already_done``; branch from it with :func:`fork`
    instead. A run that another live process is training is refused (:mod:`utils.run_lock`),
    and so is a folder written by a user's own loop. ``allow_changed`` accepts changed user
    files (:func:`utils.training.check_user_files`).
    """
    record = read_run_config(run_dir)
    refuse_user_loop(run_dir, record, "resumed")
    cfg = RunConfig.from_dict(record["config"])
    if quiet is not None:
        cfg.quiet = quiet
    if cpu or device:  # where it continues, not what it computes: the run's own device may be absent here
        cfg.cpu, cfg.device = cpu, device
    main = _join_launch(cfg)
    ended = _ended_summary(run_dir)
    if ended is not None:  # checked before claiming the folder too, so archived read-only runs answer
        return run_dir, {**ended, "already_done": True}

    def claim():
        try:
            return run_dir, run_lock.claim(run_dir, "resume")
        except run_lock.RunFolderBusy as exc:
            raise UserError(f"cannot resume: {exc}") from None
        except OSError as exc:
            raise UserError(f"cannot write into {run_dir} ({exc.strerror}); resume needs a writable run folder")

    _, lock = _on_main(claim)
    with lock:
        return _resume_claimed(run_dir, record, cfg, resume_step, main, allow_changed)


def _ended_summary(run_dir: str) -> dict | None:
    """summary.json of a run that ended (finished, stopped at its loss, diverged) and whose
    results.txt holds every row up to its end; None for a run to be continued."""
    summary_path = os.path.join(run_dir, "summary.json")
    if not os.path.isfile(summary_path):
        return None
    try:
        summary = read_json(summary_path)
    except (OSError, ValueError):
        raise UserError(f"{summary_path} is damaged; delete it to resume the run from its newest checkpoint")
    final_row = ended_last_row(summary, summary_path)
    if final_row is None:
        return None
    last_row = last_complete_step(os.path.join(run_dir, "results.txt"))
    return summary if last_row is not None and last_row >= final_row else None


def _resume_claimed(run_dir: str, record: dict, cfg: RunConfig, resume_step: int | None,
                    main: bool = True, allow_changed: frozenset = frozenset()) -> tuple[str, dict]:
    summary_path = os.path.join(run_dir, "summary.json")
    results_path = os.path.join(run_dir, "results.txt")
    ended = _ended_summary(run_dir)
    if ended is not None:
        return run_dir, {**ended, "already_done": True}
    last_row = last_complete_step(results_path)
    with _signals() as signals:
        setup = build(cfg, allow_changed)
        if main:
            note_changed_products(record, setup)
        monitor = Monitor(cfg, setup.total_steps, setup.model, setup.loss_fn, setup.data.X_train, setup.data.Y_train,
                          setup.optimizer)
        cadences = recorded_cadences(record, monitor)
        # A run started before closed forms existed keeps sampling, so its rows stay alike.
        monitor.closed_forms = record.get("resolved", {}).get("closed_forms", [])
        # Likewise a run started before partition draws keeps drawing independent batches.
        monitor.partition_draws = record.get("resolved", {}).get("partition_draws", [])
        parent = record.get("parent")
        first_step = parent["step"] if parent else 0
        due = row_schedule(setup, monitor, cadences)

        def start():
            reach = first_step if last_row is None else last_row + 1
            step, path = resume_point(run_dir, resume_step, reach, due, first_step=first_step)
            if path is None and reach > first_step:
                print(f"note: {run_dir} has no checkpoint at or before step {reach}, the first row results.txt lacks; "
                      f"the run restarts from step {first_step} and recomputes its rows, the same bit for bit on "
                      f"the device that wrote them", file=sys.stderr)
            from_parent = path is None and parent is not None
            return step, _parent_checkpoint(run_dir, parent) if from_parent else path, from_parent

        # Rank 0 decides where to continue: it alone changes the files the decision is read from.
        step, path, from_parent = distributed.from_main(start)
        state = {}
        if path is not None:
            # On the CPU: the RNG states must stay CPU tensors; load_state_dict copies to the device.
            state = load_checkpoint(path)
            restore(setup, monitor, state, keep_optimizer_settings=from_parent)
        if not main:
            return run_dir, _finish(run_dir, setup, monitor, _NoWriter(), signals, start_step=step,
                                    elapsed_before=state.get("wall_time", 0.0), cadences=cadences)
        kept = None if last_row is None or step == first_step else read_results_table(results_path, fix=RESULTS_FIX)
        columns = results_columns(monitor) if kept is None else _stored_columns(kept, results_columns(monitor))
        try:
            _record_resume(run_dir, record, setup, step)
            for later, later_path in list_checkpoints(run_dir):
                if later > step:
                    os.unlink(later_path)
            if os.path.isfile(summary_path):
                os.unlink(summary_path)
            if last_row is None or step == first_step:
                comments = results_comments(cfg, record.get("command_line"))
                if parent:
                    comments.append(f"continued from {parent['run_dir']} at step {first_step}")
                writer = _new_results(run_dir, monitor, comments)
            else:
                atomic_write_text(results_path, kept.before(step).text())
                left_out = tuple(c for c in results_columns(monitor) if c not in columns)
                writer = ResultsWriter(results_path, columns, append=True, left_out=left_out)
        except PermissionError as exc:
            raise UserError(f"cannot write into {run_dir} ({exc.strerror}); resume needs a writable run folder")
        except OutOfSpace as exc:
            raise UserError(f"{exc}; free space, then resume again") from None
        return run_dir, _finish(run_dir, setup, monitor, writer, signals, start_step=step,
                                elapsed_before=state.get("wall_time", 0.0), cadences=cadences)


def _record_resume(run_dir: str, record: dict, setup: Setup, step: int) -> None:
    """Append to config.json's ``resumes`` where the run continued: the step, the launch (world
    size and backend, which may differ from the first launch's ``launch``) and the device."""
    resumed = {"step": step, "world_size": setup.world.size, "backend": setup.world.backend,
               "device": str(setup.device),
               "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    record["resumes"] = [*record.get("resumes", []), resumed]
    atomic_write_json(os.path.join(run_dir, "config.json"), record)


def resume_point(run_dir: str, resume_step: int | None, reach: int, row_is_due,
                 first_step: int = 0) -> tuple[int, str | None]:
    """(step, checkpoint) to continue from: the newest checkpoint at or before ``reach``, the
    first step whose row results.txt lacks, or later where ``row_is_due`` says no step from
    ``reach`` up to it writes a row; (``first_step``, None) when there is none: the run
    restarts from its first step (a fork's from its parent's checkpoint), since the state at
    ``reach`` is saved nowhere. ``resume_step`` asks for one checkpoint."""
    usable = []
    for step, path in list_checkpoints(run_dir):
        if step > reach and any(row_is_due(t) for t in range(reach, step)):
            break
        usable.append((step, path))
    if resume_step is not None:
        _pick_checkpoint(run_dir, resume_step, at_or_before=False)  # a step without a checkpoint is an error
        chosen = [(step, path) for step, path in usable if step == resume_step]
        if not chosen:
            raise UserError(f"--resume-step {resume_step} would leave a gap: results.txt has the rows up to step "
                            f"{reach - 1} only; resume from a checkpoint at or before step {reach}")
        return chosen[0]
    if usable:
        return usable[-1]
    return first_step, None


def _parent_checkpoint(run_dir: str, parent: dict) -> str:
    """The checkpoint a fork started from, for a fork folder stopped before its first own one."""
    path = os.path.join(parent["run_dir"], "checkpoints", parent.get("checkpoint") or f"step_{parent['step']}.pt")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir} is a fork stopped before its first checkpoint, and the checkpoint it started "
                        f"from ({path}) is gone; start the fork again with --cont-run")
    return path


RESULTS_FIX = "the run folder is damaged; delete that line or the damaged rows to resume"


def last_complete_step(path: str) -> int | None:
    """The step of the last row of results.txt before the first cut-off or damaged one; None
    when the file is missing or has no complete row."""
    if not os.path.isfile(path):
        return None
    steps = read_results_table(path, fix=RESULTS_FIX).steps()
    return steps[-1] if steps else None


def note_changed_products(record: dict, setup: Setup) -> None:
    """Say on stderr when a resumed run multiplies by the Hessian another way than it started
    (another device, or a code update that chose a faster mode): its measurements then agree
    with the first part to round-off, not bit for bit."""
    resolved = record.get("resolved", {})
    now = product_routes(setup.cfg, setup.model, setup.loss_fn, setup.data.X_train, setup.data.Y_train, setup.device)
    changed = [f"{key} {resolved[key]} -> {value}" for key, value in now.items()
               if resolved.get(key) not in (None, value)]
    if changed:
        print(f"note: the run started with other Hessian products ({', '.join(changed)}); measurements from here "
              "on agree with the earlier ones to round-off, not bit for bit", file=sys.stderr)


def recorded_cadences(record: dict, monitor: Monitor) -> dict:
    """The cadences a run started with, from its config.json, for resuming it.

    A resumed run keeps the measurement, full-loss and checkpoint cadences recorded when it
    started, even where the defaults of this code have changed since; ``monitor.schedule`` is
    set to them and {"full_loss": ..., "checkpoint_every": ...} is returned (None where the
    record lacks one: the current default is used).
    """
    resolved = record.get("resolved", {})
    recorded = resolved.get("schedule") or {}
    monitor.schedule = {name: recorded.get(name, cadence) for name, cadence in monitor.schedule.items()}
    return {"full_loss": recorded.get("full_loss"), "checkpoint_every": resolved.get("checkpoint_every")}


def fork(parent_dir: str, cont_step: int, overrides: dict, command_line: list[str] | None = None,
         allow_changed: frozenset = frozenset()) -> tuple[str, dict]:
    """Start a new run from the parent's newest checkpoint at or before ``cont_step``.

    Model, optimiser state, random generators, data order and the step counter continue from
    the checkpoint; the settings in ``overrides`` (for example a larger ``lr`` or a smaller
    ``batch``) replace the parent's. A changed optimiser type starts with fresh optimiser
    state. config.json records the parent folder and step.
    """
    record = read_run_config(parent_dir)
    refuse_user_loop(parent_dir, record, "forked")
    values = {**record["config"], **overrides}
    # A file given anew is hashed anew.
    for setting, digest in (("model", "model_sha256"), ("dataset", "dataset_sha256")):
        if setting in overrides:
            values[digest] = None
    # --steps and --epochs are alternatives: the one given on the command line replaces the parent's.
    if "steps" in overrides:
        values["epochs"] = None
    elif "epochs" in overrides:
        values["steps"] = None
    values["run_dir"] = overrides.get("run_dir")
    cfg = RunConfig.from_dict(values)
    check_cadences_have_measurements(cfg, given=overrides)
    step, path = _pick_checkpoint(parent_dir, cont_step, at_or_before=True)
    main = _join_launch(cfg)
    with _signals() as signals:
        setup = build(cfg, allow_changed)
        if step >= setup.total_steps:
            raise UserError(f"the fork starts at step {step} but the run has only {setup.total_steps} steps; give a larger --steps")
        monitor = Monitor(cfg, setup.total_steps, setup.model, setup.loss_fn, setup.data.X_train, setup.data.Y_train,
                          setup.optimizer)
        # On the CPU: the RNG states must stay CPU tensors; load_state_dict copies to the device.
        state = load_checkpoint(path)
        restore(setup, monitor, state, keep_optimizer_settings=True)
        record = config_record(setup, monitor.schedule, command_line)
        record["parent"] = {"run_dir": os.path.abspath(parent_dir), "step": step, "checkpoint": os.path.basename(path)}
        run_dir, lock = _on_main(lambda: _start_folder(cfg, record, signals))
        with lock:
            comments = results_comments(cfg, command_line) + [f"continued from {os.path.abspath(parent_dir)} at step {step}"]
            writer = _new_results(run_dir, monitor, comments) if main else _NoWriter()
            return run_dir, _finish(run_dir, setup, monitor, writer, signals, start_step=step,
                                    elapsed_before=state.get("wall_time", 0.0))


def _stored_columns(table, columns: list[str]) -> list[str]:
    """The header of the results.txt that a resumed run appends to: rows are written by name, in
    its order. Columns this code writes for the run that the file lacks (added to a measurement
    after the run started) are left out, with a note; a column this run does not write means
    the file belongs to other settings, a UserError."""
    extra = sorted(set(table.columns or []) - set(columns))
    if table.columns is None or extra:
        raise UserError(f"{table.path} does not have the columns of this run (unexpected {extra or 'none'}); "
                        f"the run folder does not match its config.json")
    missing = [c for c in columns if c not in table.columns]
    if missing:
        print(f"note: {table.path} was started without the columns {', '.join(missing)}; "
              f"the resumed run leaves them out", file=sys.stderr)
    return table.columns
