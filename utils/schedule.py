"""When each measurement and the full loss are computed (checkpoints are placed by utils/training.py).

A cadence is data, not scattered ``if step % k`` tests: a list of segments
``[[start_step, every], ...]`` sorted by start. Step ``s`` is scheduled when ``s % every == 0``
for the segment that contains ``s`` (the last segment whose start is <= s). Every cadence
therefore fires at step 0 and at multiples of its interval, and the whole schedule can be
written to ``config.json`` as plain JSON.
"""

from __future__ import annotations

Cadence = list  # [[start_step, every], ...]


def every(k: int) -> Cadence:
    """A fixed interval: steps 0, k, 2k, ..."""
    return [[0, int(k)]]


def dense_early(total_steps: int, early_measurements: int, late_measurements: int) -> Cadence:
    """Dense during the first tenth of training, sparser afterwards.

    The first ``total_steps // 10`` steps get about ``early_measurements`` evaluations, the
    rest about ``late_measurements``; intervals are at least one step, and the late interval
    is the multiple of the early one nearest to its ideal length, so the two segments line up.
    """
    early_end = max(1, total_steps // 10)
    early_every = max(1, early_end // max(1, early_measurements))
    late_every = max(1, (total_steps - early_end) // max(1, late_measurements))
    late_every = early_every * max(1, round(late_every / early_every))
    return [[0, early_every], [early_end, late_every]]


def is_due(cadence: Cadence | None, step: int) -> bool:
    """True when ``step`` is scheduled under ``cadence`` (None: never)."""
    if not cadence:
        return False
    interval = cadence[0][1]
    for start, segment_every in cadence:
        if step >= start:
            interval = segment_every
        else:
            break
    return step % interval == 0
