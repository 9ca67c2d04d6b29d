"""The SLURM executor of sweeps, through submitit (an optional dependency: requirements-cluster.txt).

Each grid point that is not done becomes one task of a job array. A task runs ``training.py``
as a child process (with ``--gpus-per-run K`` > 1, a ``torchrun`` of K processes, one per GPU
of the task's node: one run across its K GPUs). When SLURM pre-empts the job or its time limit nears, submitit calls
:meth:`SweepJob.checkpoint`: the child is stopped with SIGTERM (``training.py`` then writes a
checkpoint of the current step) and the job is requeued with a fresh :class:`SweepJob` for the
same point, which finds the checkpoint and continues with ``training.py --resume``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission

from utils.errors import UserError
from utils.sweep import REPO_ROOT, launch_point, load_definition, point_command, training_env

# Which submitit cluster runs the jobs; submitit's "local" runs the same jobs on this machine.
CLUSTER = "slurm"
# Every timeout resumes from the last checkpoint, so repeated timeouts still make progress.
MAX_TIMEOUTS = 50


class SweepJob(Checkpointable):
    """One grid point as a submitit job; returns the attempt's outcome as a dict."""

    processes = 1  # jobs pickled before runs could span several processes

    def __init__(self, sweep_dir: str, point_name: str, threads: int, processes: int = 1):
        self.sweep_dir, self.point_name, self.threads, self.processes = sweep_dir, point_name, threads, processes
        self._attempt = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_attempt"] = None  # a live process does not travel with a requeued job
        return state

    def _point(self, definition: dict) -> dict:
        return next(p for p in definition["points"] if p["name"] == self.point_name)

    def __call__(self) -> dict:
        definition = load_definition(self.sweep_dir)
        attempt = launch_point(self.sweep_dir, definition, self._point(definition), training_env(self.threads),
                               processes=self.processes)
        if isinstance(attempt, str):
            return {"point": self.point_name, "status": attempt, "skipped": True}
        self._attempt = attempt
        try:
            # Poll rather than block in wait(): submitit calls checkpoint() from a signal handler in
            # this thread, and its own wait() would deadlock on the lock of a wait() it interrupted.
            while attempt.process.poll() is None:
                time.sleep(0.2)
        finally:
            result = attempt.finish()
            self._attempt = None
        if result["status"] == "failed":
            raise RuntimeError(f"training.py exited with code {result['returncode']} for {self.point_name}; "
                               f"see {attempt.log_path}")
        return result

    def checkpoint(self) -> DelayedSubmission:
        """Stop the running training (it checkpoints its current step) and resubmit the point."""
        if self._attempt is not None:
            self._attempt.stop()
        return DelayedSubmission(SweepJob(self.sweep_dir, self.point_name, self.threads, self.processes))


@contextlib.contextmanager
def _repo_importable():
    """Jobs unpickle SweepJob, so this repository must be on their PYTHONPATH wherever they start."""
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = REPO_ROOT + (os.pathsep + previous if previous else "")
    try:
        yield
    finally:
        if previous is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = previous


def make_executor(sweep_dir: str, name: str, options) -> submitit.AutoExecutor:
    """An executor for ``CLUSTER`` with the sweep.py flags; no SLURM here is a one-line error."""
    try:
        executor = submitit.AutoExecutor(folder=os.path.join(sweep_dir, "submitit"), cluster=CLUSTER,
                                         slurm_max_num_timeout=MAX_TIMEOUTS)
    except RuntimeError as exc:
        raise UserError(f"--executor slurm needs a SLURM cluster ({exc}); run sweep.py on a login node or use --executor local")
    parameters = {"name": f"sweep-{name}", "timeout_min": options.time_min, "gpus_per_node": options.gpus_per_run,
                  "cpus_per_task": options.cpus_per_run, "mem_gb": options.mem_gb,
                  "slurm_partition": options.partition, "slurm_array_parallelism": options.array_parallelism}
    executor.update_parameters(**{k: v for k, v in parameters.items() if v is not None})
    return executor


def submit(executor: submitit.AutoExecutor, sweep_dir: str, definition: dict, threads: int, processes: int = 1) -> list:
    """Submit the points that have not ended as one job array, each a run of ``processes``
    processes sharing ``threads`` CPU threads; return submitit's jobs."""
    points = [p for p in definition["points"] if point_command(sweep_dir, definition, p) is not None]
    if not points:
        return []
    try:
        with _repo_importable(), executor.batch():
            jobs = [executor.submit(SweepJob(sweep_dir, p["name"], max(1, threads // processes), processes))
                    for p in points]
    except (OSError, subprocess.CalledProcessError) as exc:
        raise UserError(f"submitting the job array failed ({exc}); check the SLURM flags (--partition, --time-min, ...)")
    return jobs
