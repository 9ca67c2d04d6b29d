"""One run over many processes: the process group of ``torchrun`` (or ``srun``) and its collectives.

``torchrun --nproc_per_node K training.py ...`` starts K processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment;
:func:`init` joins them into one ``torch.distributed`` group, with NCCL when the run is on CUDA
and Gloo on the CPU. Without those variables (or with a world of one) nothing is set up and
every collective here is the identity, so the single-process code path is unchanged.

Every collective has a timeout (``EOSS_DIST_TIMEOUT`` seconds, default 600): a rank that dies
ends its peers' next collective with :class:`PeerLost`, one line that says how to continue,
instead of a hang. A rank that caught SIGINT or SIGTERM waits for its peers to agree on the
stop for at most ``EOSS_DIST_SIGNAL_TIMEOUT`` seconds (default 60, as SLURM gives about two
minutes between its signal and the kill): a peer that is gone or hung then ends it with
:class:`PeerLost` instead of the full timeout. Rank 0 alone writes files; the others compute the
same run with it.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils.errors import UserError

TIMEOUT_VARIABLE = "EOSS_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
SIGNAL_TIMEOUT_VARIABLE = "EOSS_DIST_SIGNAL_TIMEOUT"
DEFAULT_SIGNAL_TIMEOUT_S = 60.0
_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank among ``size`` processes, its rank on its node, the backend."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run folder."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World()


class PeerLost(UserError):
    """A collective failed or timed out: another rank has died or stopped answering."""


def launched() -> bool:
    """Whether this process was started by torchrun (or srun with its variables) in a world of several."""
    return all(v in os.environ for v in _LAUNCH_VARIABLES) and int(os.environ["WORLD_SIZE"]) > 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def timeout_seconds() -> float:
    return _seconds_from(TIMEOUT_VARIABLE, DEFAULT_TIMEOUT_S)


def signal_timeout_seconds() -> float:
    """How long a rank that caught a signal waits for its peers to agree on the stop (never longer
    than the timeout of every collective)."""
    return min(_seconds_from(SIGNAL_TIMEOUT_VARIABLE, DEFAULT_SIGNAL_TIMEOUT_S), timeout_seconds())


def _seconds_from(variable: str, default: float) -> float:
    value = os.environ.get(variable)
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise UserError(f"{variable}={value!r} is not a positive number of seconds; set it to e.g. {default:g}")
    return seconds


def init(device: torch.device) -> World:
    """Join the process group of this launch (once per process) and return this process's World.

    NCCL when ``device`` is CUDA, Gloo otherwise; every collective times out after
    :func:`timeout_seconds`. Outside a launch of several processes: :data:`SINGLE`.
    """
    if not launched():
        return SINGLE
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_seconds())
        try:
            dist.init_process_group(backend=backend, timeout=timeout,
                                    device_id=torch.device(device) if backend == "nccl" else None)
        except (RuntimeError, ValueError) as exc:
            raise PeerLost(f"rank {os.environ['RANK']} could not join the other processes of the launch "
                           f"({_first_line(exc)}); check MASTER_ADDR/MASTER_PORT and that every rank started") from None
    return current()


def current() -> World:
    """The World of this process (:data:`SINGLE` when no process group is set up)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return SINGLE
    return World(dist.get_rank(), dist.get_world_size(), local_rank(), dist.get_backend())


def close() -> None:
    """Leave the process group (the end of a launched run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _collective(call, *args, **kwargs):
    try:
        return call(*args, **kwargs)
    except (RuntimeError, ValueError) as exc:  # DistBackendError and Gloo's errors are RuntimeErrors
        world = current()
        raise PeerLost(f"rank {world.rank} of {world.size} lost its peers ({_first_line(exc)}); another process of "
                       f"the run stopped or timed out after {timeout_seconds():g} s ({TIMEOUT_VARIABLE}); continue "
                       f"the run with --resume RUN_DIR, with any number of processes") from None


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place (every rank ends with the same bits); returned."""
    if current().distributed:
        _collective(dist.all_reduce, tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, device="cpu") -> bool:
    """Whether ``flag`` is set on any rank (so that all ranks take the same branch)."""
    if not current().distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    _collective(dist.all_reduce, value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def agree_on_stop(signal_name: str, device="cpu") -> None:
    """This rank caught ``signal_name``: tell the peers (their :func:`any_rank` of the same step
    answers True) and wait for them at most :func:`signal_timeout_seconds`, so a peer that is
    gone or hung ends the wait with :class:`PeerLost` instead of the full timeout."""
    world = current()
    if not world.distributed:
        return
    seconds = signal_timeout_seconds()
    value = torch.tensor([1.0], device=device)
    try:
        dist.all_reduce(value, op=dist.ReduceOp.MAX, async_op=True).wait(timeout=datetime.timedelta(seconds=seconds))
    except (RuntimeError, ValueError) as exc:
        raise PeerLost(f"rank {world.rank} of {world.size} caught {signal_name} and its peers did not join the stop "
                       f"within {seconds:g} s ({SIGNAL_TIMEOUT_VARIABLE}: {_first_line(exc)}); continue the run "
                       f"from its last checkpoint with --resume RUN_DIR, with any number of processes") from None


def from_main(compute):
    """``compute()`` evaluated on rank 0 and handed to every rank; a UserError raised there is
    raised on every rank (so that none waits on a rank that gave up)."""
    world = current()
    if not world.distributed:
        return compute()
    outcome = [None]
    if world.is_main:
        try:
            outcome[0] = ("value", compute())
        except UserError as exc:
            outcome[0] = ("error", str(exc))
    _collective(dist.broadcast_object_list, outcome, src=0)
    kind, value = outcome[0]
    if kind == "error":
        raise UserError(value)
    return value

