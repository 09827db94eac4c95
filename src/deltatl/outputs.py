"""The files deltatl writes: written whole or not at all, and only where deltatl may write.

A command writes into ``--out`` only if the folder is new, empty, or holds nothing but what that
command writes: it never replaces a file it did not create (a mistyped ``--out ~`` must not overwrite
someone's ``results.md``). Every file is written through :func:`atomic_open`, so a crash, a full disk
or Ctrl-C leaves the previous version intact and no temporary file behind.
"""
from __future__ import annotations

import contextlib
import fnmatch
import os
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

from .errors import DeltatlError


def cache_dir(*parts: str) -> str:
    """A folder of deltatl's cache: ``$DELTATL_CACHE``, else ``$XDG_CACHE_HOME/deltatl``, else
    ``~/.cache/deltatl`` (the test suite points ``DELTATL_CACHE`` at a temporary folder)."""
    root = os.environ.get("DELTATL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "deltatl")
    return os.path.join(root, *parts)


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
        raise DeltatlError(f"`out` {path} is a file; give a folder")
    foreign = sorted(e for e in os.listdir(path) if not (also_own(e) or any(fnmatch.fnmatchcase(e, p) for p in own)))
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise DeltatlError(f"`out` {path} holds files that deltatl {command} did not write ({shown}); "
                           f"choose another folder")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """``open(path, mode)`` that replaces ``path`` only once the file is completely written.

    Writes ``<path>.<pid>.tmp`` (the process id lets two processes write one folder), flushes it to
    disk and renames it over ``path``, which is atomic on POSIX and Windows. On any exception,
    including KeyboardInterrupt and a full disk, the temporary file is removed and ``path`` is
    untouched.
    """
    tmp = f"{os.fspath(path)}.{os.getpid()}.tmp"
    try:
        with open(tmp, mode, **kwargs) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = os.fspath(path)  # a failed write() does not say which file it was writing
        raise
