"""The one exception type that the CLI turns into a one-line error message, and how the CLI words it.

Library code names a setting by its ``TrainConfig`` field in backticks (`` `drop_path_rate` ``), the
name a library caller sets. The command line converts such names into
its own flags at the edge (:func:`on_command_line`), so no library module knows the CLI's spelling.
"""
from __future__ import annotations

import re
from collections.abc import Collection

SETTING = re.compile(r"`([a-z][a-z0-9_]*)`")


class DeltatlError(Exception):
    """A problem with the user's input (data, model name, checkpoint, run directory...).

    The CLI prints ``deltatl: error: <message>`` and exits with status 2, without a traceback.
    Library callers get an ordinary exception.
    """


def on_command_line(message: str, flags: Collection[str]) -> str:
    """``message`` as the command line shows it: each `` `setting` `` that is one of ``flags`` (the
    command's option names without ``--``, e.g. ``drop-path-rate``) becomes ``--drop-path-rate``; any
    other setting loses its backticks."""
    def flag(match: re.Match[str]) -> str:
        name = match[1].replace("_", "-")
        return f"--{name}" if name in flags else match[1]

    return SETTING.sub(flag, message)
