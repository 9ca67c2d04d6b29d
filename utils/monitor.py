"""Which curvature measurements run at a step, and the results.txt columns they fill.

The training loop asks :class:`Monitor` for its columns once and calls :meth:`Monitor.measure`
every step with the parameters *before* that step's update; the monitor consults the schedule
and calls the measurement functions of :mod:`utils.measures`. No measurement maths lives here.
"""

from __future__ import annotations

import copy
import os
import warnings
import zlib

import torch

from utils import measures, schedule
from utils.errors import UserError
from utils.estimators import measurement_generator
from utils.hvp import flat_params

# The measurements beyond the core ones, by RunConfig flag: their columns and whether each
# column has a standard error (then also <column>_se and <column>_n).
FAMILY_COLUMNS = {
    "batch_sharpness_ratio": (("batch_sharpness_ratio", True),),
    "batch_lambdamax": (("batch_lambda_max", True),),
    "hessian_trace": (("hessian_trace", True),),
    "gauss_newton": (("gn_lambda_max", False), ("gn_batch_sharpness", True)),
    "gradient_norm": (("grad_norm_sq_batch", True), ("grad_norm_sq_full", False)),
    "momentum_sharpness": (("momentum_sharpness", True),),
    "preconditioned_sharpness": (("preconditioned_sharpness", False),),
    "param_distance": (("param_distance", False),),
}
_WITH_SE = {column: with_se for columns in FAMILY_COLUMNS.values() for column, with_se in columns}

# Each measurement gets its own random stream so enabling one never changes another's batches.
_STREAM = {name: zlib.crc32(name.encode()) % 1000
           for name in ("lambdamax", "batch_sharpness", "step_sharpness", "gni", "final", "final_gni", *FAMILY_COLUMNS)}


def stream_generator(measure_seed: int, step: int, name: str, device="cpu"):
    """The generator of measurement ``name`` at ``step``: a pure function of (seed, step, name)."""
    return measurement_generator(measure_seed * 1000 + _STREAM[name], step, device=device)


def measurement_columns(cfg) -> list[str]:
    """results.txt columns of the measurements enabled in ``cfg``, in a fixed order."""
    columns = []
    if cfg.lambdamax:
        columns.append("lambda_max")
        columns += [f"lambda_{i}" for i in range(2, cfg.num_eigenvalues + 1)]
        columns += ["lambda_max_seconds", "lambda_max_hvps"]
    if cfg.batch_sharpness:
        columns += ["batch_sharpness", "batch_sharpness_se", "batch_sharpness_n", "batch_sharpness_seconds", "batch_sharpness_hvps"]
    if cfg.step_sharpness:
        columns += ["step_sharpness", "step_sharpness_seconds", "step_sharpness_hvps"]
    if cfg.gni:
        columns += ["gni", "gni_se", "gni_n", "gni_seconds", "gni_hvps"]
    for flag, family in FAMILY_COLUMNS.items():
        if getattr(cfg, flag):
            for name, with_se in family:
                columns += [name] + ([f"{name}_se", f"{name}_n"] if with_se else []) + [f"{name}_seconds", f"{name}_hvps"]
    return columns


def measurement_schedule(cfg, total_steps: int) -> dict:
    """The cadence of every enabled measurement (recorded in config.json).

    ``--<name>-every`` beats ``--measure-every``; without either, a default that is dense
    early and sparser later, sized to the run length (cheap step sharpness more often).
    """
    plan = {}
    defaults = {
        "lambdamax": schedule.dense_early(total_steps, 6, 20),
        "batch_sharpness": schedule.dense_early(total_steps, 6, 20),
        "step_sharpness": schedule.dense_early(total_steps, 20, 180),
        "gni": schedule.dense_early(total_steps, 5, 20),
        "batch_sharpness_ratio": schedule.dense_early(total_steps, 6, 20),
        "batch_lambdamax": schedule.dense_early(total_steps, 5, 20),
        "hessian_trace": schedule.dense_early(total_steps, 5, 20),
        "gauss_newton": schedule.dense_early(total_steps, 6, 20),
        "gradient_norm": schedule.dense_early(total_steps, 20, 180),
        "momentum_sharpness": schedule.dense_early(total_steps, 6, 20),
        "preconditioned_sharpness": schedule.dense_early(total_steps, 6, 20),
        "param_distance": schedule.dense_early(total_steps, 50, 100),
    }
    for name, default in defaults.items():
        if not getattr(cfg, name):
            continue
        override = getattr(cfg, f"{name}_every") or cfg.measure_every
        plan[name] = schedule.every(override) if override else default
    return plan


class Monitor:
    """Runs the scheduled measurements of one step and returns their column values."""

    def __init__(self, cfg, total_steps: int, model, loss_fn, X, Y, optimizer=None):
        self.cfg = cfg
        self.model, self.loss_fn, self.X, self.Y = model, loss_fn, X, Y
        self.optimizer = optimizer  # its momentum buffers / Adam moments shape the update measured
        self.columns = measurement_columns(cfg)
        self.schedule = measurement_schedule(cfg, total_steps)
        self.eigenvectors = None  # warm start for the next eigen-solve; saved in checkpoints
        # theta_0 of --param-distance: the model as built from the config, before a checkpoint
        # is restored, so resumed and forked runs measure from the same initialisation.
        self.reference = None
        if cfg.param_distance:
            self.reference = load_param_file(cfg.param_file, model) if cfg.param_file else flat_params(model)

    def _generator(self, step, name):
        return stream_generator(self.cfg.measure_seed, step, name, device=self.X.device)

    def measure(self, step: int, xb, yb) -> dict:
        cfg, row = self.cfg, {}
        if schedule.is_due(self.schedule.get("lambdamax"), step):
            row.update(self.lambda_max(step, cfg.eig_tol))
        if schedule.is_due(self.schedule.get("batch_sharpness"), step):
            est = measures.batch_sharpness(self.model, self.loss_fn, self.X, self.Y, cfg.batch,
                                           generator=self._generator(step, "batch_sharpness"),
                                           exact=cfg.exact_measurements)
            row.update(_estimate_columns("batch_sharpness", est, with_se=True))
        if schedule.is_due(self.schedule.get("step_sharpness"), step):
            est = measures.step_sharpness(self.model, self.loss_fn, xb, yb, exact=cfg.exact_measurements)
            row.update(_estimate_columns("step_sharpness", est, with_se=False))
        if schedule.is_due(self.schedule.get("gni"), step):
            est = measures.gni(self.model, self.loss_fn, self.X, self.Y, cfg.batch,
                               generator=self._generator(step, "gni"), chunk_size=cfg.hvp_chunk,
                               exact=cfg.exact_measurements)
            row.update(_estimate_columns("gni", est, with_se=True))
        for flag in FAMILY_COLUMNS:
            if schedule.is_due(self.schedule.get(flag), step):
                for name, est in self.family(flag, step, cfg.eig_tol).items():
                    row.update(_estimate_columns(name, est, with_se=_WITH_SE[name]))
        return row

    def family(self, flag: str, step: int, tol: float) -> dict:
        """{column: Estimate} of the measurement behind ``flag`` (eigen-solves to ``tol``)."""
        cfg, data = self.cfg, (self.model, self.loss_fn, self.X, self.Y)
        generator = self._generator(step, flag)
        if flag == "batch_sharpness_ratio":
            return {"batch_sharpness_ratio": measures.batch_sharpness_ratio(*data, cfg.batch, generator=generator,
                                                                            exact=cfg.exact_measurements)}
        if flag == "batch_lambdamax":
            return {"batch_lambda_max": measures.batch_lambda_max(*data, cfg.batch, generator=generator, tol=tol,
                                                                  exact=cfg.exact_measurements)}
        if flag == "hessian_trace":
            return {"hessian_trace": measures.hessian_trace(*data, generator=generator, chunk_size=cfg.hvp_chunk,
                                                            exact=cfg.exact_measurements)}
        if flag == "gauss_newton":
            eig, top = measures.gn_lambda_max(*data, tol=tol, chunk_size=cfg.hvp_chunk, generator=generator)
            _warn_unconverged(step, "gn_lambda_max", eig, tol)
            return {"gn_lambda_max": top,
                    "gn_batch_sharpness": measures.gn_batch_sharpness(*data, cfg.batch, generator=generator)}
        if flag == "gradient_norm":
            batch, full = measures.gradient_norms(*data, cfg.batch, generator=generator, chunk_size=cfg.hvp_chunk)
            return {"grad_norm_sq_batch": batch, "grad_norm_sq_full": full}
        if flag == "momentum_sharpness":
            return {"momentum_sharpness": measures.momentum_sharpness(*data, cfg.batch, optimizer=self.optimizer,
                                                                      generator=generator)}
        if flag == "preconditioned_sharpness":
            if not self.optimizer.state:  # Adam has no second moments before its first step
                return {}
            eig, est = measures.preconditioned_sharpness(*data, optimizer=self.optimizer, tol=tol,
                                                         chunk_size=cfg.hvp_chunk, generator=generator,
                                                         exact=cfg.exact_measurements)
            _warn_unconverged(step, "preconditioned_sharpness", eig, tol)
            return {"preconditioned_sharpness": est}
        if flag == "param_distance":
            return {"param_distance": measures.param_distance(self.model, self.reference)}
        raise ValueError(f"unknown measurement {flag!r}")

    def lambda_max(self, step: int, tol: float, model=None) -> dict:
        """Top eigenvalues of H on the training set; ``model`` (default: the training model) may be a float64 copy."""
        cfg = self.cfg
        eig, est = measures.lambda_max(
            model or self.model, self.loss_fn, self.X, self.Y, k=cfg.num_eigenvalues, tol=tol,
            chunk_size=cfg.hvp_chunk, warm_start=self.eigenvectors,
            generator=self._generator(step, "lambdamax"), method=cfg.eig_method, exact=cfg.exact_measurements)
        _warn_unconverged(step, "lambda_max", eig, tol)
        self.eigenvectors = eig.vectors.detach().to(next(self.model.parameters()).dtype)
        row = {"lambda_max": float(eig.values[0]), "lambda_max_seconds": est.seconds, "lambda_max_hvps": est.hvps}
        for i in range(2, cfg.num_eigenvalues + 1):
            row[f"lambda_{i}"] = float(eig.values[i - 1])
        return row

    def final(self, step: int) -> dict:
        """End-of-run lambda_max (and lambda_2..k, tol 1e-4), Batch Sharpness and GNI: the contents of final.json.

        Float32 Hessian products stall near a relative residual of 1e-4, so the final
        eigen-solve runs on a float64 copy of the model.
        """
        cfg = self.cfg
        top = self.lambda_max(step, min(cfg.eig_tol, 1e-4), model=copy.deepcopy(self.model).double())
        bs = measures.batch_sharpness(self.model, self.loss_fn, self.X, self.Y, cfg.batch,
                                      generator=self._generator(step, "final"), exact=cfg.exact_measurements)
        gni = measures.gni(self.model, self.loss_fn, self.X, self.Y, cfg.batch,
                           generator=self._generator(step, "final_gni"), chunk_size=cfg.hvp_chunk,
                           exact=cfg.exact_measurements)
        record = {"step": step, "lambda_max": top["lambda_max"],
                  **{f"lambda_{i}": top[f"lambda_{i}"] for i in range(2, cfg.num_eigenvalues + 1)},
                  "batch_sharpness": bs.value, "batch_sharpness_se": bs.se, "gni": gni.value, "gni_se": gni.se}
        for flag in FAMILY_COLUMNS:
            if getattr(cfg, flag):
                for name, est in self.family(flag, step, min(cfg.eig_tol, 1e-4)).items():
                    record[name] = est.value
                    if _WITH_SE[name]:
                        record[f"{name}_se"] = est.se
        return record


def _warn_unconverged(step: int, name: str, eig, tol: float) -> None:
    if not eig.converged:
        warnings.warn(f"step {step}: {name} solver stopped at relative residual {float(eig.residuals.max()):.2e} "
                      f"above --eig-tol {tol:g} after {eig.matvecs} products")


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


def _estimate_columns(name: str, est, with_se: bool) -> dict:
    row = {name: est.value, f"{name}_seconds": est.seconds, f"{name}_hvps": est.hvps}
    if with_se:
        row[f"{name}_se"] = est.se
        row[f"{name}_n"] = est.n
    return row
