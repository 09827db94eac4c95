"""MIT Indoor 67: ``Images/<category>/<file>`` with the official ``TrainImages.txt`` / ``TestImages.txt``.

Each split file has one ``category/filename`` line per image (80 training and 20 test images per
class: 5,360 / 1,340). About 28 files are GIF, PNG or BMP, some of them under a ``.jpg`` name; PIL
opens files by content and :class:`~deltatl.data.images.FileImages` converts every image to RGB.
Classes are the categories in sorted order (the order the reference code derived from the folders).
"""
from __future__ import annotations

import os

from ..errors import DeltatlError
from .images import FileImages
from .layout import need_root, read_lines, require

LAYOUT = "Images/<category>/<file>, TrainImages.txt and TestImages.txt in the same folder"
FILES = {"train": "TrainImages.txt", "test": "TestImages.txt"}


def load(data_root: str | None) -> dict[str, FileImages]:
    """``{"train": ..., "test": ...}`` as listed by the two official split files."""
    root = need_root(data_root, "MIT Indoor 67", "Images/, TrainImages.txt and TestImages.txt")
    require(os.path.join(root, "Images"), LAYOUT)
    listed = {split: read_lines(require(os.path.join(root, name), LAYOUT)) for split, name in FILES.items()}
    for split, lines in listed.items():
        path = os.path.join(root, FILES[split])
        if not lines:
            raise DeltatlError(f"{path} lists no images")
        bad = next((line for line in lines if line.count("/") != 1), None)
        if bad is not None:
            raise DeltatlError(f"{path}: expected 'category/filename' lines, got {bad!r}")
    classes = sorted({line.split("/")[0] for line in listed["train"]})
    index = {name: k for k, name in enumerate(classes)}
    out = {}
    for split, lines in listed.items():
        unknown = sorted({line.split("/")[0] for line in lines} - set(index))
        if unknown:
            raise DeltatlError(f"{os.path.join(root, FILES[split])}: category {unknown[0]} has no training image")
        targets = [index[line.split("/")[0]] for line in lines]
        out[split] = FileImages(root, [f"Images/{line}" for line in lines], targets, classes)
    return out
