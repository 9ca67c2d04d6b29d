"""Run a grid of training.py runs, on this machine or as a SLURM job array through submitit.

    python sweep.py --name lr_batch --lr 0.01 0.02 --batch 8 16 --jobs 2 -- --steps 2000 --lambdamax
    python sweep.py status --name lr_batch
    python sweep.py --recipe recipes/gd_vs_sgd.yaml --scale small --jobs 2    # an experiment of the paper

Every training flag followed by several values is a grid axis (or give ``--grid FILE``); the
flags after ``--`` go to every run. The runs live in ``$RESULTS/sweeps/<NAME>/runs/``; running
the same command again skips finished runs and resumes interrupted ones. See README.md.
"""

import shlex
import sys

from utils.cli import run_cli
from utils.sweep import (ENDED, check_existing, dry_run_lines, format_status, prepare_sweep, read_status,
                         refresh_status, require_submitit, resolve_sweep_dir, run_local, sweep_folder)
from utils.recipes import analysis_commands, default_sweep_name, load_recipe, recipe_scale, shared_flags
from utils.sweep_grid import (build_status_parser, define_sweep, grid_from_mapping, load_grid_file, merge_grids,
                              parse_command_line, parse_grid_tokens)


def status(argv: list[str]) -> int:
    args = build_status_parser().parse_args(argv)
    sweep_dir = resolve_sweep_dir(args.sweep_dir, args.name)
    print(format_status(read_status(sweep_dir), sweep_dir))
    return 0


def sweep(argv: list[str]) -> int:
    args, grid_tokens, shared = parse_command_line(argv)
    if args.recipe:
        scale = args.scale or "small"
        recipe_grid, recipe_shared = recipe_scale(load_recipe(args.recipe), args.recipe, scale)
        # The command line's grid flags replace the recipe's values of those flags (in the recipe's
        # order), whether the recipe varies them or shares them.
        given = parse_grid_tokens(grid_tokens)
        grid = {**grid_from_mapping(recipe_grid, args.recipe), **given}
        kept = {key: value for key, value in recipe_shared.items() if str(key).lstrip("-").replace("_", "-") not in given}
        shared = [*shared_flags(kept), *shared]
        args.name = args.name or default_sweep_name(args.recipe, scale)
    else:
        grid = merge_grids(parse_grid_tokens(grid_tokens), load_grid_file(args.grid) if args.grid else {})
    definition = define_sweep(args.name, grid, shared, command_line=["sweep.py", *argv])
    sweep_dir = sweep_folder(args.name)
    if args.dry_run:
        check_existing(sweep_dir, definition)
        print("\n".join(dry_run_lines(sweep_dir, definition)))
        return 0
    if args.executor == "local":
        code = run_local(sweep_dir, prepare_sweep(sweep_dir, definition), args.jobs)
        if code == 0 and args.recipe:
            return run_analysis(analysis_commands(load_recipe(args.recipe), args.recipe, sweep_dir))
        return code

    require_submitit()
    from utils.sweep_slurm import make_executor, submit

    check_existing(sweep_dir, definition)
    executor = make_executor(sweep_dir, args.name, args)
    definition = prepare_sweep(sweep_dir, definition)
    jobs = submit(executor, sweep_dir, definition, args.cpus_per_run, processes=max(1, args.gpus_per_run))
    table = refresh_status(sweep_dir)
    if not jobs:
        print(format_status(table, sweep_dir))
        return 0
    print(f"submitted {len(jobs)} runs as jobs {jobs[0].job_id} .. {jobs[-1].job_id}; follow them with: "
          f"python sweep.py status --name {shlex.quote(args.name)}")
    if args.recipe:
        commands = analysis_commands(load_recipe(args.recipe), args.recipe, sweep_dir)
        print("once the runs have ended, analyse them with:\n" + "\n".join(f"  python {shlex.join(c)}" for c in commands))
    if not args.wait:
        return 0
    failures = 0
    for job in jobs:
        try:
            job.result()
        except Exception as exc:  # the job's own traceback is in its submitit log
            failures += 1
            print(f"job {job.job_id} failed: {str(exc).strip().splitlines()[-1]}", file=sys.stderr)
    table = refresh_status(sweep_dir)
    print(format_status(table, sweep_dir))
    return 1 if failures or any(r["status"] not in ENDED for r in table["runs"]) else 0


def run_analysis(commands: list[list[str]]) -> int:
    """Run a recipe's analysis commands in this process, one after another; the first that fails stops."""
    import compute_final_fullbs
    import compute_final_gHg
    import plot_results
    import sharpness_gap

    scripts = {"sharpness_gap.py": sharpness_gap, "plot_results.py": plot_results,
               "compute_final_gHg.py": compute_final_gHg, "compute_final_fullbs.py": compute_final_fullbs}
    for script, *argv in commands:
        print(f"+ python {shlex.join([script, *argv])}", flush=True)
        code = scripts[script].main(argv)
        if code:
            return code
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["status"]:
        return run_cli(lambda: status(argv[1:]), prog="sweep.py status")
    return run_cli(lambda: sweep(argv), prog="sweep.py")


if __name__ == "__main__":
    sys.exit(main())
