"""The ``deltatl`` executable: the command line, with Ctrl-C handled from the very first instant.

Importing PyTorch takes seconds; a Ctrl-C during that import would otherwise print a traceback from
deep inside it. This module imports nothing heavy itself, so the ``try`` below is in place before
any of that starts.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    try:
        from .cli import main as run_command

        return run_command(argv)
    except KeyboardInterrupt:  # during start-up; cli.main handles the ones after it
        print("deltatl: interrupted", file=sys.stderr)
        return 130
