"""The run folder contract: results.txt, json files and atomic writes.

``results.txt`` holds ``#`` comment lines (a title and the command line), one header line of
column names and one comma-separated row per logged step, ``nan`` where a value was not
measured. ``pandas.read_csv(path, comment='#')`` returns named columns; readers use names,
never positions. Columns that measure elapsed time are ``wall_time`` or end in ``_seconds``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time

from utils.errors import UserError
from utils.resources import space_for

BASE_COLUMNS = ("epoch", "step", "batch_loss", "full_loss", "full_accuracy")
TIME_COLUMN = "wall_time"


def is_timing_column(name: str) -> bool:
    """Columns that depend on elapsed time and so differ between identical runs."""
    return name == TIME_COLUMN or name.endswith("_seconds")


def format_value(value) -> str:
    if value is None:
        return "nan"
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if math.isnan(value):
        return "nan"
    return repr(value)  # shortest string that round-trips the float exactly


class ResultsWriter:
    """Appends rows to results.txt, each reaching the file at once so a killed run keeps what it logged.

    Writes are unbuffered, so nothing is pending after a failed write. A full disk is an
    :class:`~utils.resources.OutOfSpace` naming the file and the bytes of the text that did not
    fit; the part of a row that did reach the file is a cut-off last line, which
    ``training.py --resume`` drops.
    """

    def __init__(self, path: str, columns: list[str], comments: list[str] | None = None, append: bool = False):
        self.path = path
        self.columns = list(columns)
        self._file = open(path, "ab" if append else "xb", buffering=0)
        if not append:
            self._append("".join(f"# {line}\n" for line in comments or []) + ",".join(self.columns) + "\n")

    def _append(self, text: str) -> None:
        data = memoryview(text.encode("utf-8"))
        with space_for(self.path, len(data)):
            while data:
                data = data[self._file.write(data):]

    def write_row(self, values: dict) -> None:
        unknown = set(values) - set(self.columns)
        if unknown:
            raise KeyError(f"values for columns that results.txt does not have: {sorted(unknown)}")
        self._append(",".join(format_value(values.get(c)) for c in self.columns) + "\n")

    def close(self) -> None:
        self._file.close()


def read_text(path: str, fix: str = "the file is damaged") -> str:
    """The contents of a UTF-8 text file; bytes that are not UTF-8 are a UserError naming the
    file, the line and the column (``fix`` says what to do about it)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise UserError(f"{path} line {line} is not UTF-8 text (byte 0x{data[exc.start]:02x} at column {column}); {fix}")


def read_results(path: str):
    """results.txt as a pandas DataFrame with named columns."""
    import pandas as pd

    return pd.read_csv(path, comment="#")


@contextlib.contextmanager
def atomic_output(path: str, suffix: str = ""):
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    Readers never see half a file, and a failure leaves no temporary behind. The file gets
    the permissions a plain ``open`` would give it (mkstemp's are owner-only), so
    collaborators on a shared cluster can read results.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=suffix or os.path.basename(path))
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically; a full disk is an OutOfSpace naming ``path``."""
    with space_for(path, len(text.encode())), atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def _json_safe(value):
    """NaN and infinities become null: strict JSON readers reject them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def atomic_write_json(path: str, data) -> None:
    atomic_write_text(path, json.dumps(_json_safe(data), indent=2, allow_nan=False) + "\n")


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def make_run_folder(root: str, dataset: str, model: str, lr: float, batch: int) -> str:
    """Create ``root/<dataset>_<model>/<YYYYmmdd_HHMMSS>_lr<lr>_b<batch>[_<k>]/`` and return it.

    ``os.mkdir`` is atomic, so runs started in the same second get distinct suffixes instead
    of sharing a folder.
    """
    parent = os.path.join(root, f"{dataset}_{model}")
    os.makedirs(parent, exist_ok=True)
    stem = f"{time.strftime('%Y%m%d_%H%M%S')}_lr{lr:g}_b{batch}"
    for attempt in range(1, 10_000):
        name = stem if attempt == 1 else f"{stem}_{attempt}"
        path = os.path.join(parent, name)
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a run folder under {parent}")
