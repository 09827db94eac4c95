"""The image-folder layout: ``root/train/<class>/*``, ``root/test/<class>/*``, optional ``root/val/``."""
from __future__ import annotations

import os

from ..errors import DeltatlError
from .images import IMAGE_EXTENSIONS, FileImages


def scan_split(root: str, split: str, classes: list[str] | None = None) -> FileImages:
    """Index ``root/split/<class>/<image>``; files that are not images (by extension) are ignored.

    Args:
        classes: the class list the split must have (the training split's); None to discover it.
    """
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise DeltatlError(f"missing folder {split_dir} (expected {root}/{{train,test}}/<class>/<images>)")
    found = sorted(d for d in os.listdir(split_dir)
                   if os.path.isdir(os.path.join(split_dir, d)) and not d.startswith("."))
    if not found:
        raise DeltatlError(f"{split_dir} has no class folders")
    if classes is not None and found != classes:
        only_here = sorted(set(found) - set(classes))
        only_train = sorted(set(classes) - set(found))
        raise DeltatlError(f"class folders of {split_dir} differ from train: "
                           f"only in {split}: {only_here or '-'}; only in train: {only_train or '-'}")
    ids, targets = [], []
    for label, name in enumerate(found):
        files = sorted(f for f in os.listdir(os.path.join(split_dir, name))
                       if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
        if not files:
            raise DeltatlError(f"class folder {os.path.join(split_dir, name)} has no images")
        ids += [os.path.join(split, name, f) for f in files]
        targets += [label] * len(files)
    return FileImages(root, ids, targets, found)


def is_image_folder(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "train"))
