"""Every registry measurement on a user's own model, data and training loop.

:func:`measure` takes the registry's measurements once, at the model's current parameters;
:class:`CurvatureLogger` takes them on a cadence inside a loop the user wrote and writes a run
folder with the files and conventions of ``training.py`` (``config.json``, ``results.txt``,
``summary.json`` and, when asked, ``final.json``), which ``plot_results.py`` and
``sharpness_gap.py`` read. ``config.json`` marks the folder as written by a user's loop: EOSS
cannot rebuild its model, so ``--resume``, forks and ``compute_final_*`` refuse it.

Both read the optimiser the user steps with: its learning rate, momentum and Nesterov flag set
the stability threshold (2/eta, (2 + 2 mu)/eta, ...), momentum sharpness reads its momentum
buffers and the preconditioned sharpness Adam's second moments.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings

import torch

from utils import schedule
from utils.config import ADAM_BETAS, CONFIG_VERSION, RunConfig
from utils.hvp import forward, forward_in_current_mode
from utils.launch import USER_LOOP, measurement_routes, provenance, results_columns, results_comments
from utils.models import count_parameters
from utils.monitor import Monitor
from utils.registry import BY_NAME, MEASUREMENTS, NAMES
from utils.results import TIME_COLUMN, ResultsWriter, atomic_write_json
from utils.training import evaluate
from utils.user_inputs import UserData, as_data, as_loss

# The measurements that draw random mini-batches by index: a pure iterable of data has no
# indices, so it serves only the others (full-batch quantities and the step's own batch).
SAMPLED = frozenset(m.name for m in MEASUREMENTS if m.draws_batches)


def optimizer_settings(optimizer) -> dict:
    """The RunConfig settings of ``optimizer``: lr, momentum and nesterov of SGD, adam for Adam
    (whose threshold the suite states for beta_1 = 0.9). The stability thresholds are those of
    plain SGD, heavy-ball or Nesterov momentum without dampening, and Adam; any other optimiser,
    dampening or weight decay (which adds its coefficient to every curvature the step sees) is
    measured all the same, with a warning that the line drawn does not hold for it."""
    group = optimizer.param_groups[0]
    settings = {"lr": float(group["lr"])}
    name = type(optimizer).__name__
    if isinstance(optimizer, torch.optim.Adam):
        if tuple(group["betas"]) != ADAM_BETAS:
            warnings.warn(f"Adam's betas are {tuple(group['betas'])}; the threshold 38/eta drawn for Adam assumes "
                          f"{ADAM_BETAS}", stacklevel=3)
        settings["adam"] = True
    elif isinstance(optimizer, torch.optim.SGD):
        settings.update(momentum=float(group.get("momentum", 0.0)), nesterov=bool(group.get("nesterov", False)))
        if group.get("dampening", 0.0):
            warnings.warn(f"SGD's dampening is {group['dampening']}; the momentum threshold drawn assumes none",
                          stacklevel=3)
    else:
        warnings.warn(f"{name} is neither SGD nor Adam: the measurements read only its step size, and the "
                      "stability line drawn is plain SGD's 2/eta", stacklevel=3)
    if group.get("weight_decay", 0.0):
        warnings.warn(f"{name}'s weight_decay {group['weight_decay']} adds to every curvature its step sees; the "
                      "stability line drawn assumes none", stacklevel=3)
    return settings


def measurement_config(measurements, *, every: int | None = None, batch_size: int, lr: float | None = None,
                       optimizer=None, loss_name: str = "mse", seed: int = 0, data: UserData | None = None,
                       require_lr: bool = True, **settings) -> RunConfig:
    """The RunConfig of a user's measurements: ``measurements`` is a list of registry names
    (each at cadence ``every``) or a dict {name: cadence}; ``settings`` are further RunConfig
    fields (``num_eigenvalues``, ``hvp_chunk``, ``exact_measurements``, ``gradient_overlap``,
    ``layer_groups``, ``density_probes`` ...). Unknown names, a measurement whose optimiser is
    missing, and sampled measurements on data that cannot be indexed raise ValueError."""
    if require_lr and lr is None and optimizer is None:
        raise ValueError("pass the optimizer you step with (or lr=): its step size sets the stability threshold")
    cadences = dict(measurements) if isinstance(measurements, dict) else {name: every for name in measurements}
    unknown = sorted(set(cadences) - set(NAMES))
    if unknown:
        raise ValueError(f"unknown measurement {', '.join(unknown)}; choose among {', '.join(NAMES)}")
    values = {"batch": int(batch_size), "loss": loss_name, "measure_seed": int(seed), **settings}
    if lr is not None:
        values["lr"] = float(lr)
    if optimizer is not None:
        values = {**optimizer_settings(optimizer), **values}
    for name, cadence in cadences.items():
        values[name] = (values.get(name) or 1) if BY_NAME[name].argument else True
        values[f"{name}_every"] = cadence
    try:
        cfg = RunConfig(**values)
    except TypeError as exc:
        raise ValueError(f"{exc}; settings are fields of utils.config.RunConfig") from None
    if not math.isfinite(cfg.lr) or cfg.lr <= 0:
        raise ValueError(f"lr must be positive, got {cfg.lr}")
    for name in cadences:
        if data is not None and not data.indexable and name in SAMPLED:
            raise ValueError(f"{name} draws random batches by index, which an iterable {data.source} cannot give; "
                             f"pass a map-style Dataset (or its DataLoader), or (X, Y) tensors")
        needs = BY_NAME[name].needs
        if needs == "momentum" and not (isinstance(optimizer, torch.optim.SGD) and cfg.momentum > 0):
            raise ValueError(f"{name} measures the momentum update; pass the torch.optim.SGD with momentum > 0 you step with")
        if needs == "adam" and not isinstance(optimizer, torch.optim.Adam):
            raise ValueError(f"{name} measures Adam's preconditioner; pass the torch.optim.Adam you step with")
    return cfg


def _model_device_dtype(model):
    reference = next(model.parameters())
    return reference.device, reference.dtype


def measure(model, loss, data, measurements=("lambdamax", "batch_sharpness"), *, batch_size: int,
            optimizer=None, lr: float | None = None, batch=None, step: int = 0, seed: int = 0,
            batch_to_inputs=None, **settings) -> dict:
    """The registry's ``measurements`` of ``model`` at its current parameters, as
    {column: :class:`~utils.estimators.Estimate`} (bare floats for extra columns such as
    ``lambda_2``). ``data``, ``loss`` and ``batch_to_inputs`` as in :mod:`utils.user_inputs`;
    the data go to the model's device and dtype (a float64 model measures in float64).
    ``batch_size`` is the b of the mini-batch quantities; ``optimizer`` (or ``lr``) sets the
    stability threshold and is read by momentum and Adam sharpness; ``batch`` = (xb, yb) is the
    step's own batch of ``step_sharpness``. Random batches are those of (``seed``, ``step``),
    the same as ``training.py --measure-seed`` draws at that step."""
    device, dtype = _model_device_dtype(model)
    user_data = as_data(data, batch_to_inputs=batch_to_inputs, device=device, dtype=dtype)
    loss_fn, loss_name = as_loss(loss)
    cfg = measurement_config(measurements, every=1, batch_size=batch_size, lr=lr, optimizer=optimizer,
                             loss_name=loss_name, seed=seed, data=user_data, **settings)
    xb, yb = _step_batch(cfg, batch, device, dtype)
    monitor = Monitor(cfg, 1, model, loss_fn, user_data.X, user_data.Y, optimizer)
    values = {}
    for _, output in monitor.due_values(step, xb, yb):
        values.update(output)
    return values


def _step_batch(cfg, batch, device, dtype):
    if batch is None:
        if cfg.step_sharpness:
            raise ValueError("step_sharpness measures the step's own batch; pass batch=(xb, yb)")
        return None, None
    step_data = as_data(batch, device=device, dtype=dtype)
    return step_data.X, step_data.Y


class CurvatureLogger:
    """Measures a model on a cadence inside the user's own training loop and writes a run
    folder that the suite's analysis scripts read.

        logger = CurvatureLogger(run_dir, model, "mse", (X, Y), measurements=["lambdamax",
                                 "batch_sharpness"], every=10, batch_size=32)
        for step in range(steps):
            xb, yb = ...                          # the step's batch
            logger.log(step, optimizer, batch=(xb, yb))   # before the update, as training.py
            optimizer.zero_grad(); loss_fn(model(xb), yb).backward(); optimizer.step()
        logger.close()

    Row t of ``results.txt`` holds, as in ``training.py``, the full-batch loss and accuracy
    (every ``full_loss_every`` steps, default ``every``) and the measurements due at t, taken on
    the parameters before update t, the loss of batch t (``batch_loss``) and the wall time;
    a row is written every ``log_every`` calls' steps and at every step with a measurement.
    Random batches of a measurement at step t are those ``training.py`` draws at step t with
    ``--measure-seed seed``. ``test_data`` adds the test columns of ``summary.json``.
    ``run_dir`` must not exist yet or be empty. ``lr`` defaults to the optimiser's (read at the
    first :meth:`log`, which writes config.json). ``name`` = ``"<dataset>_<model>"`` labels
    the data set and the model in config.json and in plots (default: the data's and the model's
    class names). ``settings`` are further RunConfig fields, as for :func:`measure`.
    """

    def __init__(self, run_dir: str, model, loss, data, *, measurements=("lambdamax", "batch_sharpness"),
                 every: int = 10, batch_size: int, lr: float | None = None, full_loss_every: int | None = None,
                 log_every: int = 1, test_data=None, seed: int = 0, batch_to_inputs=None, name: str | None = None,
                 **settings):
        if os.path.isdir(run_dir) and os.listdir(run_dir):
            raise ValueError(f"{run_dir} already exists and is not empty; choose a new folder")
        device, dtype = _model_device_dtype(model)
        self.run_dir, self.model = run_dir, model
        self.loss_fn, self.loss_name = as_loss(loss)
        self.data = as_data(data, batch_to_inputs=batch_to_inputs, device=device, dtype=dtype)
        self.test = as_data(test_data, batch_to_inputs=batch_to_inputs, device=device, dtype=dtype) if test_data is not None else None
        self.device, self.dtype = device, dtype
        self._options = dict(measurements=measurements, every=every, batch_size=batch_size, lr=lr, seed=seed,
                             full_loss_every=full_loss_every or every, log_every=log_every, **settings)
        self.label = name
        # Checked now, so that a mistake shows before the loop runs; rebuilt from the optimiser at the first log.
        self.cfg = self._config(None, require_lr=False)
        self.monitor = self.writer = None
        self.started = time.perf_counter()
        self.last_step = None
        self._first_step_size, self._step_size_moved = None, False

    def _config(self, optimizer, require_lr: bool = True) -> RunConfig:
        o = self._options
        label = self.label or f"{self.data.source}_{type(self.model).__name__}"
        # The model's name is the last part: "my_data_mlp" is model mlp on my_data.
        dataset, _, model = label.rpartition("_") if "_" in label else (label, "", label)
        return measurement_config(o["measurements"], every=o["every"], batch_size=o["batch_size"], lr=o["lr"],
                                  optimizer=optimizer, loss_name=self.loss_name, seed=o["seed"], data=self.data,
                                  require_lr=require_lr,
                                  full_loss_every=o["full_loss_every"], log_every=o["log_every"], dataset=dataset,
                                  model=model or dataset, num_data=int(self.data.X.shape[0]),
                                  device=str(self.device), quiet=True,
                                  **{k: v for k, v in o.items() if k not in _LOGGER_OPTIONS})

    def _start(self, optimizer) -> None:
        self.cfg = cfg = self._config(optimizer)
        X, Y = self.data.X, self.data.Y
        self.monitor = Monitor(cfg, 1, self.model, self.loss_fn, X, Y, optimizer)
        self.monitor.folder = self.run_dir
        self.full_loss = schedule.every(cfg.full_loss_every)
        with torch.no_grad():  # eval mode: one row through a train-mode BatchNorm has no statistics
            output = forward(self.model, X[:1], train_mode=False)
        output_dim = 1 if output.dim() == 1 else int(output.shape[-1])
        record = {
            "version": CONFIG_VERSION,
            "written_by": USER_LOOP,
            "config": cfg.to_dict(),
            "resolved": {
                "num_train": int(X.shape[0]),
                "num_test": int(self.test.X.shape[0]) if self.test is not None else 0,
                "input_shape": list(X.shape[1:]),
                "output_dim": output_dim,
                "num_params": count_parameters(self.model),
                "schedule": {"full_loss": self.full_loss, **self.monitor.schedule},
                **measurement_routes(cfg, self.model, self.loss_fn, X, Y, self.device),
            },
            "user_loop": {"model": type(self.model).__name__, "loss": self.loss_name, "data": self.data.source,
                          "optimizer": type(optimizer).__name__ if optimizer is not None else None},
            "device": str(self.device),
            **provenance([os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]),
        }
        os.makedirs(self.run_dir, exist_ok=True)
        atomic_write_json(os.path.join(self.run_dir, "config.json"), record)
        self.writer = ResultsWriter(os.path.join(self.run_dir, "results.txt"), results_columns(self.monitor),
                                    results_comments(cfg, record["command_line"]))

    def log(self, step: int, optimizer=None, *, batch=None, batch_loss: float | None = None) -> dict:
        """Measure what is due at ``step`` on the current parameters (before update ``step``)
        and write its row; returns the row. ``batch`` = (xb, yb) is the step's batch (its loss
        is the row's ``batch_loss`` unless ``batch_loss`` is given)."""
        if self.monitor is None:
            self._start(optimizer)
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(f"step {step} comes after step {self.last_step}; log each step once, in order")
        self.monitor.optimizer = optimizer
        self._check_step_size(optimizer)
        xb, yb = _step_batch(self.cfg, batch, self.device, self.dtype)
        epoch = step // max(1, self.data.X.shape[0] // self.cfg.batch)  # training.py's epochs of n // b steps
        row = {"epoch": epoch, "step": step}
        if schedule.is_due(self.full_loss, step):
            row["full_loss"], row["full_accuracy"] = evaluate(self.model, self.loss_fn, self.data.X, self.data.Y)
        measured = self.monitor.measure(step, xb, yb)
        row.update(measured)
        written = step % self.cfg.log_every == 0 or measured or "full_loss" in row
        # The batch loss costs a forward pass (pass batch_loss= to spare it): only for a row that is
        # written (nan in the others), and leaving the user's running statistics alone.
        if batch_loss is None and xb is not None and written:
            with torch.no_grad():
                batch_loss = self.loss_fn(forward_in_current_mode(self.model, xb), yb).item()
        row["batch_loss"] = math.nan if batch_loss is None else batch_loss
        row[TIME_COLUMN] = time.perf_counter() - self.started
        if written:
            self.writer.write_row(row)
        self.last_step = step
        return row

    def _check_step_size(self, optimizer) -> None:
        """The run's thresholds come from its step size at the first logged step: say once when the
        optimiser's has moved since (a learning-rate schedule), since its lines no longer hold."""
        if optimizer is None or self._step_size_moved:
            return
        lr = float(optimizer.param_groups[0]["lr"])
        if self._first_step_size is None:
            self._first_step_size = lr
        elif lr != self._first_step_size:
            self._step_size_moved = True
            warnings.warn(f"the step size moved from {self._first_step_size:g} to {lr:g}: the stability thresholds "
                          "of this run (lines, density_mass_above, momentum sharpness) keep the first", stacklevel=3)

    def close(self, *, final: bool = False) -> dict:
        """Write summary.json (and with ``final`` final.json: lambda_max, Batch Sharpness and
        GNI of the end state, as ``training.py --final``); returns the summary."""
        if self.monitor is None:
            raise ValueError("nothing was logged; call log(step, optimizer, batch=...) in the loop before close()")
        self.writer.close()
        step = self.last_step + 1
        if final:
            atomic_write_json(os.path.join(self.run_dir, "final.json"), self.monitor.final(step))
        train_loss, train_acc = evaluate(self.model, self.loss_fn, self.data.X, self.data.Y)
        test_loss, test_acc = (evaluate(self.model, self.loss_fn, self.test.X, self.test.Y) if self.test is not None
                               else (math.nan, math.nan))
        summary = {"status": "finished", "final_step": step, "estimates": self.monitor.estimate_counts,
                   "final_train_loss": train_loss, "final_train_accuracy": train_acc,
                   "final_test_loss": test_loss, "final_test_accuracy": test_acc,
                   "wall_time": time.perf_counter() - self.started}
        atomic_write_json(os.path.join(self.run_dir, "summary.json"), summary)
        return summary


_LOGGER_OPTIONS = {"measurements", "every", "batch_size", "lr", "seed", "full_loss_every", "log_every"}
