"""Caltech-256: ``256_ObjectCategories/NNN.name/NNN_XXXX.jpg``, 257 class folders (``257.clutter`` included).

The dataset has no official split. Li et al. (2018, L2-SP), whose procedure the DELTA paper follows
for Caltech256-30 / -60, used all 257 classes and, per class, images 1-60 for training and 61-80 for
testing (their create_caltech.py picks files by number; 257 x 20 = 5,140 test images). Here, within
each class folder, files are ordered by name (``NNN_0001.jpg`` < ``NNN_0002.jpg`` ...; plain code-point
order, never the directory listing order) and split by position:

* 1-60: the training pool. ``caltech256-30`` draws 30 of them per class with ``--seed``
  (:func:`deltatl.data.splits.sample_per_class`: one generator per (seed, class), over the sorted
  pool), ``caltech256-60`` takes all 60, as L2-SP did.
* 61-80: the test set, the same for every seed.
* 81-100, where a class has them: the validation split, fixed and used for monitoring only. Every
  class has at least 80 images, so with 60 training and 20 test images some classes have nothing
  left; validation images therefore come from beyond the protocol's 80, never out of its 60.
"""
from __future__ import annotations

import os
import re

from ..errors import DeltatlError
from .images import IMAGE_EXTENSIONS, FileImages
from .layout import need_root

TOP = "256_ObjectCategories"
LAYOUT = f"{TOP}/NNN.name/NNN_XXXX.jpg"
CLASS_FOLDER = re.compile(r"^\d{3}\.")  # skips stray entries next to the 257 class folders


def _class_files(folder: str) -> list[str]:
    """The image files directly in a class folder, sorted by name (subfolders such as 056.dog/greg and
    files without an image extension such as 198.spider/RENAME2 are not part of the dataset)."""
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
                  and os.path.isfile(os.path.join(folder, f)))


def find_root(data_root: str) -> str:
    """``data_root/256_ObjectCategories``, or ``data_root`` itself if it holds the class folders."""
    nested = os.path.join(data_root, TOP)
    if os.path.isdir(nested):
        return nested
    if any(CLASS_FOLDER.match(d) for d in os.listdir(data_root)):
        return data_root
    raise DeltatlError(f"missing {nested} (expected {LAYOUT})")


def load(data_root: str | None, train_pool: int = 60, test: int = 20, val: int = 20) -> dict[str, FileImages]:
    """``{"train": pool, "val": ..., "test": ...}`` split by position within each sorted class folder.

    Args:
        data_root: the folder holding ``256_ObjectCategories/`` (or that folder itself).
        train_pool: the first ``train_pool`` images of each class form the training pool.
        test: the next ``test`` images are the fixed test set.
        val: at most this many of the images after those form the validation split.
    """
    root = find_root(need_root(data_root, "Caltech-256", TOP))
    classes = sorted(d for d in os.listdir(root) if CLASS_FOLDER.match(d) and os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise DeltatlError(f"no class folders NNN.name in {root} (expected {LAYOUT})")
    ids: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    targets: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    bounds = {"train": (0, train_pool), "test": (train_pool, train_pool + test),
              "val": (train_pool + test, train_pool + test + val)}
    for label, name in enumerate(classes):
        files = _class_files(os.path.join(root, name))
        if len(files) < train_pool + test:
            raise DeltatlError(f"class folder {os.path.join(root, name)} has {len(files)} images, fewer than "
                               f"the {train_pool + test} of the protocol (Caltech-256 has at least 80 per class)")
        for split, (start, stop) in bounds.items():
            chosen = files[start:stop]
            ids[split] += [f"{name}/{f}" for f in chosen]
            targets[split] += [label] * len(chosen)
    return {split: FileImages(root, ids[split], targets[split], classes) for split in ids}
