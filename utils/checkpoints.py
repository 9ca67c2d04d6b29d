"""Checkpoints: the full state of a run at the start of a step.

``checkpoints/step_<N>.pt`` holds the state *before* update N (so the final checkpoint of a
run of T steps is ``step_<T>.pt``), as a dict with keys ``model``, ``optimizer``, ``step``,
``epoch``, ``rng`` (every random-generator state) and ``eigenvectors`` (the warm-start cache
of the eigen-solver, or None). Files are written to a temporary name and renamed, so a crash
never leaves half a checkpoint under a real name.
"""

from __future__ import annotations

import os
import random
import re

import numpy as np
import torch

from utils.errors import UserError
from utils.resources import space_for, state_bytes
from utils.results import atomic_output

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, CHECKPOINT_DIR, f"step_{step}.pt")


def rng_state() -> dict:
    """States of every global random generator a run may touch."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str, state: dict) -> None:
    """torch.save to a temporary file in the same folder, then an atomic rename; a full disk is
    an OutOfSpace naming the checkpoint and about its size."""
    with space_for(path, state_bytes(state)):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_output(path, suffix=".pt") as tmp, open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint in the run folder, oldest first."""
    folder = os.path.join(run_dir, CHECKPOINT_DIR)
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = _NAME.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(folder, name)))
    return sorted(found)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a checkpoint; a missing, truncated or foreign file is a UserError naming it."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist; list the run's checkpoints/ folder for the available steps")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch raises many types for damaged files
        raise UserError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}); resume from an earlier checkpoint or delete this file")
    if not isinstance(state, dict) or not {"model", "optimizer", "step"} <= set(state):
        raise UserError(f"checkpoint {path} is not an EOSS checkpoint (keys model, optimizer, step missing)")
    return state


def prune_checkpoints(run_dir: str, keep: int | None) -> None:
    """Delete all but the newest ``keep`` checkpoints (None keeps everything)."""
    if keep is None:
        return
    for _, path in list_checkpoints(run_dir)[:-keep]:
        os.unlink(path)
