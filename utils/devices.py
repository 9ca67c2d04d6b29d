"""Which device a run computes on, and how exactly its float32 matrix products round.

``--device cpu|cuda|cuda:N|mps`` names the device (``--cpu`` is ``--device cpu``; neither: CUDA
when available, else the CPU). A device this machine lacks is a UserError, never a silent move
to the CPU. Apple's mps backend has no float64: float64 work asked for there (the end-of-run
eigenvalue solves) runs on the CPU with a note, or is refused where it is part of training.

TF32 is set explicitly: on Ampere and later GPUs PyTorch lets cuDNN convolutions (and, if told,
matrix products) round their inputs to TF32's 10-bit mantissa, which moves Hessian-vector
products at about the 1e-3 level; runs keep it off unless ``--tf32`` allows it, and config.json
records the choice.
"""

from __future__ import annotations

import re

import torch

from utils.errors import UserError

DEVICE_PATTERN = re.compile(r"cpu|mps|cuda(?::(\d+))?")


def check_device_name(name: str | None) -> None:
    """A UserError unless ``name`` is None or of the form cpu, cuda, cuda:N or mps."""
    if name is not None and not DEVICE_PATTERN.fullmatch(name):
        raise UserError(f"--device {name!r} is not a device name; use cpu, cuda, cuda:N or mps")


def resolve_device(name: str | None, force_cpu: bool = False) -> torch.device:
    """The device ``name`` asks for (None: CUDA when available, else the CPU; ``force_cpu``, which
    :func:`utils.config.validate` allows only without another name: the CPU), checked to exist
    on this machine: a missing one is a UserError naming the fix."""
    check_device_name(name)
    if force_cpu:
        return torch.device("cpu")
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: PyTorch sees no CUDA GPU on this machine; use --device cpu "
                            f"(or leave --device out to use CUDA wherever it is present)")
        index, count = int(DEVICE_PATTERN.fullmatch(name).group(1) or 0), torch.cuda.device_count()
        if index >= count:
            raise UserError(f"--device {name}: this machine has {count} CUDA GPU{'s' if count != 1 else ''} "
                            f"(cuda:0 to cuda:{count - 1}); pick one of them")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: Apple's Metal backend is not available here; use --device cpu")
    return torch.device(name)


def float64_device(device: torch.device) -> torch.device:
    """Where float64 work meant for ``device`` runs: mps has no float64, so the CPU."""
    return torch.device("cpu") if device.type == "mps" else device


def set_tf32(allowed: bool) -> None:
    """Allow (or forbid) TF32 rounding in CUDA matrix products and cuDNN convolutions, for the
    whole process; PyTorch's own default allows it in convolutions only."""
    torch.backends.cuda.matmul.allow_tf32 = allowed
    torch.backends.cudnn.allow_tf32 = allowed
