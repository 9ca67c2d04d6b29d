"""Figures of training curves from the results.txt of one run, or several overlaid.

    python plot_results.py                                 # the newest run under $RESULTS
    python plot_results.py RUN_A RUN_B --out figures/      # overlay, legend from their configs
    python plot_results.py RUN_A RUN_B --density --out figures/   # their final eigenvalue densities

Panels (those the runs have data for): losses on a log scale, λ_max, Batch Sharpness with its
standard-error band, step sharpness smoothed, GNI, accuracy, with the dashed stability line of
each run's optimiser (2/η for SGD, (2 + 2μ)/η with momentum μ). Overlaid runs whose stability
thresholds differ are drawn divided by them (``--normalize``, chosen with a note; ``--no-normalize``
keeps the raw values), so every run's threshold is 1. Writes ``results.png`` and
``results.pdf`` into the run folder or ``--out DIR``; for several runs ``results_overlay.*`` into
``--out DIR`` (which runs spread over several folders need), or else ``results_overlay_<hash>.*``
(8 hex digits naming the set of runs, so different overlays never overwrite each other) into
the folder that directly holds them all (a ``<dataset>_<model>`` folder, a sweep's ``runs/``).
``--density`` instead draws side by side the eigenvalue density that ``compute_final_fullbs.py
--density`` wrote into each run folder (``density.csv``), as ``density.*`` or ``density_overlay*``.
"""

import argparse
import os
import sys

import pandas as pd

from utils.analysis import hessian_threshold, stability_label
from utils.cli import run_cli
from utils.errors import UserError
from utils.plotting import plot_density, plot_runs, run_labels, run_title, save_figure, thresholds_differ
from utils.runs import (SUMMARY_FIX, analysis_folder, build_analysis_parser, read_optional_json, read_run_results,
                        runs_from_args, selection_stem)

PROG = "plot_results.py"


def build_parser():
    p = build_analysis_parser(PROG, "Plot losses and curvature measurements of runs from their results.txt.",
                              default_latest=True, rebuilds=False)
    g = p.add_argument_group("figure")
    g.add_argument("--smooth", type=int, default=None, metavar="K",
                   help="rolling mean over K measurements for step sharpness (default: a twentieth of them)")
    g.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="divide each curvature curve by its run's stability threshold (eta*lambda/2 for SGD), so every "
                        "run's threshold is 1 (default: only when overlaid runs differ in threshold, with a note)")
    g.add_argument("--density", action="store_true",
                   help="draw each run's final eigenvalue density (from compute_final_fullbs.py --density) side by side")
    g.add_argument("--dpi", type=int, default=150, help="resolution of the PNG (default 150)")
    g.add_argument("--name", default=None, help="file name stem (default results, or for several runs results_overlay, plus _<hash> without "
                        "--out: 8 hex digits of the SHA-1 of the run folders' sorted relative paths)")
    return p


def final_test_accuracy(run) -> tuple[int, float] | None:
    """(final step, test accuracy) from the run's summary.json, None before the run has ended."""
    summary = read_optional_json(run.run_dir, "summary.json", fix=SUMMARY_FIX) or {}
    accuracy, step = summary.get("final_test_accuracy"), summary.get("final_step")
    if not isinstance(accuracy, (int, float)) or not isinstance(step, int):
        return None
    return step, float(accuracy)


def density_panels(runs) -> list[tuple]:
    """(title, eigenvalues, density, threshold, threshold label) of every run from the density.csv
    of compute_final_fullbs.py --density, titled by the run's settings and the step measured
    (density.csv's ``step``; a later compute_final_fullbs.py without --density leaves the file
    as it was), with a note when that is not the run's final step (``final_step`` of summary.json)."""
    titles = run_labels(runs) if len(runs) > 1 else [run_title(runs[0].cfg)]
    panels = []
    for run, title in zip(runs, titles):
        path = os.path.join(run.run_dir, "density.csv")
        if not os.path.isfile(path):
            raise UserError(f"{run.run_dir} has no density.csv; run compute_final_fullbs.py {run.run_dir} --density first")
        try:
            frame = pd.read_csv(path)
            grid, density = frame["eigenvalue"].to_numpy(float), frame["density"].to_numpy(float)
        except (ValueError, KeyError, pd.errors.ParserError):
            raise UserError(f"{path} is not a density table (columns eigenvalue,density); recompute it with "
                            f"compute_final_fullbs.py {run.run_dir} --density") from None
        step = density_step(run, frame)
        panels.append((title if step is None else f"{title}, step {step}", grid, density, hessian_threshold(run.cfg),
                       stability_label(run.cfg)))
    return panels


def density_step(run, frame) -> int | None:
    """The step a density.csv measured, from its ``step`` column (None, with a note, for a file
    written before it had one, or one that is not a step number); a note when the run's final step
    is another."""
    recompute = f"recompute it with compute_final_fullbs.py {run.run_dir} --density"
    path = os.path.join(run.run_dir, "density.csv")
    steps = frame["step"].unique() if "step" in frame else []
    try:
        step = int(steps[0]) if len(steps) == 1 else None
    except (TypeError, ValueError):  # a step that is not a number (edited by hand, nan)
        step = None
    if step is None:
        print(f"note: {path} does not say which step it measured; {recompute}", file=sys.stderr)
        return None
    final_step = (read_optional_json(run.run_dir, "summary.json", fix=SUMMARY_FIX) or {}).get("final_step")
    if final_step is not None and final_step != step:
        print(f"note: {path} measured step {step}, but the run's final step is {final_step}; {recompute}",
              file=sys.stderr)
    return step


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)

    def work():
        args = build_parser().parse_args(argv)
        if args.smooth is not None and args.smooth < 1:
            raise UserError(f"--smooth must be at least 1, got {args.smooth}")
        if args.dpi < 10:
            raise UserError(f"--dpi must be at least 10, got {args.dpi}")
        if args.name is not None and (not args.name or "/" in args.name or args.name.startswith(".")):
            raise UserError(f"--name {args.name!r} must be a plain file name stem such as results")
        runs = runs_from_args(args, default_latest=True)
        if args.density:
            figure, kind = plot_density(density_panels(runs)), "density"
        else:
            figure, kind = training_figure(runs, args), "results"
        folder = analysis_folder(runs, args.out)
        stem = args.name or selection_stem(kind if len(runs) == 1 else f"{kind}_overlay", runs, args.out)
        for path in save_figure(figure, folder, stem, dpi=args.dpi):
            print(f"wrote {path}")
        return 0

    return run_cli(work, prog=PROG)


def training_figure(runs, args):
    """The training curves of ``runs`` (see the module docstring)."""
    frames = [read_run_results(run.run_dir) for run in runs]
    for run, frame in zip(runs, frames):
        if frame.empty:
            raise UserError(f"{run.run_dir}/results.txt has no rows yet; let the run train first")
    normalize = args.normalize
    if normalize is None:
        normalize = thresholds_differ(runs)
        if normalize:
            print("note: the runs differ in their stability thresholds, so curvature panels show each run's values "
                  "divided by its own threshold (threshold = 1); --no-normalize draws the raw values")
    return plot_runs(runs, frames, smooth=args.smooth, normalize=normalize,
                     final_test_accuracy=[final_test_accuracy(run) for run in runs])


if __name__ == "__main__":
    sys.exit(main())
