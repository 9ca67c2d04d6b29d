import os
import sys

import pytest
import torch

# The tests use tiny networks, where extra intra-op threads only add synchronisation; on a
# busy machine spinning OpenMP threads made single tests a hundred times slower.
torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture
def results_env(tmp_path, monkeypatch):
    """$RESULTS and $DATASETS inside the test's own folder."""
    monkeypatch.setenv("RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("DATASETS", str(tmp_path / "datasets"))
    return tmp_path
