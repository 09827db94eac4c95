"""The generic list-file dataset: ``--data list --data-root DIR``.

``DIR`` holds ``train.txt`` and ``test.txt`` (and optionally ``val.txt``, then used as the validation
split instead of one held out of ``train.txt``), one ``relative/path label`` line per image; paths are
relative to ``DIR`` and may contain spaces (the label is the last field); labels are 0-based integers.
An optional ``classes.txt`` names class k on line k + 1; without it classes are named "0", "1", ...
It is the format of the ``splits/*.txt`` lists of a run directory, whose paths are relative to the
dataset's folder: copied there, they reproduce that run's exact split.
"""
from __future__ import annotations

import os

from ..errors import DeltatlError
from .images import FileImages
from .layout import need_root, read_lines, require
from .splits import read_list

LAYOUT = "train.txt and test.txt with 'relative/path label' lines (optional val.txt, classes.txt)"


def load(data_root: str | None) -> dict[str, FileImages]:
    """``{"train": ..., "test": ..., optional "val": ...}`` from the list files in ``data_root``."""
    root = need_root(data_root, "`data` list", "train.txt and test.txt")
    splits = ["train", "test"] + (["val"] if os.path.isfile(os.path.join(root, "val.txt")) else [])
    lists = {split: read_list(require(os.path.join(root, f"{split}.txt"), LAYOUT)) for split in splits}
    if not lists["train"][0]:
        raise DeltatlError(f"{os.path.join(root, 'train.txt')} lists no images")
    names_file = os.path.join(root, "classes.txt")
    classes = read_lines(names_file) if os.path.isfile(names_file) \
        else [str(k) for k in range(max(lists["train"][1]) + 1)]
    present = set(lists["train"][1])
    for split, (_, targets) in lists.items():
        bad = next((t for t in targets if not 0 <= t < len(classes)), None)
        if bad is not None:
            raise DeltatlError(f"{os.path.join(root, split + '.txt')}: label {bad} outside 0..{len(classes) - 1}")
    missing = [k for k in range(len(classes)) if k not in present]
    if missing:
        raise DeltatlError(f"{os.path.join(root, 'train.txt')}: no training image of class {missing[0]} "
                           f"({classes[missing[0]]})")
    return {split: FileImages(root, ids, targets, classes) for split, (ids, targets) in lists.items()}
