"""The run folder contract: results.txt, json files and atomic writes.

``results.txt`` holds ``#`` comment lines (a title and the command line), one header line of
column names and one comma-separated row per logged step, ``nan`` where a value was not
measured. ``pandas.read_csv(path, comment='#')`` returns named columns; readers use names,
never positions. Columns that measure elapsed time are ``wall_time`` or end in ``_seconds``.
Every reader of results.txt in the suite goes through :func:`parse_results` (the analysis
scripts, ``--resume`` and ``sweep.py status``); neither torch nor pandas is imported here at
module level, so the sweep launcher stays light.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import time

from utils.errors import UserError
from utils.resources import space_for

BASE_COLUMNS = ("epoch", "step", "batch_loss", "full_loss", "full_accuracy")
TIME_COLUMN = "wall_time"
# summary.json's statuses of a run that ended; "interrupted" is the other one.
ENDED = ("finished", "stopped_at_loss", "diverged")


def ended_last_row(summary, path: str = "summary.json") -> int | None:
    """The step of the last row in results.txt of a run that ended, from its summary.json at
    ``path`` (training.py writes the row of its last step always): final_step - 1 for a finished
    run, final_step for one stopped at its loss or diverged; None for a run that did not end. A
    file whose rows stop short of it lost them, and ``training.py --resume`` completes the run.
    A final_step that is not a step number is a UserError."""
    if not isinstance(summary, dict) or summary.get("status") not in ENDED:
        return None
    final_step = summary.get("final_step", 0)
    if isinstance(final_step, bool) or not isinstance(final_step, int):
        raise UserError(f"{path}: final_step {final_step!r} is not a step number; delete it, then training.py "
                        "--resume on the run rewrites it")
    return final_step - (summary["status"] == "finished")


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
    ``training.py --resume`` drops. Values of the columns in ``left_out`` are accepted and not
    written (a run resumed from a file started before those columns existed).
    """

    def __init__(self, path: str, columns: list[str], comments: list[str] | None = None, append: bool = False,
                 left_out: tuple[str, ...] = ()):
        self.path = path
        self.columns = list(columns)
        self.left_out = set(left_out)
        self._file = open(path, "ab" if append else "xb", buffering=0)
        if not append:
            self._append("".join(f"# {line}\n" for line in comments or []) + ",".join(self.columns) + "\n")

    def _append(self, text: str) -> None:
        data = memoryview(text.encode("utf-8"))
        with space_for(self.path, len(data)):
            while data:
                data = data[self._file.write(data):]

    def write_row(self, values: dict) -> None:
        unknown = set(values) - set(self.columns) - self.left_out
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


DAMAGED = "the run folder is damaged"


@dataclasses.dataclass
class ResultsTable:
    """results.txt split into its parts, no value converted: the ``#`` lines, the column names
    of the header (None without one), the complete rows as they stand in the file, and whether
    a row was ``cut`` short (by a kill, or damaged: another number of fields than the header)
    and left out with everything after it."""

    path: str
    comments: list[str]
    columns: list[str] | None
    rows: list[str]
    cut: bool

    def _header(self) -> str:
        if self.columns is None:
            raise UserError(f"{self.path} has no header line; {DAMAGED}")
        return ",".join(self.columns)

    def _step_index(self) -> int:
        if "step" not in self.columns:
            raise UserError(f"{self.path} has no step column in its header line; {DAMAGED}")
        return self.columns.index("step")

    def steps(self) -> list[int]:
        """The step of each complete row; a header without a step column, or a row whose step
        is not a whole number, is a UserError."""
        if self.columns is None:
            return []
        at = self._step_index()
        steps = []
        for row in self.rows:
            step = row.split(",")[at]
            if not step.isdigit():
                raise UserError(f"{self.path} has a row with step {step!r}; {DAMAGED}")
            steps.append(int(step))
        return steps

    def before(self, step: int) -> ResultsTable:
        """The same table with only the rows of steps before ``step``."""
        return dataclasses.replace(self, rows=[row for at, row in zip(self.steps(), self.rows) if at < step], cut=False)

    def text(self) -> str:
        """The comments, the header and the complete rows: results.txt without its cut row."""
        return "\n".join([*self.comments, self._header(), *self.rows]) + "\n"

    def frame(self):
        """The complete rows as a pandas DataFrame with named columns; a file without a header
        or a step column, or with values that are not numbers, is a UserError."""
        import io

        import pandas as pd

        text = self.text()
        try:
            frame = pd.read_csv(io.StringIO(text), comment="#")
        except pd.errors.ParserError as exc:  # a stray quote runs a field on to the end of the file
            raise UserError(f"{self.path} is not comma-separated values ({str(exc).strip().splitlines()[-1]}); {DAMAGED}")
        self._step_index()
        # A header without rows (a run that has not logged its first step) reads as text columns.
        garbled = [column for column in frame.columns if len(frame) and not pd.api.types.is_numeric_dtype(frame[column])]
        if garbled:
            raise UserError(f"{self.path} has values that are not numbers in column {garbled[0]}; {DAMAGED}")
        if frame["step"].isna().any():
            raise UserError(f"{self.path} has rows without a step (nan in column step); {DAMAGED}")
        return frame


def parse_results(text: str, path: str) -> ResultsTable:
    """The parts of results.txt's ``text`` (``path`` names it in errors).

    ``#`` lines are comments and blank lines are skipped, wherever they stand; the first other
    line is the header. Rows are kept up to the first that is cut short: the piece after the
    last newline (a row a kill left unfinished) or a line with another number of fields than
    the header (a damaged one).
    """
    *lines, unfinished = text.split("\n")
    comments, columns, rows, cut = [], None, [], False
    for line in lines:
        if not line:
            continue
        if line.startswith("#"):
            comments.append(line)
        elif columns is None:
            columns = line.split(",")
        elif len(line.split(",")) == len(columns):
            rows.append(line)
        else:
            cut = True
            break
    else:
        cut = bool(unfinished) and not unfinished.startswith("#")
    return ResultsTable(str(path), comments, columns, rows, cut)


def read_results_table(path: str, fix: str = DAMAGED) -> ResultsTable:
    """results.txt parsed by :func:`parse_results`; bytes that are not UTF-8 are a UserError
    ending in ``fix`` (:func:`read_text`)."""
    return parse_results(read_text(path, fix=fix), path)


def read_results(path: str):
    """The complete rows of results.txt as a pandas DataFrame with named columns (a row cut
    short by a kill is left out); a damaged file is a UserError."""
    return read_results_table(path).frame()


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


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically; a full disk is an OutOfSpace naming ``path``."""
    with space_for(path, len(data)), atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
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


def read_versioned_json(path: str, *, version: int, kind: str, folder: str, missing: str) -> dict:
    """The JSON object in ``path`` (config.json of a run, grid.json of a sweep), of format
    ``version``. A missing file is the UserError ``missing``; a file that is not JSON (or not
    UTF-8), not an object or of another version is a one-line UserError naming the file, the
    ``kind`` of format and the ``folder`` (run, sweep) that holds it."""
    if not os.path.isfile(path):
        raise UserError(missing)
    try:
        record = read_json(path)
    except (OSError, ValueError):
        raise UserError(f"{path} is not valid JSON; the {folder} folder is damaged")
    if not isinstance(record, dict) or record.get("version") != version:
        found = record.get("version") if isinstance(record, dict) else None
        raise UserError(f"{path} has {kind} format version {found!r}, this code reads version {version}; "
                        f"use the EOSS version that wrote the {folder}")
    return record


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
