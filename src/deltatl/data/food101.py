"""Food-101: ``food-101/images/<class>/<id>.jpg`` with ``meta/classes.txt``, ``meta/train.txt`` and
``meta/test.txt`` (lines ``<class>/<id>``, without the extension): 101 classes x 750 / 250 images.

Class k is line k + 1 of ``meta/classes.txt`` (alphabetical in the official archive). The training
labels are noisy on purpose (the dataset's design), so nothing here second-guesses them.
"""
from __future__ import annotations

import os

from ..errors import DeltatlError
from .images import FileImages
from .layout import find_folder, need_root, read_lines, require

TOP = "food-101"
LAYOUT = f"{TOP}/{{images/<class>/<id>.jpg,meta/classes.txt,meta/train.txt,meta/test.txt}}"


def load(data_root: str | None) -> dict[str, FileImages]:
    """``{"train": ..., "test": ...}`` as listed by ``meta/train.txt`` and ``meta/test.txt``."""
    root = find_folder(need_root(data_root, "Food-101", TOP), TOP, "meta")
    require(os.path.join(root, "images"), LAYOUT)
    classes = read_lines(require(os.path.join(root, "meta", "classes.txt"), LAYOUT))
    index = {name: k for k, name in enumerate(classes)}
    out = {}
    for split in ("train", "test"):
        path = require(os.path.join(root, "meta", f"{split}.txt"), LAYOUT)
        lines = read_lines(path)
        if not lines:
            raise DeltatlError(f"{path} lists no images")
        targets = []
        for line in lines:
            name = line.split("/")[0]
            if name not in index or line.count("/") != 1:
                raise DeltatlError(f"{path}: expected '<class>/<id>' with a class of meta/classes.txt, got {line!r}")
            targets.append(index[name])
        out[split] = FileImages(root, [f"images/{line}.jpg" for line in lines], targets, classes)
    return out
