"""Sharpness plateaus over a group of runs (a batch-size or step-size sweep) and the gap between them.

    python sharpness_gap.py $RESULTS/digits_mlp            # every run below that folder
    python sharpness_gap.py --dataset digits --lr 0.05     # filters over $RESULTS

Per run: the plateau of λ_max and of Batch Sharpness (the median over the last ``--tail``
fraction of training, or final_fullbs.json / final_ghg.json / final.json when present), their
gap and the optimiser's stability line (2/η for SGD). Writes ``sharpness_gap.csv`` and
``sharpness_gap.png`` / ``.pdf`` (both sharpnesses and the gap against batch size, one line per
step size), and prints the table, into the run folder or ``--out DIR`` (which runs spread over
several folders need). Several runs without ``--out`` write ``sharpness_gap_<hash>.*`` (8 hex
digits naming the set of runs, so different selections never overwrite each other) into the
folder that directly holds them all (a ``<dataset>_<model>`` folder, a sweep's ``runs/``).
"""

import math
import os
import sys

import pandas as pd

from utils.analysis import FINAL_FILES, current_final_records, sharpness_plateaus, tail_reaching_last
from utils.cli import run_cli
from utils.errors import UserError
from utils.plotting import dynamics_label, full_batch, plot_sharpness_gap, render_figure, write_figure
from utils.runs import (SUMMARY_FIX, analysis_folder, build_analysis_parser, read_optional_json, read_run_results,
                        runs_from_args, selection_stem, write_text_files)

PROG = "sharpness_gap.py"
FIX = {"lambda_max": "train with --lambdamax or --final, or run compute_final_fullbs.py on it",
       "batch_sharpness": "train with --batch-sharpness or --final, or run compute_final_gHg.py on it"}


def build_parser():
    p = build_analysis_parser(PROG, "Plateaus of λ_max and Batch Sharpness over a group of runs, and their gap. "
                                    "Writes sharpness_gap.csv/.png/.pdf; several runs without --out write "
                                    "sharpness_gap_<hash>.*, <hash> being 8 hex digits of the SHA-1 of the run "
                                    "folders' sorted relative paths.",
                              default_latest=False, rebuilds=False)
    g = p.add_argument_group("plateaus")
    g.add_argument("--tail", type=float, default=0.2, help="median over this last fraction of training (default 0.2)")
    g.add_argument("--tail-only", action="store_true", help="always use results.txt, ignore final*.json files")
    g.add_argument("--dpi", type=int, default=150, help="resolution of the PNG (default 150)")
    return p


def run_row(run, tail: float, tail_only: bool) -> dict:
    """One row of sharpness_gap.csv."""
    frame = read_run_results(run.run_dir)
    if frame.empty:
        raise UserError(f"{run.run_dir}/results.txt has no rows yet; let the run train first")
    jsons = {}
    if not tail_only:
        final_step = (read_optional_json(run.run_dir, "summary.json", fix=SUMMARY_FIX) or {}).get("final_step")
        found = {name: read_optional_json(run.run_dir, f"{name}.json") for name in FINAL_FILES}
        jsons, notes = current_final_records(found, final_step)
        for note in notes:
            print(f"note: {os.path.join(run.run_dir, note)}", file=sys.stderr)
    plateaus = sharpness_plateaus(run.cfg, frame, tail=tail, final=jsons.get("final"),
                                  fullbs=jsons.get("final_fullbs"), ghg=jsons.get("final_ghg"))
    for name, fix in FIX.items():
        if plateaus[f"{name}_count"] == 0:
            last = tail_reaching_last(frame, name)
            if last is None:
                raise UserError(f"{run.run_dir} has no {name} in the last {tail:g} of training; {fix}")
            steps_trained = int(frame["step"].max()) + 1
            raise UserError(f"{run.run_dir} has no {name} in the last {tail:g} of training (steps from "
                            f"{math.ceil((1 - tail) * steps_trained)} of {steps_trained}); its last {name} is at step "
                            f"{last[0]}: pass --tail {last[1]:g} to include it, or measure more often (--measure-every)")
    cfg = run.cfg
    optimiser = "adam" if cfg.adam else ("nesterov" if cfg.nesterov else ("momentum" if cfg.momentum else "sgd"))
    return {"run_dir": run.run_dir, "dataset": cfg.dataset, "model": cfg.model, "lr": cfg.lr, "batch": cfg.batch,
            "optimizer": optimiser, "momentum": cfg.momentum, "dynamics": dynamics_label(cfg), "full_batch": full_batch(run),
            "steps_logged": int(frame["step"].max()) + 1, **plateaus}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)

    def work():
        args = build_parser().parse_args(argv)
        if not 0 < args.tail <= 1:
            raise UserError(f"--tail must be in (0, 1], got {args.tail}")
        if args.dpi < 10:
            raise UserError(f"--dpi must be at least 10, got {args.dpi}")
        runs = runs_from_args(args, default_latest=False)
        table = pd.DataFrame([run_row(run, args.tail, args.tail_only) for run in runs])
        table = table.sort_values(["lr", "batch"], kind="stable")
        images = render_figure(plot_sharpness_gap(table), dpi=args.dpi)
        folder = analysis_folder(runs, args.out)
        stem = selection_stem("sharpness_gap", runs, args.out)
        # The files come before the table: a reader that stops early (| head) must not cost them.
        written = write_text_files({os.path.join(folder, f"{stem}.csv"): table.to_csv(index=False)})
        written += write_figure(images, folder, stem)
        shown = ["lr", "batch", "optimizer", "lambda_max", "batch_sharpness", "batch_sharpness_se", "gap", "threshold"]
        if (table["dynamics"] != "SGD").any():
            shown.insert(2, "dynamics")
        print(table[shown].to_string(index=False, float_format=lambda v: f"{v:.5g}"))
        for path in written:
            print(f"wrote {path}")
        return 0

    return run_cli(work, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
