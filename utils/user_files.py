"""The user's own files a run is built from: a model file (``--model path/file.py:function``)
and a data file (``--dataset path/file.npz``).

A run records each file's absolute path and SHA-256 in ``config.json``. Whatever rebuilds the
run later (``--resume``, a fork, the ``compute_final_*`` scripts) recomputes the hash and
refuses, in one line, a file that is gone or has changed, unless told to go on with
``--allow-changed-model`` or ``--allow-changed-data``: a changed file would silently make a
different run.
"""

from __future__ import annotations

import hashlib
import os
import sys

from utils.data import is_data_file
from utils.errors import UserError

_READ_BLOCK = 1 << 20

# What each kind of file is called in messages, and the flag that accepts a changed one.
ALLOW_FLAGS = {"model": "--allow-changed-model", "data": "--allow-changed-data"}


def sha256_of(path: str) -> str:
    """The SHA-256 of the file's bytes, as 64 hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_READ_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def checked_hash(path: str, recorded: str | None, kind: str, allow_changed: bool) -> str:
    """The file's SHA-256, after checking it against the one ``recorded`` when the run started
    (None: a new run, nothing to compare). A missing file is a UserError; a changed one too,
    unless ``allow_changed`` (then a note on stderr, and the new hash is returned)."""
    if not os.path.isfile(path):
        where = "the run was started with it; put it back" if recorded else "check the path"
        raise UserError(f"the {kind} file {path} does not exist; {where}")
    try:
        current = sha256_of(path)
    except OSError as exc:
        raise UserError(f"cannot read the {kind} file {path} ({exc.strerror or exc}); check its permissions")
    if recorded is not None and current != recorded:
        flag = ALLOW_FLAGS[kind]
        if not allow_changed:
            raise UserError(f"the {kind} file {path} changed since the run started (SHA-256 {current[:12]}... instead of "
                            f"{recorded[:12]}...); restore it, or pass {flag} to go on with the changed file")
        print(f"note: the {kind} file {path} changed since the run started; going on with it ({flag})", file=sys.stderr)
    return current


def file_stem(path: str) -> str:
    """The file's name without folder and suffix: what names run folders, never a raw path."""
    return os.path.splitext(os.path.basename(path))[0]


MODEL_FILE_SUFFIX = ".py"


def is_model_file(spec: str) -> bool:
    """Whether ``--model`` names a function in a file of the user's (``path/to/file.py:function``)."""
    path, _, function = str(spec).rpartition(":")
    return path.endswith(MODEL_FILE_SUFFIX) and function.isidentifier()


def model_file_parts(spec: str) -> tuple[str, str]:
    """(path, function) of ``path/to/file.py:function``."""
    path, _, function = spec.rpartition(":")
    return path, function


def data_label(dataset: str) -> str:
    """The data set's part of a run folder's name: its name, or a data file's stem."""
    return file_stem(dataset) if is_data_file(dataset) else dataset


def model_label(model: str) -> str:
    """The model's part of a run folder's name: its name, or ``<stem>-<function>`` for a model file."""
    if not is_model_file(model):
        return model
    path, function = model_file_parts(model)
    return f"{file_stem(path)}-{function}"
