"""Helpers shared by the loaders of the official dataset layouts (Caltech-256, Stanford Dogs, ...).

Every loader resolves its dataset folder, checks the files it needs with :func:`require` (a missing
file is a one-line :class:`~deltatl.errors.DeltatlError` that names it), reads the official split
files and returns :class:`~deltatl.data.images.FileImages` whose ids are paths relative to the
dataset folder, so the split lists written to a run directory do not depend on where the data lives.
"""
from __future__ import annotations

import os
from typing import Sequence

from ..errors import DeltatlError


def need_root(data_root: str | None, title: str, holding: str) -> str:
    """``data_root``, or an error saying what ``--data-root`` must point at (no default place exists)."""
    if not data_root:
        raise DeltatlError(f"{title} needs `data_root` DIR, the folder holding {holding}")
    if not os.path.isdir(data_root):
        raise DeltatlError(f"`data_root` {data_root} is not a folder")
    return data_root


def find_folder(data_root: str, top: str, marker: str) -> str:
    """The dataset folder: ``data_root/top`` if the archive was extracted into ``data_root``, else
    ``data_root`` itself if it holds ``marker`` (the user pointed at the extracted folder directly)."""
    nested = os.path.join(data_root, top)
    if os.path.exists(os.path.join(nested, marker)):
        return nested
    if os.path.exists(os.path.join(data_root, marker)):
        return data_root
    return nested  # neither: :func:`require` then names the missing file under the archive's layout


def require(path: str, layout: str) -> str:
    """``path`` if it exists, else an error naming it and the layout that was expected."""
    if not os.path.exists(path):
        raise DeltatlError(f"missing {path} (expected {layout})")
    return path


def read_lines(path: str) -> list[str]:
    """The non-empty lines of a text file, stripped (the official files mix Unix and Windows line ends)."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def read_fields(path: str, count: int) -> list[list[str]]:
    """Split every line into ``count`` space-separated fields; the last field may contain spaces."""
    rows = []
    for n, line in enumerate(read_lines(path), 1):
        fields = line.split(maxsplit=count - 1)
        if len(fields) != count:
            raise DeltatlError(f"{path}:{n}: expected {count} fields, got {line!r}")
        rows.append(fields)
    return rows


def to_int(value: str, path: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DeltatlError(f"{path}: expected an integer, got {value!r}") from None


def zero_based(labels: Sequence[int], num_classes: int, source: str) -> list[int]:
    """1-based class ids (as in the official files) as 0-based targets, checked to be in range."""
    bad = [label for label in labels if not 1 <= label <= num_classes]
    if bad:
        raise DeltatlError(f"{source}: class id {bad[0]} outside 1..{num_classes}")
    return [label - 1 for label in labels]


def classes_from_folders(ids: Sequence[str], targets: Sequence[int], num_classes: int, source: str) -> list[str]:
    """Name class k after the folder holding its images, which must be one folder per class.

    The official label files give numbers only; the folder names (``n02085620-Chihuahua``,
    ``001.Black_footed_Albatross``) are the readable names and a cross-check of the labels.
    """
    names: dict[int, str] = {}
    for id_, target in zip(ids, targets):
        folder = os.path.basename(os.path.dirname(id_))
        if names.setdefault(target, folder) != folder:
            raise DeltatlError(f"{source}: class {target + 1} has images in two folders, "
                               f"{names[target]} and {folder}")
    missing = [k + 1 for k in range(num_classes) if k not in names]
    if missing:
        raise DeltatlError(f"{source}: no image of class id {missing[0]}")
    return [names[k] for k in range(num_classes)]
