"""Shared behaviour of the command-line scripts: user errors become one line and exit code 2."""

import argparse
import sys

from utils.errors import UserError


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports mistakes as a UserError (one line) instead of printing usage."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def run_cli(work, prog: str) -> int:
    """Call ``work()`` and return its exit code; a UserError prints ``prog: error: ...`` and gives 2."""
    try:
        return work() or 0
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
