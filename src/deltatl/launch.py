"""The ``deltatl`` executable: the command line, with Ctrl-C handled from the very first instant.

Importing PyTorch, torchvision and timm takes seconds. A Ctrl-C in the middle of it raises
KeyboardInterrupt inside their C extensions' initialisation, which turns it into an ImportError with a
traceback (numpy: "cannot load module more than once"), loses it in an optional import's ``except``,
or leaves CPython's "unhandled interrupt" flag set so the process dies by SIGINT after deltatl said
goodbye. So the heavy imports run with Ctrl-C deferred: it is recorded, and acted on (one line,
exit 130) as soon as they are done. This module imports nothing heavy itself.
"""
from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager


@contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Run the block with SIGINT recorded instead of raised; raise KeyboardInterrupt after it if one came.
    Only where SIGINT would raise KeyboardInterrupt: outside the main thread (where handlers cannot be
    set), or when SIGINT is ignored (a background job, ``nohup``) or handled by someone else, the block
    runs unchanged."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    try:
        with deferred_interrupt():
            from .cli import main as run_command

        return run_command(argv)
    except KeyboardInterrupt:  # during start-up; cli.main handles the ones after it
        print("deltatl: interrupted", file=sys.stderr)
        return 130
