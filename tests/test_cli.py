import argparse
import os
import signal

import pytest

from utils.cli import OneLineParser, SignalCatcher


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


def test_help_shows_readable_defaults_and_leaves_unset_ones_to_their_words(capsys):
    parser = OneLineParser(prog="demo")
    parser.add_argument("--lr", type=float, default=0.05, help="step size")
    parser.add_argument("--steps", type=int, default=None, help="number of steps (default 1000)")
    parser.add_argument("--chunk", type=int, default=None, help="samples per chunk")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--tail", type=float, default=0.2, help="last fraction (default 0.2)")
    text = " ".join(parser.format_help().split())
    assert "step size (default: 0.05)" in text
    assert "number of steps (default 1000)" in text and "(default: None)" not in text
    assert "samples per chunk" in text and "no progress output" in text
    assert "(default: False)" not in text and "(default: 0.2)" not in text


def test_every_option_with_a_readable_default_has_help_text_to_show_it_in():
    """argparse prints no help line, so no default, for an option without help text."""
    import compute_final_fullbs
    import compute_final_gHg
    import plot_results
    import sharpness_gap
    from utils import config, sweep_grid

    parsers = [module.build_parser() for module in (config, compute_final_fullbs, compute_final_gHg, plot_results,
                                                    sharpness_gap, sweep_grid)] + [sweep_grid.build_status_parser()]
    silent = [option for parser in parsers for action in parser._actions for option in action.option_strings[:1]
              if action.default not in (None, False, argparse.SUPPRESS) and not action.help]
    assert silent == []
    assert "seed of the initial weights (default: 8888)" in " ".join(config.build_parser().format_help().split())
