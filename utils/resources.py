"""Memory and disk space: checks before a run starts, and one line when either runs out.

The allocator's own failure is a 28-line RuntimeError that names neither the flag behind the
allocation nor the fix. Here it becomes a :class:`~utils.errors.UserError` saying how much was
asked for, by what, and which flag makes it smaller; a full disk becomes one naming the file
and the bytes it needed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import resource

from utils.errors import UserError

_CPU_REQUEST = re.compile(r"allocate (\d+) bytes")
_CUDA_REQUEST = re.compile(r"[Tt]ried to allocate ([\d.]+) ([KMGT]i?B)")
_UNITS = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}
_OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# The largest block glibc accepts as its mmap threshold on 64-bit systems.
_LARGEST_MMAP_THRESHOLD = 32 * 2**20
_freed_memory_kept: bool | None = None  # once asked: whether the setting took


def format_bytes(count: float) -> str:
    """``1.6 GB``: decimal units, three significant digits."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{int(count)} bytes"


def is_out_of_memory(exc: BaseException) -> bool:
    """The CPU allocator's, CUDA's and Python's ways of saying an allocation failed."""
    import torch

    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def requested_bytes(exc: BaseException) -> float | None:
    """The size of the failed allocation, where the error message says it."""
    text = str(exc)
    if match := _CPU_REQUEST.search(text):
        return float(match.group(1))
    if match := _CUDA_REQUEST.search(text):
        return float(match.group(1)) * _UNITS.get(match.group(2), 1)
    return None


def is_out_of_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _OUT_OF_SPACE


class OutOfSpace(UserError):
    """A write failed for lack of disk space (or quota); ``path`` and ``needed`` say which and how much."""

    def __init__(self, path: str, needed: int):
        self.path, self.needed = path, needed
        super().__init__(f"no space left on the disk of {os.path.dirname(os.path.abspath(path))}: "
                         f"writing {os.path.basename(path)} needs {format_bytes(needed)}")


@contextlib.contextmanager
def space_for(path: str, needed: int):
    """Turn an out-of-space OSError inside the block into :class:`OutOfSpace` for ``path``."""
    try:
        yield
    except OSError as exc:
        if is_out_of_space(exc):
            raise OutOfSpace(path, needed) from exc
        raise


def state_bytes(value) -> int:
    """Bytes of the tensors in a (nested) checkpoint state: about the size of its file."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(state_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(state_bytes(v) for v in value)
    return 64


def keep_freed_memory(trim_bytes: int = 256 * 2**20) -> bool:
    """Have glibc's malloc keep up to ``trim_bytes`` of freed memory for reuse, once per process;
    True where that is in effect (Linux with glibc), False elsewhere.

    A call of a per-batch measurement route on the CPU allocates and frees tens of MB of tensors
    of 0.1-10 MB each. By default glibc hands the freed top of its heap back to the system once
    more than twice its (adaptive) mmap threshold is free there, so the next call faults every
    page in again: 25,000 page faults and a tenth of the time of a vmapped call of 32 batches of
    ResNet-20 with BatchNorm (8x8 inputs, b = 16), and 2.7-3.0 instead of 2.3 gradients a batch
    on 32x32 inputs (b = 8). Here blocks below 32 MiB come from the heap and freed memory is
    trimmed only beyond ``trim_bytes``; the process's resident size then stays near its peak.
    """
    global _freed_memory_kept
    if _freed_memory_kept is None:
        _freed_memory_kept = _set_glibc_thresholds(min(trim_bytes, 2**31 - 1))
    return _freed_memory_kept


def _set_glibc_thresholds(trim_bytes: int) -> bool:
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return False
        mallopt = ctypes.CDLL(None).mallopt
    except (ValueError, OSError, AttributeError):  # no such name, another C library, or no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # Setting the trim threshold alone would also freeze the adaptive mmap threshold at its
    # current value (128 KiB at start), sending every tensor above it to mmap and back.
    return mallopt(_M_MMAP_THRESHOLD, _LARGEST_MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, trim_bytes) == 1


def available_memory(device) -> int | None:
    """Bytes that allocations on ``device`` can still get, where the system says: free GPU
    memory on CUDA; on the CPU the smaller of the kernel's MemAvailable plus free swap (a run
    that pages still runs) and what the address-space limit (``ulimit -v``) leaves this
    process."""
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    limits = []
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.strip()}
        if "MemAvailable" in fields:
            limits.append(fields["MemAvailable"] + fields.get("SwapFree", 0))
    except (OSError, ValueError, IndexError):
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(soft - _address_space_in_use())
    return max(0, min(limits)) if limits else None


def _address_space_in_use() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def check_memory(needed: int, device, what: str, fix: str) -> None:
    """A UserError before anything is allocated when ``needed`` bytes cannot fit on ``device``."""
    free = available_memory(device)
    if free is not None and needed > free:
        raise UserError(f"{what} needs {format_bytes(needed)} of memory on {device.type.upper() if device.type == 'cpu' else device}, "
                        f"more than the {format_bytes(free)} available; {fix}")


@contextlib.contextmanager
def memory_for(what: str, fix: str):
    """Turn an allocation failure inside the block into a UserError naming ``what`` asked for
    how much, and ``fix``."""
    try:
        yield
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        asked = requested_bytes(exc)
        amount = format_bytes(asked) if asked is not None else "the memory it needed"
        raise UserError(f"out of memory: {what} could not allocate {amount}; {fix}") from None
