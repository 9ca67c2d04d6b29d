"""Checks shared by the tests that train, interrupt, resume and compare runs."""

import os
import signal

import pandas as pd
import torch

import utils.training
from utils.checkpoints import load_checkpoint
from utils.results import TIME_COLUMN, read_results


def is_timing_column(name: str) -> bool:
    """Columns that depend on elapsed time and so differ between identical runs."""
    return name == TIME_COLUMN or name.endswith("_seconds")


def without_timing(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[[c for c in frame.columns if not is_timing_column(c)]]


def same_results(a, b):
    """results.txt of run folders ``a`` and ``b`` agree exactly, elapsed-time columns aside."""
    fa, fb = read_results(os.path.join(a, "results.txt")), read_results(os.path.join(b, "results.txt"))
    pd.testing.assert_frame_equal(without_timing(fa), without_timing(fb))


def same_parameters(a, b, step):
    """The checkpoints of step ``step`` of ``a`` and ``b`` hold the same parameters and optimiser state."""
    sa = load_checkpoint(os.path.join(a, "checkpoints", f"step_{step}.pt"))
    sb = load_checkpoint(os.path.join(b, "checkpoints", f"step_{step}.pt"))
    for name in sa["model"]:
        assert torch.equal(sa["model"][name], sb["model"][name]), name
    assert str(sa["optimizer"]) == str(sb["optimizer"])


def interrupt_at(monkeypatch, at_step, sig=signal.SIGINT):
    """Deliver a real signal to this process right after step ``at_step`` is logged."""
    original = utils.training._Progress.update

    def update(self, step, info, note=""):
        original(self, step, info, note)
        if step == at_step:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(utils.training._Progress, "update", update)
