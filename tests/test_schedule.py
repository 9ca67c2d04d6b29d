import pytest

from utils.schedule import dense_early, every, is_due


def due_steps(cadence, total):
    return [step for step in range(total) if is_due(cadence, step)]


def test_every_fires_at_zero_and_multiples():
    assert due_steps(every(7), 30) == [0, 7, 14, 21, 28]
    assert due_steps(None, 30) == [] and due_steps([], 30) == []


def test_dense_early_on_a_1000_step_run():
    cadence = dense_early(1000, 6, 20)
    assert cadence == [[0, 16], [100, 48]]  # the late interval: 45 rounded to a multiple of 16
    steps = due_steps(cadence, 1000)
    assert steps[:8] == [0, 16, 32, 48, 64, 80, 96, 144]
    assert len(steps) == 7 + 18


@pytest.mark.parametrize("total", [10, 100, 999, 1000, 12345, 100000])
@pytest.mark.parametrize("early, late", [(6, 20), (20, 180), (5, 20), (1, 1)])
def test_dense_early_counts_and_alignment(total, early, late):
    cadence = dense_early(total, early, late)
    (start, early_every), (early_end, late_every) = cadence
    assert start == 0 and early_end == max(1, total // 10)
    assert early_every >= 1 and late_every % early_every == 0
    steps = due_steps(cadence, total)
    assert steps[0] == 0
    late_steps = [s for s in steps if s >= early_end]
    ideal = (total - early_end) / late
    if ideal >= 2 * early_every:  # the late interval can follow its ideal length
        assert abs(len(late_steps) - late) <= 0.25 * late + 1
