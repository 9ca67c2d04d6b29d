"""Who works in a run folder: a lock file claimed atomically, kept alive by a heartbeat.

A process that trains into a run folder (a new run, a resume, a fork's new folder) first
creates ``<run>/.lock`` with ``O_CREAT | O_EXCL``, which exactly one process can do, and writes
its host, process id, process start time and SLURM job into it. While it works, a thread
touches the file every :data:`HEARTBEAT_SECONDS`; it removes the file when it ends.

A lock left behind by a process that died (SIGKILL, a node failure, a requeued SLURM job) must
never block the resume, so a lock counts as held only while its owner can be alive:

- written on this host: while its process exists and started when the lock says;
- written on another host by an earlier incarnation of this SLURM job (a requeue): never;
- written on another host otherwise: while its heartbeat is younger than
  :data:`STALE_AFTER_SECONDS`.

``flock`` and ``fcntl`` locks are not used: on NFS, where cluster runs live, they are
unreliable, and they vanish with the process, so they cannot tell "alive elsewhere" from "died".
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
import uuid

from utils.errors import UserError

LOCK_FILE = ".lock"
HEARTBEAT_SECONDS = 15.0
# Several missed heartbeats, and NFS's attribute cache (up to a minute) on top.
STALE_AFTER_SECONDS = 120.0
# A lock being broken by a process that died while breaking it.
_BREAK_STALE_SECONDS = 30.0


def lock_path(run_dir: str) -> str:
    return os.path.join(run_dir, LOCK_FILE)


def slurm_job() -> str | None:
    """This process's SLURM job (``<array job>_<task>`` in an array), the same after a requeue."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return os.environ.get("SLURM_JOB_ID")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def process_start_time(pid: int) -> int | None:
    """Clock ticks since boot at which process ``pid`` started (Linux), to tell it from a later
    process that reused its id; None where /proc does not say."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _owner_record(purpose: str) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "process_start": process_start_time(os.getpid()),
            "slurm_job": slurm_job(), "purpose": purpose, "token": uuid.uuid4().hex,
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _read_lock(path: str) -> tuple[dict | None, float] | None:
    """(owner record or None when unreadable, heartbeat age in seconds); None when there is no lock."""
    try:
        age = time.time() - os.stat(path).st_mtime
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        return None, 0.0
    try:
        owner = json.loads(text)
    except ValueError:
        owner = None
    return (owner if isinstance(owner, dict) else None), age


def owner_is_alive(owner: dict | None, heartbeat_age: float) -> bool:
    """Whether the process that wrote ``owner`` may still be working (see the module docstring).

    An unreadable lock is one being written right now, unless its file has not been touched
    for :data:`STALE_AFTER_SECONDS`.
    """
    if owner is None:
        return heartbeat_age < STALE_AFTER_SECONDS
    if owner.get("host") == socket.gethostname():
        pid = owner.get("pid")
        if not isinstance(pid, int) or not pid_alive(pid):
            return False
        recorded, now = owner.get("process_start"), process_start_time(pid)
        return recorded is None or now is None or recorded == now
    if owner.get("slurm_job") and owner.get("slurm_job") == slurm_job():
        return False
    return heartbeat_age < STALE_AFTER_SECONDS


def describe_owner(owner: dict | None, heartbeat_age: float) -> str:
    if owner is None:
        return "a process that is creating its lock right now"
    where = f"process {owner.get('pid')} on {owner.get('host')}"
    if owner.get("slurm_job"):
        where += f" (SLURM job {owner['slurm_job']})"
    return f"{where}, heartbeat {heartbeat_age:.0f} s ago"


class RunFolderBusy(UserError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """A claimed run-folder lock; :meth:`release` (or leaving the ``with`` block) gives it up."""

    def __init__(self, path: str, owner: dict):
        self.path, self.owner = path, owner
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="eoss-run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self):
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError:  # a full or vanished disk must not kill the run; the lock just ages
                pass

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if it is still this process's."""
        self._stop.set()
        found = _read_lock(self.path)
        if found and found[0] and found[0].get("token") == self.owner["token"]:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _create(path: str, owner: dict) -> bool:
    """Create the lock file exclusively with ``owner`` in it; False when it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(owner) + "\n")
    except BaseException:
        os.unlink(path)
        raise
    return True


def _break_stale(path: str, seen: dict | None) -> None:
    """Remove the lock at ``path`` if it still holds the dead owner ``seen``.

    Two processes may judge the same lock stale; one ``.lock.break`` file, created
    exclusively, lets only one of them look again and remove it, so a fresh lock that another
    process created in between is never removed.
    """
    guard = path + ".break"
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            if time.time() - os.stat(guard).st_mtime > _BREAK_STALE_SECONDS:
                os.unlink(guard)
        except FileNotFoundError:
            pass
        return
    os.close(fd)
    try:
        found = _read_lock(path)
        if found is not None and found[0] == seen:
            os.unlink(path)
    finally:
        os.unlink(guard)


def claim(run_dir: str, purpose: str) -> RunLock:
    """Claim ``run_dir`` for this process; :class:`RunFolderBusy` when a live process holds it."""
    path = lock_path(run_dir)
    owner = _owner_record(purpose)
    for _ in range(50):
        if _create(path, owner):
            return RunLock(path, owner)
        found = _read_lock(path)
        if found is None:
            continue  # released between the two looks
        holder, age = found
        if owner_is_alive(holder, age):
            raise RunFolderBusy(f"{run_dir} is in use by {describe_owner(holder, age)}; wait until it ends "
                                f"(if that process is gone, delete {path})")
        _break_stale(path, holder)
        time.sleep(0.01)
    raise RunFolderBusy(f"{run_dir}: could not claim {path}, other processes keep taking it; try again")
