"""The training loop: SGD (or momentum / Adam) on a data set held on the device.

This module builds a run from its settings and trains it; :mod:`utils.launch` puts runs in
their folders (start, resume, fork).

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

import copy
import dataclasses
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch

from utils import distributed, schedule, sharded
from utils.checkpoints import checkpoint_path, prune_checkpoints, rng_state, save_checkpoint, set_rng_state
from utils.cli import SignalCatcher
from utils.config import ADAM_BETAS, DEFAULT_STEPS, RunConfig, datasets_root, validate
from utils.data import is_data_file, load_dataset
from utils.devices import resolve_device, set_tf32
from utils.errors import UserError
from utils.losses import accuracy, get_loss
from utils.models import build_model, count_parameters, has_batchnorm, resolved_shape
from utils.monitor import Monitor
from utils.noise import NoisyStep, noisy_step_from_config
from utils.resources import check_memory, memory_for
from utils.results import TIME_COLUMN, ResultsWriter, atomic_write_json
from utils.user_files import checked_hash, is_model_file, model_file_parts
from utils.user_models import build_user_model

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
    world: distributed.World = distributed.SINGLE  # the processes of a torchrun launch; rank 0 writes


def pick_device(name: str | None, force_cpu: bool = False) -> torch.device:
    """The device of ``--device`` (:func:`utils.devices.resolve_device`); under torchrun, CUDA is
    the GPU ``cuda:LOCAL_RANK`` of each process."""
    device = resolve_device(name, force_cpu)
    if device.type != "cuda" or not distributed.launched():
        return device
    if name not in (None, "cuda"):
        raise UserError(f"--device {name}: under torchrun every process takes the GPU of its local rank; "
                        f"use --device cuda or leave --device out")
    device = torch.device("cuda", distributed.local_rank())
    torch.cuda.set_device(device)
    return device


def make_optimizer(cfg: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if cfg.adam:
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=ADAM_BETAS)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


MODEL_TOO_BIG = "use a smaller --width or --depth"


def check_model_fits(cfg: RunConfig, input_shape, output_dim: int, device: torch.device) -> None:
    """Refuse, before anything is allocated, a model whose parameters, gradients and optimiser
    state alone exceed the memory available (its shape is built on the meta device, which
    allocates nothing)."""
    with torch.device("meta"):
        shape = build_model(cfg.model, input_shape, output_dim, width=cfg.width, depth=cfg.depth,
                            activation=cfg.activation, no_init=True, heads=cfg.heads, patch=cfg.patch)
    count = count_parameters(shape)
    optimiser_copies = 2 if cfg.adam else (1 if cfg.momentum else 0)
    parts = "parameters, gradients" + (" and optimiser state" if optimiser_copies else "")
    check_memory((2 + optimiser_copies) * count * torch.tensor([], dtype=torch.get_default_dtype()).element_size(),
                 device, f"the model {cfg.model} ({count:,} parameters: {parts})", MODEL_TOO_BIG)


def epoch_permutation(data_ordering_seed: int, epoch: int, n: int) -> torch.Tensor:
    """The visiting order of epoch ``epoch``: a pure function of the seed and the epoch."""
    generator = torch.Generator().manual_seed((data_ordering_seed * 1_000_003 + epoch) % (2**63 - 1))
    return torch.randperm(n, generator=generator)


def check_user_files(cfg: RunConfig, allow_changed: frozenset = frozenset()) -> None:
    """Make the paths of a --dataset or --model file absolute (a run folder is rebuilt from
    anywhere) and record their SHA-256, or check them against the recorded ones
    (:func:`utils.user_files.checked_hash`); ``allow_changed`` holds "model" and/or "data"."""
    if is_data_file(cfg.dataset):
        cfg.dataset = os.path.abspath(cfg.dataset)
        cfg.dataset_sha256 = checked_hash(cfg.dataset, cfg.dataset_sha256, "data", "data" in allow_changed)
    if is_model_file(cfg.model):
        path, function = model_file_parts(cfg.model)
        cfg.model = f"{os.path.abspath(path)}:{function}"
        cfg.model_sha256 = checked_hash(os.path.abspath(path), cfg.model_sha256, "model", "model" in allow_changed)


def resolve_model_shape(cfg: RunConfig, input_shape) -> None:
    """Fill in the model's own defaults of --width, --depth, --heads and --patch, so that
    config.json records the values the model was built with."""
    if not is_model_file(cfg.model):
        for key, value in resolved_shape(cfg.model, input_shape, width=cfg.width, depth=cfg.depth, heads=cfg.heads,
                                         patch=cfg.patch).items():
            setattr(cfg, key, value)


def build(cfg: RunConfig, allow_changed: frozenset = frozenset()) -> Setup:
    """Validate ``cfg`` and build data, model, loss and optimiser (no files written); ``cfg``
    gets its resolved model shape and the hashes of its user files (:func:`check_user_files`)."""
    validate(cfg)
    check_user_files(cfg, allow_changed)
    device = pick_device(cfg.device, cfg.cpu)
    set_tf32(cfg.tf32)
    world = distributed.init(device)
    if world.distributed and (cfg.gd_noise or cfg.sde):
        raise UserError("--gd-noise and --sde run in one process; start them without torchrun")
    with memory_for(f"loading the data set {cfg.dataset}", "use a smaller --num-data"):
        data = load_dataset(cfg.dataset, root=datasets_root(), loss=cfg.loss, num_data=cfg.num_data,
                            dataset_seed=cfg.dataset_seed, classes=cfg.classes,
                            input_shape=tuple(cfg.input_shape) if cfg.input_shape else None,
                            num_classes=cfg.num_classes, download=cfg.download,
                            device="cpu" if world.distributed else device)  # a rank's device gets its part only
    n = data.X_train.shape[0]
    first_rows = data.X_train[:2]  # what a model file's output is checked on, before the rows are sharded
    if world.distributed:
        if n < world.size:
            raise UserError(f"{n} training samples cannot be split over {world.size} processes; use more --num-data")
        data = shard_dataset(data, world, device)
    if cfg.batch > n:
        raise UserError(f"--batch {cfg.batch} is larger than the training set ({n} samples); use a smaller --batch or more --num-data")
    resolve_model_shape(cfg, data.input_shape)
    with memory_for(f"building the model {cfg.model}", MODEL_TOO_BIG):
        if is_model_file(cfg.model):
            model = build_user_model(cfg.model, data.input_shape, data.output_dim, model_args=cfg.model_args,
                                     init_seed=cfg.init_seed, sample=first_rows).to(device)
        else:
            check_model_fits(cfg, data.input_shape, data.output_dim, device)
            model = build_model(cfg.model, data.input_shape, data.output_dim, width=cfg.width, depth=cfg.depth,
                                activation=cfg.activation, init_scale=cfg.init_scale, init_seed=cfg.init_seed,
                                no_init=cfg.no_init, heads=cfg.heads, patch=cfg.patch).to(device)
    if world.distributed and has_batchnorm(model) and cfg.hvp_chunk:
        raise UserError(f"--hvp-chunk would split the BatchNorm statistics of the model {cfg.model} differently from "
                        f"one process; leave --hvp-chunk out under torchrun")
    num_params = count_parameters(model)
    if cfg.num_eigenvalues > num_params:
        raise UserError(f"--num-eigenvalues {cfg.num_eigenvalues} exceeds the model's {num_params} parameters; "
                        f"ask for at most {num_params}")
    steps_per_epoch = n // cfg.batch
    total_steps = cfg.epochs * steps_per_epoch if cfg.epochs else (cfg.steps or DEFAULT_STEPS)
    loss_fn, optimizer = get_loss(cfg.loss), make_optimizer(cfg, model)
    noise = noisy_step_from_config(cfg, model, loss_fn, data.X_train, data.Y_train, optimizer)
    return Setup(cfg, device, data, model, loss_fn, optimizer, total_steps, steps_per_epoch, noise, world)


def shard_dataset(data, world: distributed.World, device=None):
    """``data`` with each split replaced by this rank's block of rows (:class:`utils.sharded.Rows`) on ``device``."""
    return dataclasses.replace(data, **{name: sharded.Rows.shard(getattr(data, name), world, device)
                                        for name in ("X_train", "Y_train", "X_test", "Y_test")})


@torch.no_grad()
def evaluate(model, loss_fn, X, Y, chunk_size: int = 4096) -> tuple[float, float]:
    """Mean loss and accuracy over (X, Y) in eval mode, in chunks; the model's mode is restored.
    Over :class:`utils.sharded.Rows`, the means of the whole, each rank's sums added up; an empty
    set (a data file without a test split) has NaN for both."""
    if sharded.is_sharded(X):
        parts = evaluate(model, loss_fn, X.local, Y.local, chunk_size) if X.count else (0.0, 0.0)
        return tuple(sharded.mean_over_ranks(list(parts), X))
    if X.shape[0] == 0:
        return math.nan, math.nan
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

    def update(self, step: int, info: dict, note: str = "") -> None:
        if self.quiet:
            return
        self.latest.update((k, (v, step)) for k, v in info.items() if v is not None)
        text = ", ".join(f"{k}={v:.4g}" + ("" if at == step else f" @{at}") for k, (v, at) in self.latest.items())
        if note:
            text += f"; {note}"
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(text, refresh=False)
        elif (step + 1) % self.every == 0 or step + 1 == self.total:
            print(f"step {step + 1}/{self.total}: {text}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


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
    monitor.estimate_counts = copy.deepcopy(state.get("estimate_counts") or {})
    if setup.noise is not None:
        setup.noise.load_state_dict(state.get("noise_state"))
    if monitor.eigenvectors is not None:
        monitor.eigenvectors = monitor.eigenvectors.to(setup.device)


def checkpoint_state(setup: Setup, monitor: Monitor, step: int, elapsed: float) -> dict:
    return {
        "model": setup.model.state_dict(),
        "optimizer": setup.optimizer.state_dict(),
        "step": step,
        "epoch": step // setup.steps_per_epoch,
        "rng": rng_state(),
        "eigenvectors": monitor.eigenvectors,
        "estimate_counts": monitor.estimate_counts,
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


def stop_signal(signals: SignalCatcher, setup: Setup, agreed: bool = False) -> signal.Signals | None:
    """The signal that stops the run, if any; under torchrun a signal on any rank stops every
    rank at the same step (SIGTERM where this rank received none itself). ``agreed``: the ranks
    have agreed on a stop already."""
    if not setup.world.distributed:
        return signals.received
    if signals.received is not None and not agreed:
        distributed.agree_on_stop(signals.received.name, setup.device)
        return signals.received
    if agreed or distributed.any_rank(False, setup.device):
        return signals.received or signal.SIGTERM
    return None


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
    main = setup.world.is_main  # the one rank that writes files
    progress = _Progress(total, start_step, cfg.quiet or not main)
    status, step, permutation, perm_epoch = "finished", start_step, None, None

    def elapsed():
        return time.perf_counter() - started

    def save(at_step):
        path = checkpoint_path(run_dir, at_step) if main else None
        if main and not os.path.exists(path):
            save_checkpoint(path, checkpoint_state(setup, monitor, at_step, elapsed()))
            prune_checkpoints(run_dir, cfg.keep_checkpoints)

    model.train()
    while step < total:
        epoch, position = divmod(step, setup.steps_per_epoch)
        if step % checkpoint_every == 0 or step == start_step:  # a fork is resumable from its first step
            save(step)
        if step == start_step and stop_signal(signals, setup) is not None:  # it came while the run was set up
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
            if sharded.is_sharded(xb):  # every rank's part of the batch; gradients summed already
                batch_loss = sharded.mean_loss_backward(model, loss_fn, xb, yb)
            elif setup.noise is None:
                batch_loss = loss_fn(model(xb), yb)
            else:  # the full-batch loss L; its noisy gradient is already in .grad
                batch_loss = setup.noise.loss_and_gradient(step)
            row["batch_loss"] = batch_loss.item()
            diverged = not math.isfinite(row["batch_loss"]) or not math.isfinite(row.get("full_loss", 0.0))
            reached = cfg.stop_loss is not None and row.get("full_loss", math.inf) < cfg.stop_loss
            if not diverged and not reached:
                if setup.noise is None:
                    if not sharded.is_sharded(xb):  # a sharded batch's gradient is in .grad already
                        batch_loss.backward()
                    optimizer.step()
                else:
                    setup.noise.update(step)
        row[TIME_COLUMN] = elapsed()
        if row_is_due(step) or diverged or reached:
            writer.write_row(row)
        progress.update(step, {k: row[k] for k in ("batch_loss", "full_loss", "lambda_max", "batch_sharpness") if k in row},
                        monitor.cap_note())
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
        if stop_signal(signals, setup) is not None:
            status = "interrupted"
            break
    progress.close()
    save(step)

    summary = {"status": status, "final_step": step, "estimates": monitor.estimate_counts}
    if status == "interrupted":
        received = stop_signal(signals, setup, agreed=True)
        summary["signal"] = received.name
        summary["exit_code"] = EXIT_CODES[received]
    if status != "interrupted" and cfg.final:
        with memory_for(f"the final measurements at step {step}", MEASUREMENT_TOO_BIG):
            final = monitor.final(step)
        if main:
            atomic_write_json(os.path.join(run_dir, "final.json"), final)
    train_loss, train_acc = evaluate(model, loss_fn, X, Y)
    test_loss, test_acc = evaluate(model, loss_fn, setup.data.X_test, setup.data.Y_test)
    summary.update({"final_train_loss": train_loss, "final_train_accuracy": train_acc,
                    "final_test_loss": test_loss, "final_test_accuracy": test_acc,
                    "wall_time": elapsed()})
    return summary
