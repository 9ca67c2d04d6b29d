"""Post-training analysis: stability thresholds, end-of-run curvature and sharpness plateaus.

Pure functions over a model and its data, or over a run's results table; the scripts
``compute_final_fullbs.py``, ``compute_final_gHg.py`` and ``sharpness_gap.py`` only select
runs, call these and write files. Measurements come from :mod:`utils.measures`; their Monte
Carlo batches from :func:`utils.estimators.measurement_generator`, so every number here can be
recomputed exactly.
"""

from __future__ import annotations

import math

from utils import measures, spectrum
from utils.config import ADAM_BETAS
from utils.errors import UserError
from utils.estimators import BATCH_SHARPNESS_REL_SE, GNI_REL_SE, MAX_SAMPLES, Estimate, measurement_generator
from utils.models import has_batchnorm

ADAM_BETA1 = ADAM_BETAS[0]
# Relative residual of the end-of-run eigen-solves of compute_final_fullbs.py, in float64.
FULL_BATCH_TOL = 1e-5
GHG_QUANTITIES = ("batch_sharpness", "batch_sharpness_ratio", "gni")
# compute_final_gHg.py's cap on the batches of one estimate: ten times the cap of measurements
# during training, since at b <= 16 the per-batch quotients spread by a quarter of their mean and
# 0.5 % needs several thousand batches (2,300 to 4,600 at b = 8 and 16 at the end of the Quick
# start's b = 16 run).
FINAL_MAX_SAMPLES = 10 * MAX_SAMPLES


def stability_threshold(cfg) -> float:
    """The largest curvature along which the run's optimiser is stable on a quadratic.

    For L = (lambda / 2) x^2 the iteration is linear and diverges once lambda exceeds
        SGD                          2 / eta
        heavy-ball momentum mu       (2 + 2 mu) / eta
        Nesterov momentum mu         (2 + 2 mu) / (eta (1 + 2 mu))
        Adam, beta_1                 (2 + 2 beta_1) / ((1 - beta_1) eta) = 38 / eta at beta_1 = 0.9,
                                     for the preconditioned Hessian (Cohen et al. 2022).
    """
    if cfg.adam:
        return (2 + 2 * ADAM_BETA1) / ((1 - ADAM_BETA1) * cfg.lr)
    if cfg.nesterov:
        return (2 + 2 * cfg.momentum) / (cfg.lr * (1 + 2 * cfg.momentum))
    return (2 + 2 * cfg.momentum) / cfg.lr


def hessian_threshold(cfg) -> float:
    """:func:`stability_threshold` where it bounds the Hessian itself; nan for Adam, whose
    threshold bounds the preconditioned Hessian."""
    return math.nan if cfg.adam else stability_threshold(cfg)


def stability_label(cfg) -> str:
    """How :func:`stability_threshold` is written for this optimiser, such as ``2/η``."""
    if cfg.adam:
        return "38/η"
    if cfg.nesterov:
        return "(2+2μ)/(η(1+2μ))"
    return "(2+2μ)/η" if cfg.momentum else "2/η"


def full_batch_sharpness(model, loss_fn, X, Y, *, k=1, tol=FULL_BATCH_TOL, method=None, chunk_size=None,
                         warm_start=None, generator=None, exact=False):
    """Top-k eigenvalues of the full-batch Hessian H = (1/n) sum_i hess l_i, to a relative residual ``tol``.

    Returns (record, EigResult): the record holds ``lambda_max``, ``lambda_2`` ... ``lambda_k``,
    the largest relative residual ||H v - lambda v|| / |lambda|, ``converged``, ``hvps`` and
    ``seconds``; the EigResult's vectors warm-start the next call. ``exact`` multiplies by plain
    double backward instead of the fastest mode for the model and device.
    """
    eig, estimate = measures.lambda_max(model, loss_fn, X, Y, k=k, tol=tol, chunk_size=chunk_size,
                                        warm_start=warm_start, generator=generator, method=method, exact=exact)
    record = {"lambda_max": float(eig.values[0])}
    record.update({f"lambda_{i}": float(eig.values[i - 1]) for i in range(2, k + 1)})
    record.update({"residual": float(eig.residuals.max()), "converged": bool(eig.converged),
                   "hvps": estimate.hvps, "seconds": estimate.seconds})
    return record, eig


def spectrum_record(model, loss_fn, X, Y, cfg, *, lambda_max: float, tol=FULL_BATCH_TOL, chunk_size=None,
                    generator, lambda_min=False, layers=False, density=False, exact=False):
    """The end-of-run measurements of the spectrum beyond its top (:mod:`utils.spectrum`) that are
    asked for: ``lambda_min`` (with ``lambda_min_residual``, relative to max(|lambda_min|,
    lambda_max)), the ``layer_lambda_max/<name>``, ``layer_trace/<name>`` and
    ``layer_trace_se/<name>`` of every block of ``cfg.layer_groups``, and ``density_trace``,
    ``density_trace_se`` and ``density_mass_above`` (above half the run's stability threshold, nan
    for Adam) from ``cfg.density_probes`` probes of ``cfg.density_steps`` steps. ``generator()``
    gives each measurement a fresh generator. Returns (record, SpectralDensity or None)."""
    record, found = {}, None
    if lambda_min:
        eig, estimate = spectrum.lambda_min(model, loss_fn, X, Y, tol=tol, lambda_max=lambda_max, chunk_size=chunk_size,
                                            generator=generator(), exact=exact)
        record.update({"lambda_min": estimate.value, "lambda_min_residual": float(eig.residuals.max()),
                       "lambda_min_hvps": estimate.hvps})
    if layers:
        blocks = spectrum.layer_sharpness(model, loss_fn, X, Y, groups=spectrum.parameter_groups(model, cfg.layer_groups),
                                          generator=generator(), tol=tol, chunk_size=chunk_size, exact=exact)
        for i, name in enumerate(blocks.names):
            record.update({f"layer_lambda_max/{name}": blocks.lambda_max[i], f"layer_trace/{name}": blocks.trace[i],
                           f"layer_trace_se/{name}": blocks.trace_se[i]})
        record["layer_sharpness_hvps"] = blocks.hvps
    if density:
        found = spectrum.spectral_density(model, loss_fn, X, Y, generator=generator(), probes=cfg.density_probes,
                                          steps=cfg.density_steps, chunk_size=chunk_size, exact=exact)
        trace = found.trace()
        record.update({"density_trace": trace.value, "density_trace_se": trace.se,
                       "density_mass_above": found.mass_above(hessian_threshold(cfg) / 2), "density_probes": found.probes,
                       "density_steps": found.nodes.shape[1], "density_hvps": found.hvps})
    return record, found


def default_batch_sizes(n: int, training_batch: int) -> list[int]:
    """Powers of two up to n, and the training batch size."""
    sizes = {2 ** i for i in range(int(math.log2(n)) + 1)} | {training_batch}
    return sorted(s for s in sizes if s <= n)


def check_batch_sizes(sizes, n: int) -> list[int]:
    bad = [b for b in sizes if not 1 <= b <= n]
    if bad:
        raise UserError(f"--batch-sizes {' '.join(map(str, bad))} outside 1..{n} (the training set size); pass sizes in that range")
    return sorted(set(sizes))


def _sample_limits(max_samples) -> dict:
    return {} if max_samples is None else {"max_samples": max_samples, "min_samples": min(20, max_samples)}


def ghg_family(model, loss_fn, X, Y, batch_size: int, *, measure_seed: int, step: int,
               chunk_size=None, max_samples=None, gni: Estimate | None = None,
               exact: bool = False) -> dict[str, Estimate]:
    """The gHg family at one batch size b, each with its standard error and sample count:

        batch_sharpness        E_B[ g_B^T H_B g_B / |g_B|^2 ]      (mean of ratios)
        batch_sharpness_ratio  E_B[ g_B^T H_B g_B ] / E_B[|g_B|^2] (ratio of means)
        gni                    E_B[ g_B^T H g_B ] / |g|^2

    Each estimate draws its batches from a fresh ``measurement_generator(measure_seed, step)``:
    the three share their random batches (common random numbers), so differences between
    them are less noisy than their separate standard errors suggest. ``gni``, when given
    (from :func:`gni_all_batch_sizes`), is used instead of measuring GNI at b alone. ``exact``
    takes the plain double-backward path instead of the fast one (same values to round-off).
    """
    limit = _sample_limits(max_samples)

    def generator():
        return measurement_generator(measure_seed, step, device=X.device)

    if gni is None:
        gni = measures.gni(model, loss_fn, X, Y, batch_size, generator=generator(), chunk_size=chunk_size,
                           exact=exact, **limit)
    return {
        "batch_sharpness": measures.batch_sharpness(model, loss_fn, X, Y, batch_size, generator=generator(),
                                                    exact=exact, **limit),
        "batch_sharpness_ratio": measures.batch_sharpness_ratio(model, loss_fn, X, Y, batch_size,
                                                                generator=generator(), exact=exact, **limit),
        "gni": gni,
    }


def gni_all_batch_sizes(model, loss_fn, X, Y, batch_sizes, *, measure_seed: int, step: int,
                        chunk_size=None, max_samples=None, exact: bool = False) -> dict[int, Estimate] | None:
    """GNI(b) = (g^T H g + c_b tr(HS)) / |g|^2 for every b from one estimate of tr(HS)
    (:func:`utils.measures.gni_by_batch_size`), c_b = (n - b) / (b (n - 1)).

    None where that identity does not hold: with BatchNorm, g_B is not the mean of the
    per-sample gradients of B; with n < 2 there is no noise to sample. On data split over the
    ranks of a launch (:class:`utils.sharded.Rows`) the forms are summed over the ranks
    (:func:`utils.sharded.centred_forms`), with the same batches. The batches come from
    ``measurement_generator(measure_seed, step)``; ``exact`` estimates tr(HS) by double-backward
    Hessian-vector products instead of stacked Gram products.
    """
    if has_batchnorm(model) or X.shape[0] < 2:
        return None
    return measures.gni_by_batch_size(model, loss_fn, X, Y, batch_sizes, chunk_size=chunk_size,
                                      generator=measurement_generator(measure_seed, step, device=X.device),
                                      exact=exact, **_sample_limits(max_samples))


def ghg_record(estimates: dict[str, Estimate]) -> dict:
    """Flat columns <name>, <name>_se, <name>_n, <name>_hvps, <name>_seconds of a gHg family."""
    record = {}
    for name, est in estimates.items():
        record.update({name: est.value, f"{name}_se": est.se, f"{name}_n": est.n,
                       f"{name}_hvps": est.hvps, f"{name}_seconds": est.seconds})
    return record


GHG_REL_SE_TARGETS = {"batch_sharpness": BATCH_SHARPNESS_REL_SE, "batch_sharpness_ratio": BATCH_SHARPNESS_REL_SE,
                      "gni": GNI_REL_SE}


def estimates_at_sample_limit(record: dict, max_samples=None) -> list[str]:
    """One line per estimate of a final_ghg.json record that used every sample it was allowed
    (``max_samples``, else the measurements' default cap) and still misses its standard-error
    target (relative: 0.5 % for the two Batch Sharpness forms, 1 % for GNI)."""
    limit = MAX_SAMPLES if max_samples is None else max_samples
    lines = []
    for b, values in record["batch_sizes"].items():
        for name, target in GHG_REL_SE_TARGETS.items():
            value, se = values[name], values[f"{name}_se"]
            if values[f"{name}_n"] < limit or se <= target * abs(value):
                continue
            error = f"a relative standard error of {abs(se / value):.2%}" if value else f"a standard error of {se:.3g}"
            lines.append(f"{name} at b={b} stopped at the {limit}-sample limit with {error} (target {target:.1%})")
    return lines


def tail_median(frame, column: str, tail: float) -> tuple[float, int]:
    """Median of ``column`` over the rows of the last ``tail`` fraction of training, and their count.

    Training ran steps 0..T-1 (T = last logged step + 1); the window is step >= (1 - tail) T.
    """
    if column not in frame.columns:
        return math.nan, 0
    steps_trained = int(frame["step"].max()) + 1
    window = frame.loc[frame["step"] >= (1 - tail) * steps_trained, column].dropna()
    return (float(window.median()), int(window.size)) if window.size else (math.nan, 0)


def tail_reaching_last(frame, column: str) -> tuple[int, float] | None:
    """The step of the last measurement of ``column`` and the smallest ``tail`` (rounded up to
    two decimals) whose window of :func:`tail_median` includes it; None when it was never measured."""
    if column not in frame.columns:
        return None
    measured = frame.loc[frame[column].notna(), "step"]
    if measured.empty:
        return None
    last, steps_trained = int(measured.max()), int(frame["step"].max()) + 1
    tail = math.ceil(100 * (steps_trained - last) / steps_trained) / 100
    while tail < 1 and (1 - tail) * steps_trained > last:  # rounding must not leave the step outside
        tail += 0.01
    return last, min(round(tail, 2), 1.0)


FINAL_FILES = {"final": "training.py --final", "final_fullbs": "compute_final_fullbs.py", "final_ghg": "compute_final_gHg.py"}


def current_final_records(records: dict, final_step: int | None) -> tuple[dict, list[str]]:
    """The end-of-run records that measured the run's final state, and a note for every other.

    ``records`` maps the names of :data:`FINAL_FILES` (final, final_fullbs, final_ghg) to the
    contents of those files (None when absent); ``final_step`` is summary.json's (None when the
    run has not ended). A record counts only when its ``step`` equals ``final_step``: a file
    measured before the run was resumed and trained on describes an earlier state, and a
    plateau taken from it would be wrong without a sign.
    """
    kept, notes = {}, []
    for name, record in records.items():
        if record is None:
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if final_step is not None and step == final_step:
            kept[name] = record
            continue
        now = f"the run's final step is {final_step}" if final_step is not None else "the run has not finished (no summary.json)"
        notes.append(f"{name}.json measured step {step}, but {now}; ignored as stale (run {FINAL_FILES[name]} again)")
    return kept, notes


def _number(value, source: str, name: str) -> float:
    """A value of an end-of-run file as a float; null (how the files write NaN) is NaN, anything
    else that is not a number is a UserError naming the file."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{source} has {name} = {value!r}, not a number; delete it and recompute it")
    return float(value)


def sharpness_plateaus(cfg, frame, *, tail: float, final=None, fullbs=None, ghg=None) -> dict:
    """Plateau of lambda_max and of Batch Sharpness for one run, their gap and the stability line.

    lambda_max comes from final_fullbs.json, else final.json, else the median of results.txt
    over the last ``tail`` of training; Batch Sharpness from final_ghg.json (at the training
    batch size), else final.json, else that median. ``gap`` = batch_sharpness - lambda_max.
    Each value names its ``*_source`` and the number of values behind it (``*_count``).
    """
    row = {"threshold": stability_threshold(cfg), "threshold_label": stability_label(cfg)}
    by_batch = (ghg or {}).get("batch_sizes")
    own_batch = by_batch.get(str(cfg.batch)) if isinstance(by_batch, dict) else None
    candidates = {
        "lambda_max": [("final_fullbs.json", fullbs), ("final.json", final)],
        "batch_sharpness": [("final_ghg.json", own_batch), ("final.json", final)],
    }
    for name, sources in candidates.items():
        found = next(((source, record) for source, record in sources if isinstance(record, dict) and name in record), None)
        if found:
            source, record = found
            row.update({name: _number(record[name], source, name),
                        f"{name}_se": _number(record.get(f"{name}_se"), source, f"{name}_se"),
                        f"{name}_source": source, f"{name}_count": 1})
        else:
            value, count = tail_median(frame, name, tail)
            row.update({name: value, f"{name}_se": math.nan, f"{name}_source": "results.txt", f"{name}_count": count})
    row["gap"] = row["batch_sharpness"] - row["lambda_max"]
    return row
