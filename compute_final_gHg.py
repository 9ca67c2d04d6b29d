"""The gHg family at a run's final checkpoint, for the training batch size and a list of others.

    python compute_final_gHg.py                            # the newest run under $RESULTS
    python compute_final_gHg.py RUN_DIR --batch-sizes 8 32 128

For every batch size b (the training batch size always among them): Batch Sharpness
E_B[g_BᵀH_Bg_B/‖g_B‖²], the ratio of means E_B[g_BᵀH_Bg_B]/E_B[‖g_B‖²] and GNI
E_B[g_BᵀHg_B]/‖g‖², each with standard error and sample count. GNI comes from
GNI(b) = (gᵀHg + c_b tr(HS))/‖g‖², c_b = (n−b)/(b(n−1)), with one estimate of tr(HS) for all b
(``gni_method`` "tr(HS) identity"); models with BatchNorm, where g_B is not a mean of
per-sample gradients, measure it at each b separately ("per batch size"). Writes ``final_ghg.json`` (keyed by batch size) and ``final_ghg.csv`` into the run
folder or ``--out DIR``, and prints a table.
"""

import json
import os
import sys

import pandas as pd
from tqdm import tqdm

from utils.analysis import (FINAL_MAX_SAMPLES, check_batch_sizes, default_batch_sizes, estimates_at_sample_limit,
                            ghg_family, ghg_record, gni_all_batch_sizes, stability_label, stability_threshold)
from utils.errors import UserError
from utils.runs import DTYPES, allowed_changes, build_analysis_parser, load_weights, measure_newest_states, rebuild

PROG = "compute_final_gHg.py"


def build_parser():
    p = build_analysis_parser(PROG, "Batch Sharpness, its ratio-of-means form and GNI at the final checkpoint of runs.",
                              default_latest=True, rebuilds=True)
    g = p.add_argument_group("measurement")
    g.add_argument("--batch-sizes", type=int, nargs="+", default=None, metavar="B",
                   help="batch sizes to measure besides the training batch size (default: powers of two up to n)")
    g.add_argument("--max-samples", type=int, default=FINAL_MAX_SAMPLES,
                   help="at most this many random batches per estimate; each stops at its standard-error target first")
    g.add_argument("--hvp-chunk", type=int, default=None, help="samples per chunk of full-batch Hessian products (default: the run's)")
    g.add_argument("--seed", type=int, default=None, help="seed of the random batches (default: the run's --measure-seed)")
    g.add_argument("--dtype", choices=DTYPES, default="float32", help="precision of the measurements (default float32, as in training)")
    g.add_argument("--exact-measurements", action="store_true",
                   help="measure by the plain double-backward path instead of the fast one (same values to round-off; for checking)")
    return p


def check_args(args) -> None:
    if args.max_samples < 2:
        raise UserError(f"--max-samples must be at least 2, got {args.max_samples}")
    if args.hvp_chunk is not None and args.hvp_chunk < 1:
        raise UserError(f"--hvp-chunk must be at least 1, got {args.hvp_chunk}")


def measure_run(run, checkpoint: str, args) -> dict:
    """The contents of final_ghg.json for one run."""
    setup = rebuild(run, cpu=args.cpu, device=args.device, dtype=DTYPES[args.dtype], allow_changed=allowed_changes(args))
    step = load_weights(setup, checkpoint)
    X, Y = setup.data.X_train, setup.data.Y_train
    n = X.shape[0]
    sizes = (check_batch_sizes([*args.batch_sizes, run.cfg.batch], n) if args.batch_sizes
             else default_batch_sizes(n, run.cfg.batch))
    seed = run.cfg.measure_seed if args.seed is None else args.seed
    chunk_size = args.hvp_chunk or run.cfg.hvp_chunk
    gni = gni_all_batch_sizes(setup.model, setup.loss_fn, X, Y, sizes, measure_seed=seed, step=step,
                              chunk_size=chunk_size, max_samples=args.max_samples, exact=args.exact_measurements)
    by_size = {}
    for b in tqdm(sizes, desc=run.name, unit="batch size", disable=args.quiet):
        estimates = ghg_family(setup.model, setup.loss_fn, X, Y, b, measure_seed=seed, step=step,
                               chunk_size=chunk_size, max_samples=args.max_samples, gni=None if gni is None else gni[b],
                               exact=args.exact_measurements)
        by_size[str(b)] = ghg_record(estimates)
    return {"step": step, "checkpoint": os.path.basename(checkpoint), "num_train": n, "training_batch": run.cfg.batch,
            "measure_seed": seed, "dtype": args.dtype, "exact_measurements": args.exact_measurements,
            "device": str(setup.device), "threshold": stability_threshold(run.cfg),
            "threshold_label": stability_label(run.cfg),
            "gni_method": "per batch size" if gni is None else "tr(HS) identity", "batch_sizes": by_size}


def ghg_frame(record: dict) -> pd.DataFrame:
    """final_ghg.json as a table, one row per batch size."""
    rows = [{"batch_size": int(b), **values} for b, values in record["batch_sizes"].items()]
    return pd.DataFrame(rows)


def table(record: dict) -> str:
    frame = ghg_frame(record)
    columns = ["batch_size"] + [c for name in ("batch_sharpness", "batch_sharpness_ratio", "gni")
                                for c in (name, f"{name}_se", f"{name}_n")]
    return frame[columns].to_string(index=False, float_format=lambda v: f"{v:.5g}")


def measure(run, checkpoint: str, state: dict, args) -> tuple[int, dict[str, str], list[str]]:
    """A run's newest checkpoint: the step measured, the files and the report lines
    (:func:`~utils.runs.measure_newest_states`)."""
    record = {**measure_run(run, checkpoint, args), **state}
    files = {"final_ghg.json": json.dumps(record, indent=2) + "\n", "final_ghg.csv": ghg_frame(record).to_csv(index=False)}
    report = [f"{run.run_dir} at step {record['step']} (training batch {run.cfg.batch}, "
              f"{record['threshold_label']} = {record['threshold']:.4g})", table(record)]
    capped = estimates_at_sample_limit(record, args.max_samples)
    report += [f"note: {line}" for line in capped]
    if capped:
        report.append("note: pass a larger --max-samples for estimates that reach their standard-error targets")
    return record["step"], files, report


def main(argv=None) -> int:
    return measure_newest_states(PROG, argv, build_parser, check_args, measure)


if __name__ == "__main__":
    sys.exit(main())
