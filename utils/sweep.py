"""Sweeps: a grid of ``training.py`` runs kept in one folder, run here or on a SLURM cluster.

The grid and its points are defined by :mod:`utils.sweep_grid`; this module keeps the folder.

``$RESULTS/sweeps/<NAME>/`` holds

- ``grid.json``: the definition, written once: the grid (flag -> values, first flag varying
  slowest), the flags shared by every run and the points (name and training flags);
- ``sweep.json``: the status table, rewritten whenever a run starts or ends and by
  ``sweep.py status``; every entry is derived from the run folders, so the table can always be
  rebuilt from them;
- ``runs/<point>/``: one ordinary run folder per grid point (``training.py --run-dir``);
- ``logs/<point>.log``: stdout and stderr of every attempt at that point;
- ``running/<point>.json``: present while a process works on the point (host, process ids,
  SLURM job); claimed under a lock, so two launchers never train into the same folder;
- ``failed/<point>.json``: the exit code of an attempt that crashed (cleared by the next one).

A point whose run ended (finished, stopped_at_loss, diverged) is skipped; one whose folder holds
a config.json is continued with ``training.py --resume`` (from step 0 when it has no
checkpoint yet); any other starts afresh. So running a
sweep again completes it, each run continuing from its newest checkpoint.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

from utils.cli import SignalCatcher
from utils.errors import UserError
from utils.results import ENDED, atomic_write_json, ended_last_row, parse_results, read_json, read_versioned_json
from utils.run_lock import pid_alive, slurm_job
from utils.sweep_grid import SWEEP_VERSION, shared_settings

# The module behind ``torchrun``: the launcher of a point run on several processes.
TORCHRUN_MODULE = "torch.distributed.run"
STATUSES = ("finished", "stopped_at_loss", "diverged", "interrupted", "failed", "running", "pending")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINING_SCRIPT = os.path.join(REPO_ROOT, "training.py")


# ----------------------------------------------------------------------------- the folder

def sweeps_root() -> str:
    from utils.config import results_root

    return os.path.join(results_root(), "sweeps")


def sweep_folder(name: str) -> str:
    return os.path.abspath(os.path.join(sweeps_root(), name))


def load_definition(sweep_dir: str) -> dict:
    return read_versioned_json(os.path.join(sweep_dir, "grid.json"), version=SWEEP_VERSION, kind="sweep", folder="sweep",
                               missing=f"{sweep_dir} is not a sweep folder (no grid.json); "
                                       f"pass $RESULTS/sweeps/<NAME> or --name NAME")


def _same_sweep(a: dict, b: dict) -> bool:
    def shared(d):
        return {k: v for k, v in shared_settings(d["shared"]).items() if k != "quiet"}

    return list(a["grid"].items()) == list(b["grid"].items()) and shared(a) == shared(b)


def check_existing(sweep_dir: str, definition: dict) -> None:
    """A sweep of the same name must have the same grid and shared flags: grids are never mixed."""
    if os.path.exists(os.path.join(sweep_dir, "grid.json")):
        existing = load_definition(sweep_dir)
        if not _same_sweep(existing, definition):
            raise UserError(f"sweep {definition['name']!r} already exists with a different grid or shared flags "
                            f"(see {os.path.join(sweep_dir, 'grid.json')}); choose another --name or repeat its grid")


def prepare_sweep(sweep_dir: str, definition: dict) -> dict:
    """Create the sweep folder and grid.json, or check that the existing one matches; return
    the stored definition, which is the one in force."""
    check_existing(sweep_dir, definition)
    try:
        for sub in ("runs", "logs", "running", "failed"):
            os.makedirs(os.path.join(sweep_dir, sub), exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the sweep folder {sweep_dir} ({exc.strerror}); set $RESULTS to a writable folder")
    path = os.path.join(sweep_dir, "grid.json")
    try:
        if not os.path.exists(path):
            atomic_write_json(path, definition)
        with _sweep_lock(sweep_dir):  # every launcher takes it, so check now that it can
            pass
    except OSError as exc:
        raise UserError(f"cannot write into the sweep folder {sweep_dir} ({exc.strerror or exc}); "
                        f"set $RESULTS to a writable folder or choose another --name")
    return load_definition(sweep_dir)


def point_run_dir(sweep_dir: str, point_name: str) -> str:
    return os.path.join(sweep_dir, "runs", point_name)


def sweep_run_dirs(sweep_dir: str) -> list[str]:
    """The run folders of a sweep that exist (hold a config.json), in grid order."""
    definition = load_definition(sweep_dir)
    dirs = [point_run_dir(os.path.abspath(sweep_dir), p["name"]) for p in definition["points"]]
    return [d for d in dirs if os.path.isfile(os.path.join(d, "config.json"))]


def resolve_sweep_dir(path: str | None, name: str | None) -> str:
    if (path is None) == (name is None):
        raise UserError("give the sweep either as --name NAME or as its folder")
    sweep_dir = sweep_folder(name) if name else os.path.abspath(path)
    if not os.path.isdir(sweep_dir):
        raise UserError(f"no sweep at {sweep_dir}; check --name (sweeps live in $RESULTS/sweeps/)")
    load_definition(sweep_dir)
    return sweep_dir


# ----------------------------------------------------------------------------- run states

def _read_json_or_none(path: str):
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def _marker_is_live(marker: dict | None) -> bool:
    """A marker from this host is live while one of its processes is. One from another host is
    trusted (its processes cannot be checked from here), unless it was left by this very SLURM
    job before it was requeued onto this host."""
    if not isinstance(marker, dict):
        return False
    if marker.get("host") == socket.gethostname():
        return any(pid_alive(int(pid)) for pid in marker.get("pids", []))
    return not (marker.get("slurm_job") and marker.get("slurm_job") == slurm_job())


def _ends_of_file(path: str, size: int = 65536) -> bytes:
    """The whole lines among the first and the last ``size`` bytes of a file (all of a smaller one)."""
    with open(path, "rb") as f:
        head = f.read(size)
        end = f.seek(0, os.SEEK_END)
        if end <= 2 * size:
            f.seek(0)
            return f.read()
        f.seek(end - size)
        tail = f.read()
    return head[:head.rfind(b"\n") + 1] + tail[tail.find(b"\n") + 1:]


def _last_logged_step(results_path: str) -> int | None:
    """Steps done as of the last complete row of results.txt (its step column + 1).

    Only the header and the end of the file are read (status reads every run's file). Bytes
    that are not UTF-8 (a damaged file) read as replacement characters, and a file that cannot
    be read or parsed gives None: the status table shows what can still be read, never an error.
    """
    try:
        text = _ends_of_file(results_path).decode(errors="replace")
        steps = parse_results(text, results_path).steps()
    except (OSError, UserError):
        return None
    return steps[-1] + 1 if steps else None


def _rows_reach_the_end(run_dir: str, summary: dict) -> bool:
    """Whether results.txt holds the rows up to the end that summary.json records for a run
    that ended (:func:`utils.results.ended_last_row`); one cut short is completed on resume."""
    done = _last_logged_step(os.path.join(run_dir, "results.txt"))
    try:
        return done is not None and done - 1 >= ended_last_row(summary)
    except UserError:  # a damaged summary: the point resumes, and resuming names the problem
        return False


def point_state(sweep_dir: str, point: dict) -> dict:
    """One row of the status table, read from the point's run folder and markers."""
    name = point["name"]
    run_dir = point_run_dir(sweep_dir, name)
    entry = {"name": name, "run_dir": os.path.relpath(run_dir, sweep_dir), "settings": point["settings"],
             "status": "pending", "step": None, "total_steps": None}
    record = _read_json_or_none(os.path.join(run_dir, "config.json"))
    if isinstance(record, dict):
        entry["total_steps"] = record.get("resolved", {}).get("total_steps")
    summary = _read_json_or_none(os.path.join(run_dir, "summary.json"))
    if isinstance(summary, dict) and summary.get("status") in ENDED and not _rows_reach_the_end(run_dir, summary):
        summary = None  # its rows were cut: the run is to be completed, as training.py --resume does
    marker = _read_json_or_none(os.path.join(sweep_dir, "running", f"{name}.json"))
    failed = _read_json_or_none(os.path.join(sweep_dir, "failed", f"{name}.json"))
    if _marker_is_live(marker):
        entry["status"] = "running"
        entry.update({k: marker[k] for k in ("host", "pids", "slurm_job") if marker.get(k)})
    elif isinstance(summary, dict) and summary.get("status") in ENDED:
        entry["status"] = summary["status"]
    elif isinstance(failed, dict):
        entry["status"] = "failed"
        entry["exit_code"] = failed.get("exit_code")
        entry["log"] = failed.get("log")
    elif os.path.isdir(run_dir) and os.listdir(run_dir):
        entry["status"] = "interrupted"
    if entry["status"] != "running" and isinstance(summary, dict) and "final_step" in summary:
        entry["step"] = summary["final_step"]
    elif entry["status"] != "pending":
        entry["step"] = _last_logged_step(os.path.join(run_dir, "results.txt"))
    return entry


@contextlib.contextmanager
def _sweep_lock(sweep_dir: str):
    """An exclusive lock on the sweep folder, shared by every launcher and status reader."""
    with open(os.path.join(sweep_dir, ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def status_table(sweep_dir: str, definition: dict) -> dict:
    """The contents of sweep.json, read from the run folders."""
    runs = [point_state(sweep_dir, p) for p in definition["points"]]
    counts = {s: n for s in STATUSES if (n := sum(r["status"] == s for r in runs))}
    return {"version": SWEEP_VERSION, "name": definition["name"],
            "updated": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "counts": counts, "runs": runs}


def refresh_status(sweep_dir: str) -> dict:
    """Rebuild sweep.json from the run folders (under the sweep lock) and return it."""
    definition = load_definition(sweep_dir)
    with _sweep_lock(sweep_dir):
        table = status_table(sweep_dir, definition)
        atomic_write_json(os.path.join(sweep_dir, "sweep.json"), table)
    return table


def read_status(sweep_dir: str) -> dict:
    """:func:`refresh_status`, or, in a sweep folder this user cannot write (read-only, another
    user's), the same table without the lock and without rewriting sweep.json."""
    try:
        return refresh_status(sweep_dir)
    except OSError:
        return status_table(sweep_dir, load_definition(sweep_dir))


def format_status(table: dict, sweep_dir: str) -> str:
    counts = ", ".join(f"{n} {s}" for s, n in table["counts"].items())
    width = max([len("run")] + [len(r["name"]) for r in table["runs"]])
    lines = [f"sweep {table['name']} ({sweep_dir}): {len(table['runs'])} runs, {counts}",
             f"{'run':<{width}}  {'status':<15}  steps"]
    for r in table["runs"]:
        note = ""
        if r["status"] == "running":
            note = f"on {r.get('host')}" + (f" (SLURM job {r['slurm_job']})" if r.get("slurm_job") else "")
        elif r["status"] == "failed":
            note = f"exit code {r.get('exit_code')}, see {r.get('log')}"
        lines.append(f"{r['name']:<{width}}  {r['status']:<15}  {_progress(r):<13}  {note}".rstrip())
    return "\n".join(lines)


def _progress(entry: dict) -> str:
    if entry["step"] is None:
        return ""
    return f"{entry['step']}/{entry['total_steps'] if entry['total_steps'] is not None else '?'}"


# ----------------------------------------------------------------------------- running points

def point_command(sweep_dir: str, definition: dict, point: dict, python: str | None = None,
                  clear: bool = False, processes: int = 1) -> list[str] | None:
    """The training.py command that moves the point forward now, or None when its run has ended
    with all its rows (one whose results.txt was cut is completed with --resume).

    A folder with a config.json is continued with --resume (without a checkpoint yet, from
    step 0); a folder without one holds nothing of a run (it died while claiming the folder)
    and, with ``clear``, is removed so the run starts afresh. With ``processes`` > 1 the run is
    one ``torchrun`` launch of that many processes on this node (one per GPU).
    """
    launcher = [python or sys.executable]
    if processes > 1:
        launcher += ["-m", TORCHRUN_MODULE, "--standalone", "--nproc_per_node", str(processes)]
    run_dir = point_run_dir(sweep_dir, point["name"])
    summary = _read_json_or_none(os.path.join(run_dir, "summary.json"))
    if isinstance(summary, dict) and summary.get("status") in ENDED and _rows_reach_the_end(run_dir, summary):
        return None
    if os.path.isfile(os.path.join(run_dir, "config.json")):
        quiet = ["--quiet"] if "--quiet" in definition["shared"] else []
        return [*launcher, TRAINING_SCRIPT, "--resume", run_dir, *quiet]
    if clear and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    return [*launcher, TRAINING_SCRIPT, *point["argv"], *definition["shared"], *wandb_group_flags(definition, point),
            "--run-dir", run_dir]


def wandb_group_flags(definition: dict, point: dict) -> list[str]:
    """``--wandb-group <sweep name>`` for a point that logs to W&B without a group of its own,
    so that a sweep lands in Weights & Biases as one group."""
    from utils.config import explicit_settings

    given = explicit_settings([*point["argv"], *definition["shared"]])
    return ["--wandb-group", definition["name"]] if given.get("wandb") and "wandb_group" not in given else []


def dry_run_lines(sweep_dir: str, definition: dict) -> list[str]:
    lines = []
    for point in definition["points"]:
        command = point_command(sweep_dir, definition, point)
        if command is None:
            lines.append(f"# {point['name']}: {point_state(sweep_dir, point)['status']}, skipped")
        else:
            lines.append(shlex.join(command))
    return lines


def _ignore_preemption_signal():
    # SLURM delivers its pre-emption / time-limit warning (SIGUSR2) to every process of the job;
    # the launcher stops training with SIGTERM instead, which training.py turns into a checkpoint.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def training_env(threads: int) -> dict:
    """The runs' environment, with ``threads`` CPU threads each."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def local_threads(jobs: int) -> int:
    """CPU threads per run of a local sweep: the user's OMP_NUM_THREADS when set, else an even
    split of the available CPUs among ``jobs`` runs at a time."""
    chosen = os.environ.get("OMP_NUM_THREADS", "")
    if chosen.isdigit() and int(chosen) > 0:
        return int(chosen)
    return max(1, available_cpus() // jobs)


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class Attempt:
    """One training.py process working on a point, holding the point's running marker."""

    def __init__(self, sweep_dir: str, point: dict, command: list[str], marker_path: str, env: dict):
        self.sweep_dir, self.point, self.command, self.marker_path = sweep_dir, point, command, marker_path
        self.resumed = "--resume" in command
        # A summary.json left by an earlier attempt is told from one this attempt writes by its time.
        self.summary_path = os.path.join(point_run_dir(sweep_dir, point["name"]), "summary.json")
        self.summary_before = _modified(self.summary_path)
        self.log_path = os.path.join(sweep_dir, "logs", f"{point['name']}.log")
        self._log = open(self.log_path, "a", encoding="utf-8")
        self._log.write(f"# {datetime.datetime.now().astimezone().isoformat(timespec='seconds')} "
                        f"on {socket.gethostname()}: {shlex.join(command)}\n")
        self._log.flush()
        # A session of its own: a Ctrl-C in the terminal reaches the launcher, which passes it on once.
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True, preexec_fn=_ignore_preemption_signal)
        _write_marker(marker_path, [os.getpid(), self.process.pid])

    def stop(self, sig=signal.SIGTERM) -> None:
        """Ask training.py to stop after its current step (it writes a checkpoint) and wait."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        self.process.wait()

    def finish(self) -> dict:
        """After the process ended: record a crash, release the marker, refresh the table."""
        returncode = self.process.wait()
        self._log.close()
        summary = _read_json_or_none(self.summary_path)
        written_now = summary is not None and _modified(self.summary_path) != self.summary_before
        if attempt_failed(returncode, summary, torchrun=TORCHRUN_MODULE in self.command,
                          summary_written_now=written_now):
            atomic_write_json(os.path.join(self.sweep_dir, "failed", f"{self.point['name']}.json"),
                              {"exit_code": returncode, "log": os.path.relpath(self.log_path, self.sweep_dir)})
        _release_marker(self.marker_path)
        state = point_state(self.sweep_dir, self.point)
        refresh_status(self.sweep_dir)
        return {"point": self.point["name"], "status": state["status"], "step": state["step"],
                "total_steps": state["total_steps"], "returncode": returncode, "command": self.command}


def _modified(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return None


def attempt_failed(returncode: int, summary, *, torchrun: bool, summary_written_now: bool) -> bool:
    """Whether an attempt that exited with ``returncode`` failed (else it ended, or it stopped and
    resumes from its last checkpoint), given the run's summary.json (None without one).

    130 / 143: training.py stopped by a signal and checkpointed; negative: killed, resumable from
    its last checkpoint. ``torchrun`` passes a SIGTERM or SIGINT on to its processes, which
    checkpoint and exit 143 / 130, and then exits 1 itself: an attempt under it that exits 1 with
    an ``interrupted`` summary of a signal (exit code 130 / 143) written during the attempt
    (``summary_written_now``; an older one is a previous attempt's) was stopped, not failed. A
    full disk also leaves an ``interrupted`` summary, without an exit code: that attempt failed."""
    status = summary.get("status") if isinstance(summary, dict) else None
    if status in ENDED or returncode <= 0 or returncode in (130, 143):
        return False
    signalled = status == "interrupted" and summary.get("exit_code") in (130, 143)
    return not (torchrun and returncode == 1 and signalled and summary_written_now)


def _write_marker(path: str, pids: list[int]) -> None:
    atomic_write_json(path, {"host": socket.gethostname(), "pids": pids, "slurm_job": slurm_job(),
                             "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")})


def _claim_marker(sweep_dir: str, path: str) -> dict | None:
    """Write the point's running marker unless another launcher's live marker is there; then
    return that one. The sweep lock makes looking and writing one step for all launchers."""
    with _sweep_lock(sweep_dir):
        marker = _read_json_or_none(path)
        if _marker_is_live(marker):
            return marker
        _write_marker(path, [os.getpid()])
    return None


def _release_marker(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def launch_point(sweep_dir: str, definition: dict, point: dict, env: dict, processes: int = 1) -> Attempt | str:
    """Start the training.py process (a ``torchrun`` of ``processes`` ones when more than one)
    that moves ``point`` forward; a string says why not."""
    if point_command(sweep_dir, definition, point) is None:
        return point_state(sweep_dir, point)["status"]
    marker_path = os.path.join(sweep_dir, "running", f"{point['name']}.json")
    owner = _claim_marker(sweep_dir, marker_path)
    if owner is not None:
        return f"running on {owner.get('host')} (processes {owner.get('pids')})"
    try:
        _release_marker(os.path.join(sweep_dir, "failed", f"{point['name']}.json"))
        command = point_command(sweep_dir, definition, point, clear=True, processes=processes)
        if command is None:  # another launcher ended it between the two looks
            _release_marker(marker_path)
            return point_state(sweep_dir, point)["status"]
        attempt = Attempt(sweep_dir, point, command, marker_path, env)
    except BaseException:
        _release_marker(marker_path)
        raise
    refresh_status(sweep_dir)
    return attempt


def run_local(sweep_dir: str, definition: dict, jobs: int, out=None) -> int:
    """Run the points that are not done, ``jobs`` processes at a time (threads: :func:`local_threads`).

    Returns 0 when every run ended, 1 when some failed or are held by another launcher, and
    130 / 143 when a signal stopped the sweep (the running points are checkpointed).
    """
    out = out or sys.stdout
    threads = local_threads(jobs)
    env = training_env(threads)
    queue = list(definition["points"])
    active: list[Attempt] = []
    unfinished, forwarded = 0, False
    with SignalCatcher() as stop:
        while active or (queue and stop.received is None):
            while queue and len(active) < jobs and stop.received is None:
                point = queue.pop(0)
                attempt = launch_point(sweep_dir, definition, point, env)
                if isinstance(attempt, str):
                    print(f"{point['name']}: {attempt}, skipped", file=out, flush=True)
                    unfinished += attempt.startswith("running")
                    continue
                verb = "resumed" if attempt.resumed else "started"
                print(f"{point['name']}: {verb} (log {os.path.relpath(attempt.log_path, sweep_dir)}, "
                      f"{threads} CPU thread{'s' if threads > 1 else ''})", file=out, flush=True)
                active.append(attempt)
            if stop.received is not None and not forwarded:
                # Once: a second signal could reach training.py after its loop, while it writes the summary.
                for attempt in active:
                    if attempt.process.poll() is None:
                        attempt.process.send_signal(stop.received)
                forwarded = True
            for attempt in [a for a in active if a.process.poll() is not None]:
                active.remove(attempt)
                result = attempt.finish()
                unfinished += result["status"] not in ENDED
                detail = (f"exit code {result['returncode']}, see {os.path.relpath(attempt.log_path, sweep_dir)}"
                          if result["status"] == "failed" else f"steps {_progress(result)}")
                print(f"{result['point']}: {result['status']} ({detail})", file=out, flush=True)
            time.sleep(0.05)
    table = refresh_status(sweep_dir)
    print(format_status(table, sweep_dir), file=out, flush=True)
    if stop.received is not None:
        return 130 if stop.received == signal.SIGINT else 143
    return 1 if unfinished else 0


def require_submitit():
    """The submitit module, or a one-line error saying how to install it."""
    try:
        import submitit
    except ImportError:
        raise UserError("--executor slurm needs submitit; install it with pip install -r requirements-cluster.txt "
                        "(or run here with --executor local)")
    return submitit
