"""Shared behaviour of the command-line scripts: user errors become one line and exit code 2."""

import argparse
import os
import signal
import sys
import threading

from utils.errors import UserError


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Shows an option's default after its help when the default is a value a user can read.

    Options whose default is None or a switch's False are left alone: their help says in words
    what happens when they are not given, and help that already names its default is kept as is.
    argparse prints no help line, hence no default, for an option without help text.
    """

    def _get_help_string(self, action):
        text = action.help
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports mistakes as a UserError (one line) instead of printing usage, and
    whose --help shows the defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def run_cli(work, prog: str) -> int:
    """Call ``work()`` and return its exit code; a UserError prints ``prog: error: ...`` and gives 2.

    A reader of stdout that stops early (``| head``) is not an error: the script ends quietly
    with code 0, its files already written.
    """
    try:
        return work() or 0
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        _discard_stdout()
        return 0


def _discard_stdout() -> None:
    """Point stdout's file descriptor at /dev/null: Python flushes stdout again on exit, and the
    text still buffered for the closed pipe would end in "Exception ignored ... BrokenPipeError"."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # a stand-in stream (a test's); no pipe to silence
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


class SignalCatcher:
    """Turns SIGINT/SIGTERM into a flag that a loop checks between units of work.

    Used as a context manager; the previous handlers come back on exit. Outside the main
    thread (where Python cannot install handlers) it never fires. A second signal means
    "stop now" (a long measurement may keep the current unit of work going for minutes): it
    exits at once with 128 + the signal number, losing the unfinished work as a hard kill
    would. ``repeated_sigterm_stops=False`` keeps a second SIGTERM from doing so (torchrun sends
    its workers SIGTERM twice when it is told to stop; a second SIGINT still stops at once).
    """

    def __init__(self, repeated_sigterm_stops: bool = True):
        self.received = None
        self.repeated_sigterm_stops = repeated_sigterm_stops
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None and (signum != signal.SIGTERM or self.repeated_sigterm_stops):
            # os.write, not print: the signal may land while the main thread is inside a
            # write to stderr, where a buffered write would fail as re-entrant.
            os.write(2, f"second {signal.Signals(signum).name}: stopping now, without finishing the current step\n".encode())
            raise SystemExit(128 + signum)
        self.received = self.received or signal.Signals(signum)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

