"""The one exception type that the CLI turns into a one-line error message, and how the CLI words it.

Library code names a setting by its ``TrainConfig`` field in backticks (`` `drop_path_rate` ``), the
name a library caller sets. The command line converts such names into
its own flags at the edge (:func:`on_command_line`), so no library module knows the CLI's spelling.
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable, Collection
from typing import TypeVar

SETTING = re.compile(r"`([a-z][a-z0-9_]*)`")
T = TypeVar("T")


class DeltatlError(Exception):
    """A problem with the user's input (data, model name, checkpoint, run directory...).

    The CLI prints ``deltatl: error: <message>`` and exits with status 2, without a traceback.
    Library callers get an ordinary exception.
    """


class RunInUse(DeltatlError):
    """Another process is training into the run directory now (its lock is held): a command that runs
    many runs (``compare``, a search's refit) leaves it to that process and comes back for its result."""


def when_free(run: Callable[[], T], poll_seconds: float) -> T:
    """``run()``, retried every ``poll_seconds`` while it raises :class:`RunInUse` (another process
    trains that run: once it has finished, ``run()`` reuses its result)."""
    while True:
        try:
            return run()
        except RunInUse:
            time.sleep(poll_seconds)


def on_command_line(message: str, flags: Collection[str]) -> str:
    """``message`` as the command line shows it: each `` `setting` `` that is one of ``flags`` (the
    command's option names without ``--``, e.g. ``drop-path-rate``) becomes ``--drop-path-rate``; any
    other setting loses its backticks."""
    def flag(match: re.Match[str]) -> str:
        name = match[1].replace("_", "-")
        return f"--{name}" if name in flags else match[1]

    return SETTING.sub(flag, message)
