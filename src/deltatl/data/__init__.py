"""Datasets: named datasets and image folders, few-shot sampling, held-out validation, transforms."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable

from ..errors import DeltatlError
from . import caltech256, cub, fashion_mnist, food101, list_file, mit_indoor, stanford_dogs
from .folder import is_image_folder, scan_split
from .images import ArrayImages, FileImages, ImageCollection, TransformedImages, check_readable
from .splits import read_list, sample_per_class, validation_count, write_list

# name -> loader(data_root) returning {"train": ..., "test": ..., optional "val": ...}
DATASETS: dict[str, Callable[[str | None], dict[str, ImageCollection]]] = {
    "fashion-mnist": fashion_mnist.load,
    # Official layouts (README "Datasets of the papers"); --data-root is the extracted archive's folder.
    "caltech256": caltech256.load,  # training pool of 60 per class; choose --train-per-class
    "caltech256-30": caltech256.load,  # see PROTOCOL_TRAIN_PER_CLASS
    "caltech256-60": caltech256.load,
    "stanford-dogs": stanford_dogs.load,
    "mit-indoor67": mit_indoor.load,
    "cub200": cub.load,
    "food101": food101.load,
    "list": list_file.load,
}

# Named datasets whose protocol fixes the training images drawn per class (with --seed) from the pool.
PROTOCOL_TRAIN_PER_CLASS: dict[str, int] = {"caltech256-30": 30, "caltech256-60": 60}


@dataclass
class DataSplits:
    """The three disjoint splits of a run. ``val`` comes out of the training data, never the test set."""

    train: ImageCollection
    val: ImageCollection
    test: ImageCollection

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    def write_lists(self, folder: str) -> None:
        """Record the exact images of each split as ``<split>.txt`` list files."""
        os.makedirs(folder, exist_ok=True)
        for name in ("train", "val", "test"):
            split = getattr(self, name)
            write_list(os.path.join(folder, f"{name}.txt"), split.ids, split.targets)

    def check_lists(self, folder: str) -> None:
        """Fail if ``folder``'s list files (from an earlier session of this run) name other images."""
        for name in ("train", "val", "test"):
            path = os.path.join(folder, f"{name}.txt")
            if os.path.isfile(path) and read_list(path)[0] != getattr(self, name).ids:
                raise DeltatlError(f"the {name} images differ from those recorded in {path}; "
                                   f"the data changed since this run started")


def _check_files(splits: dict[str, ImageCollection], data: str, progress: bool) -> dict[str, ImageCollection]:
    """Skip unreadable image files with a warning; a class that loses all its images is an error."""
    out: dict[str, ImageCollection] = {}
    for name, split in splits.items():
        out[name], bad = check_readable(split, progress)
        if bad:
            warnings.warn(f"skipped {len(bad)} unreadable image file(s) in {data}/{name} "
                          f"(first: {bad[0]})", stacklevel=3)
        classes = split.classes
        # Only classes that had images: an official validation split may lack some classes.
        empty = sorted({classes[t] for t in split.targets} - {classes[t] for t in out[name].targets})
        if empty:
            raise DeltatlError(f"no readable images in class folder(s) {', '.join(empty)} of {data}/{name}")
    return out


def _open(data: str, data_root: str | None, check_images: bool, progress: bool) -> dict[str, ImageCollection]:
    if data in DATASETS:
        named = DATASETS[data](data_root)
        # Official layouts are image files too (arrays need no check).
        if check_images and all(isinstance(split, FileImages) for split in named.values()):
            return _check_files(named, data, progress)
        return named
    if not os.path.isdir(data):
        names = ", ".join(sorted(DATASETS))
        raise DeltatlError(f"`data` '{data}' is neither a dataset name ({names}) nor an existing folder")
    if not is_image_folder(data):
        raise DeltatlError(f"{data} has no train/ folder (expected {data}/{{train,test}}/<class>/<images>)")
    splits: dict[str, ImageCollection] = {"train": scan_split(data, "train")}
    classes = splits["train"].classes
    for name in ("val", "test"):
        if name == "test" or os.path.isdir(os.path.join(data, name)):
            splits[name] = scan_split(data, name, classes)
    return _check_files(splits, data, progress) if check_images else splits


def load_splits(data: str, data_root: str | None = None, *, train_per_class: int | None = None,
                val_per_class: int | None = None, val_fraction: float = 0.2, test_per_class: int | None = None,
                seed: int = 0, check_images: bool = True, progress: bool = True) -> DataSplits:
    """Open a dataset and carve its training data into train and validation, stratified and seeded.

    Args:
        data: a dataset name (see ``DATASETS``; those in ``PROTOCOL_TRAIN_PER_CLASS`` fix
            ``train_per_class``) or an image-folder path.
        train_per_class: draw exactly this many training images per class (the papers' "-30"/"-60"
            protocol); None keeps all remaining training images.
        val_per_class: validation images held out per class; None means ``val_fraction`` of the
            class's training images (of ``train_per_class`` when given). Ignored when the dataset has
            its own validation split.
        test_per_class: evaluate on a seeded subset of this many test images per class (quick runs);
            None uses the whole test set, as the papers did.
        check_images: decode every image file once and skip unreadable ones with a warning.
    """
    if train_per_class is not None and train_per_class < 1:
        raise DeltatlError("`train_per_class` must be at least 1")
    fixed = PROTOCOL_TRAIN_PER_CLASS.get(data)
    if fixed is not None:
        if train_per_class not in (None, fixed):
            raise DeltatlError(f"`data` {data} trains on {fixed} images per class by definition; use "
                               f"`data` {data.rsplit('-', 1)[0]} `train_per_class` {train_per_class}")
        train_per_class = fixed
    splits = _open(data, data_root, check_images, progress)
    pool, test = splits["train"], splits["test"]
    if test_per_class:
        test = test.select(sample_per_class(test.targets, [test_per_class], seed, test.classes)[0])
    if "val" in splits:
        train = pool if train_per_class is None else pool.select(
            sample_per_class(pool.targets, [train_per_class], seed, pool.classes)[0])
        return DataSplits(train, splits["val"], test)
    if train_per_class is not None:
        n_val = validation_count(train_per_class, val_per_class, val_fraction)
        train_idx, val_idx = sample_per_class(pool.targets, [train_per_class, n_val], seed, pool.classes)
    else:
        smallest = min(pool.targets.count(c) for c in range(len(pool.classes)))
        n_val = validation_count(smallest, val_per_class, val_fraction)
        val_idx, train_idx = sample_per_class(pool.targets, [n_val, None], seed, pool.classes)
    return DataSplits(pool.select(train_idx), pool.select(val_idx), test)


__all__ = ["DATASETS", "PROTOCOL_TRAIN_PER_CLASS", "DataSplits", "load_splits", "ArrayImages", "FileImages",
           "ImageCollection", "TransformedImages"]
