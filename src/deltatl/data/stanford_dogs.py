"""Stanford Dogs 120: ``Images/nXXXXXXXX-Breed/*.jpg`` and the official ``lists/{train,test}_list.mat``.

The MATLAB files hold ``file_list`` (an N x 1 cell of relative paths such as
``n02085620-Chihuahua/n02085620_5927.jpg``) and ``labels`` (N x 1, 1-based); 100 training images per
class, 12,000 / 8,580. ``lists.tar`` extracts the .mat files without a folder, so they are also
looked for next to ``Images/``. ``n02105855_2933.jpg`` is really a PNG: PIL opens files by content.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import DeltatlError
from .images import FileImages
from .layout import classes_from_folders, find_folder, need_root, require, zero_based

LAYOUT = "Images/<breed>/*.jpg and lists/{train,test}_list.mat"


def read_mat_list(path: str) -> tuple[list[str], list[int]]:
    """``(file_list, labels)`` of one official split file; labels stay 1-based."""
    from scipy.io import loadmat  # a run-time dependency of this loader only

    try:
        mat = loadmat(path)
    except (ValueError, OSError, TypeError) as exc:
        raise DeltatlError(f"{path} is not a readable MATLAB file: {exc}") from None
    for key in ("file_list", "labels"):
        if key not in mat:
            raise DeltatlError(f"{path} has no '{key}' entry (expected the official train/test_list.mat)")
    # A cell array comes back as an object array of 1-element string arrays: squeeze both levels.
    files = [str(np.asarray(cell).ravel()[0]) for cell in np.asarray(mat["file_list"]).ravel()]
    labels = [int(v) for v in np.asarray(mat["labels"]).ravel()]
    if len(files) != len(labels):
        raise DeltatlError(f"{path}: {len(files)} files but {len(labels)} labels")
    return files, labels


def load(data_root: str | None) -> dict[str, FileImages]:
    """``{"train": ..., "test": ...}`` as the official lists define them; class k = label k + 1.

    The number of classes (120 in the official files) is the largest training label.
    """
    root = need_root(data_root, "Stanford Dogs", "Images/ and lists/")
    require(os.path.join(root, "Images"), LAYOUT)
    lists = find_folder(root, "lists", "train_list.mat")
    paths = {split: require(os.path.join(lists, f"{split}_list.mat"), LAYOUT) for split in ("train", "test")}
    read = {split: read_mat_list(path) for split, path in paths.items()}
    num_classes = max(read["train"][1], default=0)
    if num_classes < 1:
        raise DeltatlError(f"{paths['train']} lists no images")
    out = {}
    for split, (files, labels) in read.items():
        ids = [f"Images/{f}" for f in files]
        targets = zero_based(labels, num_classes, paths[split])
        out[split] = FileImages(root, ids, targets, classes_from_folders(ids, targets, num_classes, paths[split]))
    if out["test"].classes != out["train"].classes:
        raise DeltatlError(f"{paths['test']}: class folders differ from those of {paths['train']}")
    return out
