"""Which curvature measurements run at a step, and the results.txt columns they fill.

The training loop asks :class:`Monitor` for its columns once and calls :meth:`Monitor.measure`
every step with the parameters *before* that step's update; the monitor consults the schedule
and calls the measurement functions of :mod:`utils.measures`. No measurement maths lives here.
"""

from __future__ import annotations

import warnings
import zlib

from utils import measures, schedule
from utils.estimators import measurement_generator

# Each measurement gets its own random stream so enabling one never changes another's batches.
_STREAM = {name: zlib.crc32(name.encode()) % 1000 for name in ("lambdamax", "batch_sharpness", "step_sharpness", "gni", "final")}


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
    return columns


def measurement_schedule(cfg, total_steps: int) -> dict:
    """The cadence of every enabled measurement (recorded in config.json).

    ``--<name>-every`` beats ``--measure-every``; without either, a default that is dense
    early and sparser later, sized to the run length (cheap step sharpness more often).
    """
    plan = {}
    defaults = {
        "lambdamax": schedule.dense_early(total_steps, 10, 40),
        "batch_sharpness": schedule.dense_early(total_steps, 10, 40),
        "step_sharpness": schedule.dense_early(total_steps, 20, 180),
        "gni": schedule.dense_early(total_steps, 5, 20),
    }
    for name, default in defaults.items():
        if not getattr(cfg, name):
            continue
        override = getattr(cfg, f"{name}_every") or cfg.measure_every
        plan[name] = schedule.every(override) if override else default
    return plan


class Monitor:
    """Runs the scheduled measurements of one step and returns their column values."""

    def __init__(self, cfg, total_steps: int, model, loss_fn, X, Y):
        self.cfg = cfg
        self.model, self.loss_fn, self.X, self.Y = model, loss_fn, X, Y
        self.columns = measurement_columns(cfg)
        self.schedule = measurement_schedule(cfg, total_steps)
        self.eigenvectors = None  # warm start for the next eigen-solve; saved in checkpoints

    def _generator(self, step, name):
        return stream_generator(self.cfg.measure_seed, step, name, device=self.X.device)

    def measure(self, step: int, xb, yb) -> dict:
        cfg, row = self.cfg, {}
        if schedule.is_due(self.schedule.get("lambdamax"), step):
            row.update(self.lambda_max(step, cfg.eig_tol))
        if schedule.is_due(self.schedule.get("batch_sharpness"), step):
            est = measures.batch_sharpness(self.model, self.loss_fn, self.X, self.Y, cfg.batch,
                                           generator=self._generator(step, "batch_sharpness"))
            row.update(_estimate_columns("batch_sharpness", est, with_se=True))
        if schedule.is_due(self.schedule.get("step_sharpness"), step):
            est = measures.step_sharpness(self.model, self.loss_fn, xb, yb)
            row.update(_estimate_columns("step_sharpness", est, with_se=False))
        if schedule.is_due(self.schedule.get("gni"), step):
            est = measures.gni(self.model, self.loss_fn, self.X, self.Y, cfg.batch,
                               generator=self._generator(step, "gni"), chunk_size=cfg.hvp_chunk)
            row.update(_estimate_columns("gni", est, with_se=True))
        return row

    def lambda_max(self, step: int, tol: float) -> dict:
        cfg = self.cfg
        eig, est = measures.lambda_max(
            self.model, self.loss_fn, self.X, self.Y, k=cfg.num_eigenvalues, tol=tol,
            chunk_size=cfg.hvp_chunk, warm_start=self.eigenvectors,
            generator=self._generator(step, "lambdamax"), method=cfg.eig_method)
        if not eig.converged:
            warnings.warn(f"step {step}: lambda_max solver stopped at relative residual {float(eig.residuals.max()):.2e} "
                          f"above --eig-tol {tol:g} after {eig.matvecs} Hessian-vector products")
        self.eigenvectors = eig.vectors.detach()
        row = {"lambda_max": float(eig.values[0]), "lambda_max_seconds": est.seconds, "lambda_max_hvps": est.hvps}
        for i in range(2, cfg.num_eigenvalues + 1):
            row[f"lambda_{i}"] = float(eig.values[i - 1])
        return row

    def final(self, step: int) -> dict:
        """End-of-run lambda_max (tol 1e-4), Batch Sharpness and GNI: the contents of final.json."""
        cfg = self.cfg
        top = self.lambda_max(step, min(cfg.eig_tol, 1e-4))
        bs = measures.batch_sharpness(self.model, self.loss_fn, self.X, self.Y, cfg.batch,
                                      generator=self._generator(step, "final"))
        gni = measures.gni(self.model, self.loss_fn, self.X, self.Y, cfg.batch,
                           generator=self._generator(step + 1, "final"), chunk_size=cfg.hvp_chunk)
        return {"step": step, "lambda_max": top["lambda_max"], "batch_sharpness": bs.value,
                "batch_sharpness_se": bs.se, "gni": gni.value, "gni_se": gni.se}


def _estimate_columns(name: str, est, with_se: bool) -> dict:
    row = {name: est.value, f"{name}_seconds": est.seconds, f"{name}_hvps": est.hvps}
    if with_se:
        row[f"{name}_se"] = est.se
        row[f"{name}_n"] = est.n
    return row
