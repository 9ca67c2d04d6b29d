"""The measurement registry is the one front door: flags, settings, columns, streams, panels and
the README's table all follow from its entries."""

import os
import re
import zlib

import pytest

from utils import registry
from utils.config import RunConfig, build_parser, validate
from utils.errors import UserError
from utils.monitor import measurement_columns, measurement_schedule
from utils.plotting import PANELS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_measurement_flags() -> list[str]:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    start = text.index("## Measurements")
    table = text[start:text.index("\n## ", start)]
    return re.findall(r"^\| `(--[a-z-]+)`", table, flags=re.MULTILINE)


def test_the_readme_table_has_one_row_per_measurement_in_registry_order():
    assert readme_measurement_flags() == [m.flag for m in registry.MEASUREMENTS]


def test_every_entry_has_a_switch_a_cadence_and_flags():
    parser = build_parser()
    for m in registry.MEASUREMENTS:
        args = parser.parse_args([m.flag, f"{m.flag}-every", "3"])
        on, off = (1, 0) if m.argument else (True, False)
        assert getattr(args, m.name) is on and getattr(args, f"{m.name}_every") == 3
        assert getattr(RunConfig(), m.name) is off and getattr(RunConfig(), f"{m.name}_every") is None


def test_columns_streams_and_panels_come_from_the_entries():
    everything = RunConfig(**{m.name: True for m in registry.MEASUREMENTS}, num_eigenvalues=3, momentum=0.9)
    columns = measurement_columns(everything)
    assert len(columns) == len(set(columns))
    for m in registry.MEASUREMENTS:
        for column in m.columns:
            assert {f"{column.name}_seconds", f"{column.name}_hvps"} <= set(columns)
            assert (column.name in columns) == column.valued
            assert ({f"{column.name}_se", f"{column.name}_n"} <= set(columns)) == column.with_se
            drawn = any(curve.column == column.name for panel in PANELS for curve in panel.curves)
            assert drawn == (column.panel is not None)
    assert columns[:5] == ["lambda_max", "lambda_2", "lambda_3", "lambda_max_seconds", "lambda_max_hvps"]
    assert list(measurement_schedule(everything, 1000)) == [m.name for m in registry.MEASUREMENTS]
    # Streams are seeds measure_seed * 1000 + crc32(name) % 1000: two names must never share one.
    streams = [m.name for m in registry.MEASUREMENTS] + [m.final_stream for m in registry.MEASUREMENTS if m.final_stream]
    assert len({zlib.crc32(name.encode()) % 1000 for name in streams}) == len(streams)


@pytest.mark.parametrize("m", [m for m in registry.MEASUREMENTS if m.needs], ids=lambda m: m.name)
def test_a_measurement_of_a_setting_the_run_lacks_is_refused(m):
    with pytest.raises(UserError, match=re.escape(f"{m.flag} {m.needs_reason}; it needs")):
        validate(RunConfig(**{m.name: True}))
