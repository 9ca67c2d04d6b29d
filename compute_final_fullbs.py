"""Full-batch sharpness λ_max (or the top k eigenvalues) of the Hessian at a run's final checkpoint.

    python compute_final_fullbs.py                         # the newest run under $RESULTS
    python compute_final_fullbs.py RUN_DIR --num-eigenvalues 3 --all-checkpoints
    python compute_final_fullbs.py RUN_DIR --lambda-min --layers --density

The run is rebuilt from its config.json and checkpoint. Writes ``final_fullbs.json`` (the
final checkpoint) and, with ``--all-checkpoints``, ``fullbs_checkpoints.csv`` (one row per
checkpoint) into the run folder or ``--out DIR``, and prints a table. ``--lambda-min``,
``--layers`` and ``--density`` add the smallest eigenvalue, the curvature of each layer's block
and the eigenvalue density of the final checkpoint to ``final_fullbs.json``; ``--density`` also
writes ``density.csv`` (with the ``step`` measured), ``density_nodes.csv`` and the figure ``density.png`` / ``density.pdf``.
"""

import json
import os
import sys
import warnings

import pandas as pd
from tqdm import tqdm

from utils.analysis import (FULL_BATCH_TOL, full_batch_sharpness, hessian_threshold, spectrum_record, stability_label,
                            stability_threshold)
from utils.eigs import EIG_METHODS
from utils.errors import UserError
from utils.estimators import measurement_generator
from utils.hvp import measurement_hvp_mode
from utils.plotting import plot_density, render_figure
from utils.runs import DTYPES, allowed_changes, build_analysis_parser, checkpoint_list, load_weights, measure_newest_states, rebuild

PROG = "compute_final_fullbs.py"


def build_parser():
    p = build_analysis_parser(PROG, "Full-batch Hessian eigenvalues at the final checkpoint of runs.",
                              default_latest=True, rebuilds=True)
    g = p.add_argument_group("measurement")
    g.add_argument("--num-eigenvalues", type=int, default=1, metavar="K", help="the top K eigenvalues (default 1)")
    g.add_argument("--tol", type=float, default=FULL_BATCH_TOL, help=f"relative residual tolerance (default {FULL_BATCH_TOL:g})")
    g.add_argument("--eig-method", default=None, help=f"one of {', '.join(EIG_METHODS)} (default lanczos, lobpcg for K > 1)")
    g.add_argument("--all-checkpoints", action="store_true", help="every checkpoint, not only the final one")
    g.add_argument("--hvp-chunk", type=int, default=None, help="samples per chunk of Hessian products (default: the run's)")
    g.add_argument("--seed", type=int, default=None, help="seed of the solver's random start (default: the run's --measure-seed)")
    g.add_argument("--dtype", choices=DTYPES, default="float64",
                   help="precision of the Hessian products (default float64: float32 rounding keeps residuals near 1e-4)")
    g.add_argument("--exact-measurements", action="store_true",
                   help="Hessian products by plain double backward instead of the fastest mode (for checking)")
    g = p.add_argument_group("the spectrum beyond its top (final checkpoint)")
    g.add_argument("--lambda-min", action="store_true", help="the smallest (most negative) eigenvalue lambda_min")
    g.add_argument("--layers", action="store_true",
                   help="lambda_max and trace of each layer's diagonal Hessian block (the run's --layer-groups)")
    g.add_argument("--density", action="store_true",
                   help="the eigenvalue density by stochastic Lanczos quadrature (the run's --density-probes and "
                        "--density-steps): density.csv, density_nodes.csv, density.png and .pdf")
    return p


def check_args(args) -> None:
    if args.num_eigenvalues < 1:
        raise UserError(f"--num-eigenvalues must be at least 1, got {args.num_eigenvalues}")
    if not 0 < args.tol < 1:
        raise UserError(f"--tol must be in (0, 1), got {args.tol}")
    if args.eig_method is not None and args.eig_method not in EIG_METHODS:
        raise UserError(f"unknown --eig-method {args.eig_method!r}; choose one of {', '.join(EIG_METHODS)}")
    if args.hvp_chunk is not None and args.hvp_chunk < 1:
        raise UserError(f"--hvp-chunk must be at least 1, got {args.hvp_chunk}")


def measure_run(run, checkpoints, args):
    """One record per checkpoint (step, eigenvalues, residual, cost), each solve warm-started by
    the last, the newest with the measurements of ``--lambda-min``, ``--layers`` and
    ``--density``; the density (or None); the device they were computed on; and the mode of
    the Hessian products."""
    setup = rebuild(run, cpu=args.cpu, device=args.device, dtype=DTYPES[args.dtype], allow_changed=allowed_changes(args))
    seed = run.cfg.measure_seed if args.seed is None else args.seed
    chunk = args.hvp_chunk or run.cfg.hvp_chunk
    X, Y = setup.data.X_train, setup.data.Y_train
    records, previous = [], None
    for _, path in tqdm(checkpoints, desc=run.name, unit="checkpoint", disable=args.quiet or len(checkpoints) == 1):
        step = load_weights(setup, path)
        record, previous = full_batch_sharpness(
            setup.model, setup.loss_fn, X, Y, k=args.num_eigenvalues, tol=args.tol, method=args.eig_method,
            chunk_size=chunk, warm_start=previous, generator=measurement_generator(seed, step, device=setup.device),
            exact=args.exact_measurements)
        if not record["converged"]:
            warnings.warn(f"{run.run_dir} step {step}: the eigen-solver stopped at relative residual "
                          f"{record['residual']:.2e}, above --tol {args.tol:g}")
        records.append({"step": step, "checkpoint": os.path.basename(path), **record})
    spectrum, density = spectrum_record(
        setup.model, setup.loss_fn, X, Y, run.cfg, lambda_max=records[-1]["lambda_max"], tol=args.tol, chunk_size=chunk,
        generator=lambda: measurement_generator(seed, step, device=setup.device), lambda_min=args.lambda_min,
        layers=args.layers, density=args.density, exact=args.exact_measurements)
    records[-1].update(spectrum)
    return records, density, str(setup.device), measurement_hvp_mode(setup.model, setup.device,
                                                                     exact=args.exact_measurements)


def final_record(run, records, args, device, hvp_mode, state) -> dict:
    """The contents of final_fullbs.json: the newest checkpoint's record, the settings of the
    solve, and ``final`` / ``run_status`` (whether that checkpoint is the run's final state)."""
    return {**records[-1], **state, "num_eigenvalues": args.num_eigenvalues, "tol": args.tol,
            "method": args.eig_method or ("lanczos" if args.num_eigenvalues == 1 else "lobpcg"),
            "measure_seed": run.cfg.measure_seed if args.seed is None else args.seed, "dtype": args.dtype, "device": device,
            "exact_measurements": args.exact_measurements, "hvp_mode": hvp_mode,
            "threshold": stability_threshold(run.cfg), "threshold_label": stability_label(run.cfg)}


def measure(run, checkpoint: str, state: dict, args) -> tuple[int, dict[str, str], list[str]]:
    """The newest checkpoint (or, with --all-checkpoints, every one) of a run: the step measured,
    the files and the report lines (:func:`~utils.runs.measure_newest_states`)."""
    checkpoints = checkpoint_list(run) if args.all_checkpoints else [(None, checkpoint)]
    records, density, device, hvp_mode = measure_run(run, checkpoints, args)
    record = final_record(run, records, args, device, hvp_mode, state)
    files = {"final_fullbs.json": json.dumps(record, indent=2) + "\n"}
    if args.all_checkpoints:
        files["fullbs_checkpoints.csv"] = pd.DataFrame(records).to_csv(index=False)
    if density is not None:
        files.update({"density.csv": density.grid_csv(step=record["step"]), "density_nodes.csv": density.nodes_csv()})
        figure = plot_density([(f"{run.name}, step {record['step']}", *density.on_grid(), hessian_threshold(run.cfg),
                                stability_label(run.cfg))])
        files.update({f"density.{fmt}": image for fmt, image in render_figure(figure).items()})
    return record["step"], files, [run.run_dir, table(records)]


def main(argv=None) -> int:
    return measure_newest_states(PROG, argv, build_parser, check_args, measure)


def table(records) -> str:
    frame = pd.DataFrame(records)
    eigenvalues = [c for c in frame.columns if c.startswith("lambda_") and not c.endswith(("_residual", "_hvps"))]
    columns = ["step", *eigenvalues, *(c for c in ("density_trace", "density_mass_above") if c in frame), "residual", "hvps"]
    return frame[columns].to_string(index=False, float_format=lambda v: f"{v:.6g}")


if __name__ == "__main__":
    sys.exit(main())
