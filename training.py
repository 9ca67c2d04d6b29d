"""Train a network with SGD on a data set held in memory and log its curvature.

    python training.py --dataset digits --lr 0.05 --batch 64 --steps 1000 --lambdamax --batch-sharpness

writes results.txt, config.json, summary.json and checkpoints/ into a new run folder under
$RESULTS (default ./results) and prints its path. ``--resume RUN_DIR`` continues an
interrupted run; ``--cont-run RUN_DIR --cont-step N`` forks a new run from a checkpoint with
changed settings. See README.md for every flag.
"""

import sys

from utils import distributed
from utils.cli import run_cli
from utils.config import build_parser, config_from_args, explicit_settings, settings_from_args
from utils.errors import UserError
from utils.launch import StoppedBeforeStart, fork, resume, run
from utils.runs import allowed_changes

# Flags that may accompany --resume: they change how the run is shown, not what it computes.
_RESUME_COMPATIBLE = {"resume", "resume_step", "quiet", "cpu", "device", "allow_changed_model", "allow_changed_data"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)

    def work():
        args = build_parser().parse_args(argv)
        command_line = ["training.py", *argv]
        allow_changed = allowed_changes(args)
        if args.resume_step is not None and not args.resume:
            raise UserError("--resume-step needs --resume RUN_DIR")
        if args.cont_step is not None and not args.cont_run:
            raise UserError("--cont-step needs --cont-run RUN_DIR")
        if args.resume and args.cont_run:
            raise UserError("--resume continues a run and --cont-run forks one; give only one of them")
        if args.resume:
            extra = sorted(set(explicit_settings(argv)) - _RESUME_COMPATIBLE)
            if extra:
                flags = ", ".join("--" + name.replace("_", "-") for name in extra)
                raise UserError(f"--resume continues a run with its own settings; drop {flags} or fork with --cont-run")
            run_dir, summary = resume(args.resume, args.resume_step, quiet=args.quiet or None, cpu=args.cpu, device=args.device,
                                      command_line=command_line, allow_changed=allow_changed)
            if summary.get("already_done"):
                if distributed.current().is_main:
                    print(f"{run_dir} already ended ({summary['status']} at step {summary['final_step']}); nothing to "
                          f"resume (branch from it with --cont-run {run_dir} --cont-step N)")
                return 0
        elif args.cont_run:
            if args.cont_step is None:
                raise UserError("--cont-run needs --cont-step N (the fork starts from the newest checkpoint at or before N)")
            overrides = settings_from_args(explicit_settings(argv))
            run_dir, summary = fork(args.cont_run, args.cont_step, overrides, command_line=command_line,
                                    allow_changed=allow_changed)
        else:
            run_dir, summary = run(config_from_args(args), command_line=command_line)
        if not distributed.current().is_main:  # rank 0 reports for the run
            return summary.get("exit_code", 0)
        print(f"{summary['status']} at step {summary['final_step']}: train loss {summary['final_train_loss']:.4g}, "
              f"test accuracy {summary['final_test_accuracy']:.3f}")
        print(f"run folder: {run_dir}")
        return summary.get("exit_code", 0)

    def work_or_stop():
        try:
            return work()
        except StoppedBeforeStart as stop:
            print(f"training.py: {stop}", file=sys.stderr)
            return stop.exit_code

    try:
        return run_cli(work_or_stop, prog="training.py")
    finally:
        distributed.close()


if __name__ == "__main__":
    sys.exit(main())
