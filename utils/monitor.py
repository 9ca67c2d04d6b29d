"""Which curvature measurements run at a step, and the results.txt columns they fill.

The training loop asks :class:`Monitor` for its columns once and calls :meth:`Monitor.measure`
every step with the parameters *before* that step's update; the monitor consults the schedule
and calls the ``compute`` function of each due entry of :mod:`utils.registry`. Everything here
is read from the registry: no measurement has code of its own in this module.
"""

from __future__ import annotations

import copy
import os
import zlib

import torch

from utils import schedule
from utils.analysis import hessian_threshold
from utils.errors import UserError
from utils.estimators import Estimate, measurement_generator
from utils.hvp import flat_params
from utils.measures import partition_size
from utils.noise_decomposition import closed_form_applies
from utils.registry import MEASUREMENTS, Context

# The tolerance of final.json's float64 solves (Measurement.final_float64): float32 Hessian
# products stall near a relative residual of 1e-4, float64 ones reach far below it.
FINAL_EIG_TOL = 1e-4


def stream_generator(measure_seed: int, step: int, name: str, device="cpu"):
    """The generator of random stream ``name`` at ``step``: a pure function of (seed, step, name).

    Each measurement draws from the stream of its own name, so enabling one never changes
    another's batches.
    """
    return measurement_generator(measure_seed * 1000 + zlib.crc32(name.encode()) % 1000, step, device=device)


def measurement_columns(cfg, model=None) -> list[str]:
    """results.txt columns of the measurements enabled in ``cfg``, in registry order (the
    per-layer columns need the ``model``)."""
    columns = []
    for m in MEASUREMENTS:
        if getattr(cfg, m.name):
            for column in m.columns:
                name = column.name
                columns += [*([name] if column.valued else []), *column.extra(cfg, model),
                            *([f"{name}_se", f"{name}_n"] if column.with_se else []), f"{name}_seconds", f"{name}_hvps"]
    return columns


def measurement_schedule(cfg, total_steps: int) -> dict:
    """The cadence of every enabled measurement (recorded in config.json).

    ``--<name>-every`` beats ``--measure-every``; without either, the registry's default, dense
    early and sparser later, sized to the run length.
    """
    plan = {}
    for m in MEASUREMENTS:
        if getattr(cfg, m.name):
            override = getattr(cfg, f"{m.name}_every") or cfg.measure_every
            plan[m.name] = schedule.every(override) if override else schedule.dense_early(total_steps, *m.cadence)
    return plan


def closed_form_measurements(cfg, model, loss_fn, X, Y) -> list[str]:
    """The enabled measurements whose estimates are computed exactly from per-sample gradients
    where that is cheaper than sampling (``config.json``: ``resolved.closed_forms``; whether a
    given one was, ``_n`` = 0 in results.txt and the ``exact`` counts of summary.json): none with
    ``--exact-measurements``, under train-mode BatchNorm, or for a model whose samples' losses
    are not separable (:func:`utils.noise_decomposition.closed_form_applies`)."""
    if not closed_form_applies(model, loss_fn, X, Y, train_mode=True, exact=cfg.exact_measurements):
        return []
    return [m.name for m in MEASUREMENTS if m.closed_form and getattr(cfg, m.name)]


def partition_draw_measurements(cfg, X) -> list[str]:
    """The enabled measurements whose samples are means over the disjoint batches of one random
    permutation, since the data hold few batches of ``cfg.batch`` (:func:`utils.measures.partition_size`;
    ``config.json``: ``resolved.partition_draws``; a run recorded without it draws independent
    batches, as it did when it started)."""
    if partition_size(X.shape[0], cfg.batch, True) == 1:
        return []
    return [m.name for m in MEASUREMENTS if m.partition_draws and getattr(cfg, m.name)]


class Monitor:
    """Runs the scheduled measurements of one step and returns their column values."""

    def __init__(self, cfg, total_steps: int, model, loss_fn, X, Y, optimizer=None):
        self.cfg = cfg
        self.model, self.loss_fn, self.X, self.Y = model, loss_fn, X, Y
        self.optimizer = optimizer  # its momentum buffers / Adam moments shape the update measured
        self.columns = measurement_columns(cfg, model)
        self.schedule = measurement_schedule(cfg, total_steps)
        self.eigenvectors = None  # warm start for the next eigen-solve; saved in checkpoints
        self.threshold = hessian_threshold(cfg)
        self.folder = None  # the run folder, for measurements that write files of their own
        # {column: {"measured", "stopped_at_cap", "exact"}} of the Monte Carlo estimates so far;
        # saved in checkpoints, so a resumed run counts its whole length.
        self.estimate_counts = {}
        # A resumed run keeps the closed forms recorded when it started (launch sets them).
        self.closed_forms = closed_form_measurements(cfg, model, loss_fn, X, Y)
        self.partition_draws = partition_draw_measurements(cfg, X)
        # theta_0 of --param-distance: the model as built from the config, before a checkpoint
        # is restored, so resumed and forked runs measure from the same initialisation.
        self.reference = None
        if cfg.param_distance:
            self.reference = load_param_file(cfg.param_file, model) if cfg.param_file else flat_params(model)

    def _context(self, step: int, tol: float, xb=None, yb=None, eig_model=None) -> Context:
        return Context(cfg=self.cfg, step=step, model=self.model, loss_fn=self.loss_fn, X=self.X, Y=self.Y,
                       xb=xb, yb=yb, optimizer=self.optimizer, reference=self.reference, tol=tol, generator=None,
                       eigenvectors=self.eigenvectors, eig_model=eig_model, threshold=self.threshold,
                       folder=self.folder, closed_forms=tuple(self.closed_forms),
                       partition_draws=tuple(self.partition_draws))

    def _compute(self, m, context: Context, stream: str) -> dict:
        context.generator = lambda: stream_generator(self.cfg.measure_seed, context.step, stream, device=self.X.device)
        values = m.compute(context)
        self.eigenvectors = context.eigenvectors
        return values

    def measure(self, step: int, xb, yb) -> dict:
        """The columns of every measurement due at ``step`` (``xb``, ``yb``: the step's batch)."""
        row = {}
        for m, values in self.due_values(step, xb, yb):
            row.update(_row_values(m, values, self.cfg, self.model))
        return row

    def due_values(self, step: int, xb, yb) -> list:
        """(registry entry, its output {column: Estimate or bare value}) of every measurement
        due at ``step``, in registry order."""
        context, done = self._context(step, self.cfg.eig_tol, xb, yb), []
        for m in MEASUREMENTS:
            if schedule.is_due(self.schedule.get(m.name), step):
                values = self._compute(m, context, m.name)
                self._count(m, values)
                done.append((m, values))
        return done

    def _count(self, m, values: dict) -> None:
        for column in m.columns:
            estimate = values.get(column.name)
            if column.with_se and estimate is not None:
                counts = self.estimate_counts.setdefault(column.name, {"measured": 0, "stopped_at_cap": 0, "exact": 0})
                counts["measured"] += 1
                counts["stopped_at_cap"] += int(estimate.capped)
                counts["exact"] += int(estimate.exact)

    def cap_note(self) -> str:
        """For the progress line: the estimates the sample cap stopped before their standard-error
        target (``batch_sharpness 3/10``: 3 of its 10 measurements), or "" when none."""
        capped = [f"{name} {c['stopped_at_cap']}/{c['measured']}" for name, c in self.estimate_counts.items()
                  if c["stopped_at_cap"]]
        return "stopped at the sample cap: " + ", ".join(capped) if capped else ""

    def final(self, step: int) -> dict:
        """The contents of final.json: lambda_max (and lambda_2..k), Batch Sharpness and GNI,
        and every other enabled measurement that final.json carries, each value with its
        ``_se`` where it has one. Solves of a ``final_float64`` measurement run on a float64
        copy of the model to min(--eig-tol, 1e-4); the others keep --eig-tol, which float32
        products reach."""
        cfg = self.cfg
        context = self._context(step, cfg.eig_tol, eig_model=copy.deepcopy(self.model).double())
        record = {"step": step}
        for m in MEASUREMENTS:
            if m.final == "always" or (m.final == "enabled" and getattr(cfg, m.name)):
                context.tol = min(cfg.eig_tol, FINAL_EIG_TOL) if m.final_float64 else cfg.eig_tol
                values = self._compute(m, context, m.final_stream or m.name)
                for column in m.columns:
                    if column.name not in values:
                        continue
                    estimate = values[column.name]
                    record[column.name] = estimate.value
                    record.update({extra: values[extra] for extra in column.extra(cfg, self.model)})
                    if column.with_se:
                        record[f"{column.name}_se"] = estimate.se
        return record


def _row_values(m, values: dict, cfg, model) -> dict:
    """results.txt values of one measurement's output: each column's value (and its ``extra``
    columns), ``_se`` and ``_n`` where it has a standard error, ``_seconds`` and ``_hvps``."""
    row = {}
    for column in m.columns:
        estimate: Estimate | None = values.get(column.name)
        if estimate is None:
            continue
        name = column.name
        row.update({f"{name}_seconds": estimate.seconds, f"{name}_hvps": estimate.hvps})
        if column.valued:
            row[name] = estimate.value
        row.update({extra: values[extra] for extra in column.extra(cfg, model)})
        if column.with_se:
            row.update({f"{name}_se": estimate.se, f"{name}_n": estimate.n})
    return row


def load_param_file(path: str, model) -> torch.Tensor:
    """The trainable parameters stored in the state dict at ``path``, as a flat vector on the model's device.

    Every mistake (missing or unreadable file, keys or shapes of another model, NaN or
    infinite values) is a one-line UserError.
    """
    fix = "pass a file written by torch.save(model.state_dict()) for this model"
    if not os.path.isfile(path):
        raise UserError(f"--param-file {path} does not exist; {fix}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"--param-file {path} cannot be read as a state dict ({type(exc).__name__}); {fix}")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--param-file {path} is not a state dict of tensors; {fix}")
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    known = set(model.state_dict())
    missing = [name for name, _ in params if name not in state]
    foreign = [name for name in state if name not in known]
    if missing or foreign:
        wrong = ", ".join((missing + foreign)[:3])
        raise UserError(f"--param-file {path} has the keys of another model (missing or unknown: {wrong}); {fix}")
    for name, p in params:
        if tuple(state[name].shape) != tuple(p.shape):
            raise UserError(f"--param-file {path}: {name} has shape {tuple(state[name].shape)}, the model's is "
                            f"{tuple(p.shape)}; {fix}")
        if not torch.isfinite(state[name]).all():
            raise UserError(f"--param-file {path}: {name} holds NaN or infinite values; pass finite parameters")
    reference = params[0][1]
    return torch.cat([state[name].reshape(-1) for name, _ in params]).to(device=reference.device, dtype=reference.dtype)
