"""Output folders of the commands that write several files (compare, search, report).

A command writes into ``--out`` only if the folder is new, empty, or holds nothing but what that
command writes: it never replaces a file it did not create (a mistyped ``--out ~`` must not overwrite
someone's ``results.md``).
"""
from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Sequence

from .errors import DeltatlError


def check_output_folder(path: str, command: str, own: Sequence[str],
                        also_own: Callable[[str], bool] = lambda name: False) -> None:
    """Refuse ``path`` unless it is absent, an empty folder, or a folder whose entries all match ``own``.

    Args:
        command: named in the message (``compare``...).
        own: shell patterns of the entries (files or folders, top level) the command writes.
        also_own: a test for entries that patterns cannot describe (e.g. a folder per method name).

    Raises:
        DeltatlError: ``path`` is a file, or holds an entry the command did not write.
    """
    if not os.path.exists(path):
        return
    if not os.path.isdir(path):
        raise DeltatlError(f"--out {path} is a file; give a folder")
    foreign = sorted(e for e in os.listdir(path) if not (also_own(e) or any(fnmatch.fnmatchcase(e, p) for p in own)))
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise DeltatlError(f"--out {path} holds files that deltatl {command} did not write ({shown}); "
                           f"choose another folder")
