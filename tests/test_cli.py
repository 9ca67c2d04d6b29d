import os
import signal

import pytest

from utils.cli import SignalCatcher


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_first_signal_is_a_flag_and_second_stops_at_once(sig, code, capfd):
    before = signal.getsignal(sig)
    with pytest.raises(SystemExit) as stopped:
        with SignalCatcher() as catcher:
            os.kill(os.getpid(), sig)
            assert catcher.received == sig  # the work goes on to the end of its step
            os.kill(os.getpid(), sig)
            raise AssertionError("a second signal must stop the work")
    assert stopped.value.code == code
    assert "stopping now" in capfd.readouterr().err
    assert signal.getsignal(sig) is before
