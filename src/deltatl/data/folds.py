"""Stratified, seeded k-fold cross-validation of a training split, and the list files that record it.

Cross-validation (``deltatl search``) only ever cuts the *training* split: a fold run trains on k-1
folds and validates on the held-out fold, and the test split takes no part in it.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from ..errors import DeltatlError
from . import DataSplits
from .images import ImageCollection
from .splits import indices_by_class, read_list, write_list

# Mixed into the per-class generators so the fold draw is independent of the draw of the training
# images themselves (sample_per_class seeds its generators with (seed, class)).
_FOLD_STREAM = 0x0F01D


def stratified_folds(targets: Sequence[int], k: int, seed: int,
                     class_names: Sequence[str] | None = None) -> list[list[int]]:
    """Cut indices ``0 .. len(targets)-1`` into ``k`` disjoint, covering, class-stratified folds.

    Each class is shuffled by its own generator, seeded with ``seed``, the class and a fold-stream
    constant, and dealt round-robin
    over the folds, the deal continuing where the previous class stopped: every fold gets
    ``floor`` or ``ceil(n_c / k)`` images of class ``c``, and fold sizes differ by at most one.

    Args:
        class_names: all class names; a class without images then counts as a class with 0.

    Returns:
        ``k`` sorted index lists.

    Raises:
        DeltatlError: ``k < 2``, or a class has fewer than ``k`` images (a fold would miss it).
    """
    if k < 2:
        raise DeltatlError(f"cross-validation needs at least 2 folds, got {k}")
    groups = indices_by_class(targets)
    labels = range(len(class_names)) if class_names is not None else groups.keys()
    for label in labels:
        count = len(groups.get(label, []))
        if count < k:
            name = class_names[label] if class_names is not None else str(label)
            raise DeltatlError(f"class '{name}' has {count} training images, fewer than the {k} folds "
                               f"(lower `folds` or raise `train_per_class`)")
    folds: list[list[int]] = [[] for _ in range(k)]
    position = 0
    for label, idx in groups.items():
        for j in np.random.default_rng([seed, label, _FOLD_STREAM]).permutation(len(idx)):
            folds[position % k].append(idx[j])
            position += 1
    return [sorted(f) for f in folds]


def fold_splits(splits: DataSplits, k: int, fold: int, seed: int) -> DataSplits:
    """The splits of one cross-validation run: train on the other folds of ``splits.train``,
    validate on fold ``fold``; the test split is left out (empty) so it cannot take part."""
    if not 0 <= fold < k:
        raise DeltatlError(f"fold {fold} does not exist (folds are 0 .. {k - 1})")
    folds = stratified_folds(splits.train.targets, k, seed, splits.classes)
    rest = sorted(i for f, part in enumerate(folds) if f != fold for i in part)
    return DataSplits(splits.train.select(rest), splits.train.select(folds[fold]), splits.test.select([]))


def fold_list_path(folder: str, fold: int) -> str:
    return os.path.join(folder, f"fold{fold}.txt")


def write_folds(folder: str, images: ImageCollection, folds: Sequence[Sequence[int]]) -> list[str]:
    """Record each fold's images as ``<folder>/fold<i>.txt`` (``<id> <label>`` lines); return the paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, part in enumerate(folds):
        paths.append(fold_list_path(folder, i))
        write_list(paths[-1], [images.ids[j] for j in part], [images.targets[j] for j in part])
    return paths


def read_folds(folder: str, k: int) -> list[tuple[list[str], list[int]]]:
    """The ``(ids, labels)`` of each of the ``k`` folds written by :func:`write_folds`."""
    return [read_list(fold_list_path(folder, i)) for i in range(k)]
