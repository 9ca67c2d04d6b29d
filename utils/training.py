"""The training loop: SGD (or momentum / Adam) on a data set held on the device.

Steps are numbered 0..N-1. At step t the loop (1) checkpoints the state before update t when
due, (2) lets the monitor take the measurements due at t on the parameters before update t,
(3) computes the batch loss and gradient and applies update t, (4) writes row t of
results.txt. Epoch e visits a permutation of the training set drawn from
(data_ordering_seed, e); the last partial batch is dropped. Because the batch order and every
measurement's randomness are pure functions of seeds and the step number, a run can be
recomputed or continued from any checkpoint.

With ``--gd-noise`` or ``--sde`` step (3) is a noise baseline of :mod:`utils.noise` on the
whole training set instead: the ``batch_loss`` column then holds the full-batch loss L at the
parameters before update t, the loss whose noisy gradient the update follows.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from utils import run_lock, schedule
from utils.batch_forms import batch_route
from utils.checkpoints import (checkpoint_path, list_checkpoints, load_checkpoint, prune_checkpoints,
                               rng_state, save_checkpoint, set_rng_state)
from utils.cli import SignalCatcher
from utils.config import (CONFIG_VERSION, DEFAULT_STEPS, RunConfig, check_cadences_have_measurements, datasets_root,
                          results_root, validate)
from utils.data import load_dataset
from utils.errors import UserError
from utils.hvp import measurement_hvp_mode
from utils.losses import accuracy, get_loss
from utils.models import build_model, count_parameters
from utils.monitor import Monitor
from utils.noise import NoisyStep, noisy_step_from_config
from utils.resources import OutOfSpace, check_memory, memory_for
from utils.results import (BASE_COLUMNS, TIME_COLUMN, ResultsWriter, atomic_write_json, atomic_write_text,
                           make_run_folder, read_json, read_results_table, read_versioned_json)
from utils.trackers import open_trackers

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


@dataclass
class Setup:
    """Everything a run needs, built and checked before any file is written."""

    cfg: RunConfig
    device: torch.device
    data: object
    model: torch.nn.Module
    loss_fn: object
    optimizer: torch.optim.Optimizer
    total_steps: int
    steps_per_epoch: int
    noise: NoisyStep | None = None  # --gd-noise / --sde: replaces the mini-batch SGD step


def pick_device(force_cpu: bool) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not force_cpu else "cpu")


def make_optimizer(cfg: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if cfg.adam:
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


MODEL_TOO_BIG = "use a smaller --width or --depth"


def check_model_fits(cfg: RunConfig, input_shape, output_dim: int, device: torch.device) -> None:
    """Refuse, before anything is allocated, a model whose parameters, gradients and optimiser
    state alone exceed the memory available (its shape is built on the meta device, which
    allocates nothing)."""
    with torch.device("meta"):
        shape = build_model(cfg.model, input_shape, output_dim, width=cfg.width, depth=cfg.depth,
                            activation=cfg.activation, no_init=True)
    count = count_parameters(shape)
    optimiser_copies = 2 if cfg.adam else (1 if cfg.momentum else 0)
    parts = "parameters, gradients" + (" and optimiser state" if optimiser_copies else "")
    check_memory((2 + optimiser_copies) * count * torch.tensor([], dtype=torch.get_default_dtype()).element_size(),
                 device, f"the model {cfg.model} ({count:,} parameters: {parts})", MODEL_TOO_BIG)


def epoch_permutation(data_ordering_seed: int, epoch: int, n: int) -> torch.Tensor:
    """The visiting order of epoch ``epoch``: a pure function of the seed and the epoch."""
    generator = torch.Generator().manual_seed((data_ordering_seed * 1_000_003 + epoch) % (2**63 - 1))
    return torch.randperm(n, generator=generator)


def build(cfg: RunConfig) -> Setup:
    """Validate ``cfg`` and build data, model, loss and optimiser (no files written)."""
    validate(cfg)
    device = pick_device(cfg.cpu)
    with memory_for(f"loading the data set {cfg.dataset}", "use a smaller --num-data"):
        data = load_dataset(cfg.dataset, root=datasets_root(), loss=cfg.loss, num_data=cfg.num_data,
                            dataset_seed=cfg.dataset_seed, classes=cfg.classes,
                            input_shape=tuple(cfg.input_shape) if cfg.input_shape else None,
                            num_classes=cfg.num_classes, download=cfg.download, device=device)
    n = data.X_train.shape[0]
    if cfg.batch > n:
        raise UserError(f"--batch {cfg.batch} is larger than the training set ({n} samples); use a smaller --batch or more --num-data")
    check_model_fits(cfg, data.input_shape, data.output_dim, device)
    with memory_for(f"building the model {cfg.model}", MODEL_TOO_BIG):
        model = build_model(cfg.model, data.input_shape, data.output_dim, width=cfg.width, depth=cfg.depth,
                            activation=cfg.activation, init_scale=cfg.init_scale, init_seed=cfg.init_seed,
                            no_init=cfg.no_init).to(device)
    num_params = count_parameters(model)
    if cfg.num_eigenvalues > num_params:
        raise UserError(f"--num-eigenvalues {cfg.num_eigenvalues} exceeds the model's {num_params} parameters; "
                        f"ask for at most {num_params}")
    steps_per_epoch = n // cfg.batch
    total_steps = cfg.epochs * steps_per_epoch if cfg.epochs else (cfg.steps or DEFAULT_STEPS)
    loss_fn, optimizer = get_loss(cfg.loss), make_optimizer(cfg, model)
    noise = noisy_step_from_config(cfg, model, loss_fn, data.X_train, data.Y_train, optimizer)
    return Setup(cfg, device, data, model, loss_fn, optimizer, total_steps, steps_per_epoch, noise)


@torch.no_grad()
def evaluate(model, loss_fn, X, Y, chunk_size: int = 4096) -> tuple[float, float]:
    """Mean loss and accuracy over (X, Y) in eval mode, in chunks; the model's mode is restored."""
    was_training = model.training
    model.eval()
    total, correct = 0.0, 0.0
    for start in range(0, X.shape[0], chunk_size):
        xb, yb = X[start:start + chunk_size], Y[start:start + chunk_size]
        out = model(xb)
        total += loss_fn(out, yb, reduction="sum").item()
        correct += accuracy(out, yb) * xb.shape[0]
    model.train(was_training)
    return total / X.shape[0], correct / X.shape[0]


def default_checkpoint_every(total_steps: int) -> int:
    return max(1, total_steps // 20)


def full_loss_schedule(cfg: RunConfig, total_steps: int):
    if cfg.full_loss_every:
        return schedule.every(cfg.full_loss_every)
    return schedule.dense_early(total_steps, 50, 100)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def config_record(setup: Setup, measurement_plan: dict, command_line: list[str] | None) -> dict:
    """The contents of config.json: every setting resolved, plus what the run was built from."""
    import numpy
    import torchvision

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
            "measurement_mode": "train",
            "hvp_mode": measurement_hvp_mode(setup.model, setup.device, exact=cfg.exact_measurements),
            "batch_route": batch_route(setup.model, setup.loss_fn, data.X_train, data.Y_train,
                                       device=setup.device, exact=cfg.exact_measurements),
        },
        "device": str(setup.device),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "numpy": numpy.__version__},
        "git_commit": _git_commit(),
        "start_time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command_line": command_line,
    }


class _Progress:
    """tqdm on a terminal; a plain line every tenth of the run otherwise; nothing when quiet.

    Both show the latest value of each quantity, however many steps ago it was measured:
    measurements are sparse, so the step a line is printed at rarely carries one. A value from
    an earlier row than the newest is marked with that row's step (``lambda_max=16.9 @964``).
    """

    def __init__(self, total: int, initial: int, quiet: bool):
        self.total, self.quiet, self.bar = total, quiet, None
        self.latest = {}
        self.interactive = sys.stderr.isatty()
        if not quiet and self.interactive:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self.every = max(1, total // 10)

    def update(self, step: int, info: dict) -> None:
        if self.quiet:
            return
        self.latest.update((k, (v, step)) for k, v in info.items() if v is not None)
        text = ", ".join(f"{k}={v:.4g}" + ("" if at == step else f" @{at}") for k, (v, at) in self.latest.items())
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(text, refresh=False)
        elif (step + 1) % self.every == 0 or step + 1 == self.total:
            print(f"step {step + 1}/{self.total}: {text}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def create_run_dir(cfg: RunConfig) -> tuple[str, run_lock.RunLock, bool]:
    """The run folder, claimed for this process (see :mod:`utils.run_lock`): exactly --run-dir,
    which must not hold anything yet, or a new timestamped one. Returns (folder, its lock,
    whether this call created the folder)."""
    try:
        if not cfg.run_dir:
            run_dir = make_run_folder(results_root(), cfg.dataset, cfg.model, cfg.lr, cfg.batch)
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
        if isinstance(exc, UserError):
            raise
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


def _results_comments(cfg: RunConfig, command_line) -> list[str]:
    return [f"EOSS results: dataset {cfg.dataset}, model {cfg.model}, loss {cfg.loss}, lr {cfg.lr:g}, batch {cfg.batch}",
            "command: " + " ".join(command_line or [])]


def _finish(run_dir: str, setup: Setup, monitor: Monitor, writer: ResultsWriter, signals: SignalCatcher,
            start_step: int, elapsed_before: float, cadences: dict | None = None) -> dict:
    trackers = open_trackers(setup.cfg, run_dir, read_json(os.path.join(run_dir, "config.json")), start_step)
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
    with SignalCatcher() as signals:
        setup = build(cfg)
        monitor = Monitor(cfg, setup.total_steps, setup.model, setup.loss_fn, setup.data.X_train, setup.data.Y_train,
                          setup.optimizer)
        record = config_record(setup, monitor.schedule, command_line)
        run_dir, lock = _start_folder(cfg, record, signals)
        with lock:
            writer = _new_results(run_dir, monitor, _results_comments(cfg, command_line))
            return run_dir, _finish(run_dir, setup, monitor, writer, signals, start_step=0, elapsed_before=0.0)


def _new_results(run_dir: str, monitor: Monitor, comments: list[str]) -> ResultsWriter:
    """A results.txt with the comments and the header only; a full disk is a one-line error
    (the folder then holds config.json, from which --resume starts the run)."""
    path = os.path.join(run_dir, "results.txt")
    try:
        if os.path.exists(path):
            os.unlink(path)
        return ResultsWriter(path, _columns(monitor), comments)
    except OutOfSpace as exc:
        raise UserError(f"{exc}; free space, then start the run with training.py --resume {run_dir}") from None


def _columns(monitor: Monitor) -> list[str]:
    return list(BASE_COLUMNS) + monitor.columns + [TIME_COLUMN]


def restore(setup: Setup, monitor: Monitor, state: dict, *, keep_optimizer_settings: bool = False) -> None:
    """Load model, optimiser, random generators and eigenvector cache from a checkpoint.

    With ``keep_optimizer_settings`` the optimiser's hyper-parameters (lr, momentum, ...) stay
    those of ``setup.cfg`` while its state (momentum buffers, Adam moments) comes from the
    checkpoint: what a continuation fork with a changed ``--lr`` needs.
    """
    try:
        setup.model.load_state_dict(state["model"])
    except RuntimeError:
        raise UserError("the checkpoint's parameters do not fit this model; a fork must keep --model, --width, "
                        "--depth and the data set of its parent")
    saved_kind = state.get("optimizer_kind")
    if saved_kind is None or saved_kind == type(setup.optimizer).__name__:
        settings = [{k: v for k, v in group.items() if k != "params"} for group in setup.optimizer.param_groups]
        setup.optimizer.load_state_dict(state["optimizer"])
        if keep_optimizer_settings:
            for group, own in zip(setup.optimizer.param_groups, settings):
                group.update(own)
    set_rng_state(state["rng"])
    monitor.eigenvectors = state.get("eigenvectors")
    if setup.noise is not None:
        setup.noise.load_state_dict(state.get("noise_state"))
    if monitor.eigenvectors is not None:
        monitor.eigenvectors = monitor.eigenvectors.to(setup.device)


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


ENDED = ("finished", "stopped_at_loss", "diverged")


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
           command_line: list[str] | None = None) -> tuple[str, dict]:
    """Continue the run in ``run_dir`` from the newest checkpoint that its results.txt reaches
    (or the one at ``resume_step``).

    Training continues at a step S whose earlier rows are all in results.txt: S is a
    checkpoint at or before the step after the last complete row (or later, when no step in
    between was due to be logged), so rows lost from a cut file are recomputed, never left
    out. Rows at or after S and a cut-off last line are dropped first, so the finished file
    equals that of a run never interrupted (elapsed-time columns aside). A folder holding only
    config.json (stopped before its first checkpoint) starts at step 0, a fork at its parent's
    checkpoint. A run that ended (finished, stopped at its loss, diverged) with all its rows is
    left untouched and returned with ``already_done``; branch from it with :func:`fork`
    instead. A run that another live process is training is refused (:mod:`utils.run_lock`).
    """
    record = read_run_config(run_dir)
    cfg = RunConfig.from_dict(record["config"])
    if quiet is not None:
        cfg.quiet = quiet
    cfg.cpu = cfg.cpu or cpu
    ended = _ended_summary(run_dir)
    if ended is not None:  # checked before claiming the folder too, so archived read-only runs answer
        return run_dir, {**ended, "already_done": True}
    try:
        lock = run_lock.claim(run_dir, "resume")
    except run_lock.RunFolderBusy as exc:
        raise UserError(f"cannot resume: {exc}") from None
    except OSError as exc:
        raise UserError(f"cannot write into {run_dir} ({exc.strerror}); resume needs a writable run folder")
    with lock:
        return _resume_claimed(run_dir, record, cfg, resume_step)


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
    if not isinstance(summary, dict) or summary.get("status") not in ENDED:
        return None
    last_row = last_complete_step(os.path.join(run_dir, "results.txt"))
    final_row = summary.get("final_step", 0) - (summary["status"] == "finished")  # a finished run's last step is final_step - 1
    return summary if last_row is not None and last_row >= final_row else None


def _resume_claimed(run_dir: str, record: dict, cfg: RunConfig, resume_step: int | None) -> tuple[str, dict]:
    summary_path = os.path.join(run_dir, "summary.json")
    results_path = os.path.join(run_dir, "results.txt")
    ended = _ended_summary(run_dir)
    if ended is not None:
        return run_dir, {**ended, "already_done": True}
    last_row = last_complete_step(results_path)
    with SignalCatcher() as signals:
        setup = build(cfg)
        note_changed_products(record, setup)
        monitor = Monitor(cfg, setup.total_steps, setup.model, setup.loss_fn, setup.data.X_train, setup.data.Y_train,
                          setup.optimizer)
        cadences = recorded_cadences(record, monitor)
        parent = record.get("parent")
        first_step = parent["step"] if parent else 0
        due = row_schedule(setup, monitor, cadences)
        step, path = resume_point(run_dir, resume_step, first_step if last_row is None else last_row + 1, due)
        from_parent = path is None and parent is not None
        if from_parent:
            path = _parent_checkpoint(run_dir, parent)
        state = {}
        if path is not None:
            # On the CPU: the RNG states must stay CPU tensors; load_state_dict copies to the device.
            state = load_checkpoint(path)
            restore(setup, monitor, state, keep_optimizer_settings=from_parent)
        try:
            for later, later_path in list_checkpoints(run_dir):
                if later > step:
                    os.unlink(later_path)
            if os.path.isfile(summary_path):
                os.unlink(summary_path)
            if last_row is None or step == first_step:
                comments = _results_comments(cfg, record.get("command_line"))
                if parent:
                    comments.append(f"continued from {parent['run_dir']} at step {first_step}")
                writer = _new_results(run_dir, monitor, comments)
            else:
                truncate_results(results_path, before_step=step)
                writer = ResultsWriter(results_path, _columns(monitor), append=True)
        except PermissionError as exc:
            raise UserError(f"cannot write into {run_dir} ({exc.strerror}); resume needs a writable run folder")
        except OutOfSpace as exc:
            raise UserError(f"{exc}; free space, then resume again") from None
        return run_dir, _finish(run_dir, setup, monitor, writer, signals, start_step=step,
                                elapsed_before=state.get("wall_time", 0.0), cadences=cadences)


def resume_point(run_dir: str, resume_step: int | None, reach: int, row_is_due) -> tuple[int, str | None]:
    """(step, checkpoint) to continue from: the newest checkpoint at or before ``reach``, the
    first step whose row results.txt lacks, or later where ``row_is_due`` says no step from
    ``reach`` up to it writes a row; (``reach``, None) when there is none, which is the first
    step of the run when results.txt has no rows. ``resume_step`` asks for one checkpoint."""
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
    return reach, None


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
    now = {"hvp_mode": measurement_hvp_mode(setup.model, setup.device, exact=setup.cfg.exact_measurements),
           "batch_route": batch_route(setup.model, setup.loss_fn, setup.data.X_train, setup.data.Y_train,
                                      device=setup.device, exact=setup.cfg.exact_measurements)}
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


def fork(parent_dir: str, cont_step: int, overrides: dict, command_line: list[str] | None = None) -> tuple[str, dict]:
    """Start a new run from the parent's newest checkpoint at or before ``cont_step``.

    Model, optimiser state, random generators, data order and the step counter continue from
    the checkpoint; the settings in ``overrides`` (for example a larger ``lr`` or a smaller
    ``batch``) replace the parent's. A changed optimiser type starts with fresh optimiser
    state. config.json records the parent folder and step.
    """
    record = read_run_config(parent_dir)
    values = {**record["config"], **overrides}
    # --steps and --epochs are alternatives: the one given on the command line replaces the parent's.
    if "steps" in overrides:
        values["epochs"] = None
    elif "epochs" in overrides:
        values["steps"] = None
    values["run_dir"] = overrides.get("run_dir")
    cfg = RunConfig.from_dict(values)
    check_cadences_have_measurements(cfg, given=overrides)
    step, path = _pick_checkpoint(parent_dir, cont_step, at_or_before=True)
    with SignalCatcher() as signals:
        setup = build(cfg)
        if step >= setup.total_steps:
            raise UserError(f"the fork starts at step {step} but the run has only {setup.total_steps} steps; give a larger --steps")
        monitor = Monitor(cfg, setup.total_steps, setup.model, setup.loss_fn, setup.data.X_train, setup.data.Y_train,
                          setup.optimizer)
        # On the CPU: the RNG states must stay CPU tensors; load_state_dict copies to the device.
        state = load_checkpoint(path)
        restore(setup, monitor, state, keep_optimizer_settings=True)
        record = config_record(setup, monitor.schedule, command_line)
        record["parent"] = {"run_dir": os.path.abspath(parent_dir), "step": step, "checkpoint": os.path.basename(path)}
        run_dir, lock = _start_folder(cfg, record, signals)
        with lock:
            comments = _results_comments(cfg, command_line) + [f"continued from {os.path.abspath(parent_dir)} at step {step}"]
            writer = _new_results(run_dir, monitor, comments)
            return run_dir, _finish(run_dir, setup, monitor, writer, signals, start_step=step,
                                    elapsed_before=state.get("wall_time", 0.0))


def truncate_results(path: str, before_step: int) -> None:
    """Keep the comments, the header and the complete rows with step < before_step.

    A row cut short by a hard kill (no newline, or the wrong number of fields) and everything
    after it are dropped; the file is rewritten atomically.
    """
    atomic_write_text(path, read_results_table(path, fix=RESULTS_FIX).before(before_step).text())


def checkpoint_state(setup: Setup, monitor: Monitor, step: int, elapsed: float) -> dict:
    return {
        "model": setup.model.state_dict(),
        "optimizer": setup.optimizer.state_dict(),
        "step": step,
        "epoch": step // setup.steps_per_epoch,
        "rng": rng_state(),
        "eigenvectors": monitor.eigenvectors,
        "optimizer_kind": type(setup.optimizer).__name__,
        "wall_time": elapsed,
        "noise_state": setup.noise.state_dict() if setup.noise is not None else None,
    }


def row_schedule(setup: Setup, monitor: Monitor, cadences: dict | None = None):
    """A function of the step: whether a run that goes past that step writes its row to
    results.txt (every ``--log-every`` steps, at a full loss or a measurement, and at the
    last step). A run that diverges or reaches ``--stop-loss`` also writes its last row."""
    cfg, total = setup.cfg, setup.total_steps
    loss_schedule = (cadences or {}).get("full_loss") or full_loss_schedule(cfg, total)
    cadence_lists = [loss_schedule, *monitor.schedule.values()]

    def is_due(step: int) -> bool:
        return step % cfg.log_every == 0 or step == total - 1 or any(schedule.is_due(c, step) for c in cadence_lists)

    return is_due


MEASUREMENT_TOO_BIG = ("take full-batch Hessian products in smaller chunks with --hvp-chunk, or use fewer --num-data "
                       "(fork the run from its last checkpoint with --cont-run RUN_DIR --cont-step N --hvp-chunk M)")


def train_loop(setup: Setup, monitor: Monitor, writer: ResultsWriter, run_dir: str, signals: SignalCatcher,
               start_step: int, elapsed_before: float, cadences: dict | None = None) -> dict:
    """Train from ``start_step`` to the end; ``cadences`` (see :func:`recorded_cadences`)
    replace the full-loss and checkpoint cadences derived from the config. A signal in
    ``signals`` stops the run after the current step (or, when it came while the run was set
    up, before the first one), with a checkpoint."""
    cfg, model, optimizer, loss_fn = setup.cfg, setup.model, setup.optimizer, setup.loss_fn
    X, Y = setup.data.X_train, setup.data.Y_train
    n, b, total = X.shape[0], cfg.batch, setup.total_steps
    cadences = cadences or {}
    checkpoint_every = cadences.get("checkpoint_every") or cfg.checkpoint_every or default_checkpoint_every(total)
    loss_schedule = cadences.get("full_loss") or full_loss_schedule(cfg, total)
    row_is_due = row_schedule(setup, monitor, cadences)
    started = time.perf_counter() - elapsed_before
    progress = _Progress(total, start_step, cfg.quiet)
    status, step, permutation, perm_epoch = "finished", start_step, None, None

    def elapsed():
        return time.perf_counter() - started

    def save(at_step):
        path = checkpoint_path(run_dir, at_step)
        if not os.path.exists(path):
            save_checkpoint(path, checkpoint_state(setup, monitor, at_step, elapsed()))
            prune_checkpoints(run_dir, cfg.keep_checkpoints)

    model.train()
    while step < total:
        epoch, position = divmod(step, setup.steps_per_epoch)
        if step % checkpoint_every == 0 or step == start_step:  # a fork is resumable from its first step
            save(step)
        if step == start_step and signals.received is not None:  # it came while the run was set up
            status = "interrupted"
            break
        if perm_epoch != epoch:
            permutation, perm_epoch = epoch_permutation(cfg.data_ordering_seed, epoch, n).to(X.device), epoch
        idx = permutation[position * b:(position + 1) * b]
        xb, yb = X[idx], Y[idx]

        row = {"epoch": epoch, "step": step}
        with memory_for(f"the full-batch loss at step {step}", "use fewer --num-data or a smaller model"):
            if schedule.is_due(loss_schedule, step):
                row["full_loss"], row["full_accuracy"] = evaluate(model, loss_fn, X, Y)
        with memory_for(f"the measurements at step {step}", MEASUREMENT_TOO_BIG):
            row.update(monitor.measure(step, xb, yb))

        with memory_for(f"training step {step}", "use a smaller --batch or a smaller model"):
            optimizer.zero_grad(set_to_none=True)
            if setup.noise is None:
                batch_loss = loss_fn(model(xb), yb)
            else:  # the full-batch loss L; its noisy gradient is already in .grad
                batch_loss = setup.noise.loss_and_gradient(step)
            row["batch_loss"] = batch_loss.item()
            diverged = not math.isfinite(row["batch_loss"]) or not math.isfinite(row.get("full_loss", 0.0))
            reached = cfg.stop_loss is not None and row.get("full_loss", math.inf) < cfg.stop_loss
            if not diverged and not reached:
                if setup.noise is None:
                    batch_loss.backward()
                    optimizer.step()
                else:
                    setup.noise.update(step)
        row[TIME_COLUMN] = elapsed()
        if row_is_due(step) or diverged or reached:
            writer.write_row(row)
        progress.update(step, {k: row[k] for k in ("batch_loss", "full_loss", "lambda_max", "batch_sharpness") if k in row})
        if diverged:
            status = "diverged"
            loss_name = "batch_loss" if not math.isfinite(row["batch_loss"]) else "full_loss"
            print(f"training diverged at step {step}: {loss_name} is {row[loss_name]:g}; the run folder keeps everything up to this step",
                  file=sys.stderr)
            break
        if reached:
            status = "stopped_at_loss"
            break
        step += 1
        if signals.received is not None:
            status = "interrupted"
            break
    progress.close()
    save(step)

    summary = {"status": status, "final_step": step}
    if status == "interrupted":
        summary["signal"] = signals.received.name
        summary["exit_code"] = EXIT_CODES[signals.received]
    if status != "interrupted" and cfg.final:
        with memory_for(f"the final measurements at step {step}", MEASUREMENT_TOO_BIG):
            final = monitor.final(step)
        atomic_write_json(os.path.join(run_dir, "final.json"), final)
    train_loss, train_acc = evaluate(model, loss_fn, X, Y)
    test_loss, test_acc = evaluate(model, loss_fn, setup.data.X_test, setup.data.Y_test)
    summary.update({"final_train_loss": train_loss, "final_train_accuracy": train_acc,
                    "final_test_loss": test_loss, "final_test_accuracy": test_acc,
                    "wall_time": elapsed()})
    return summary
