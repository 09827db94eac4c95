"""k-fold cross-validation of the training split: disjoint, covering, stratified, seeded; fold runs."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from deltatl.config import TrainConfig
from deltatl.data import ArrayImages, DataSplits
from deltatl.data.folds import fold_splits, read_folds, stratified_folds, write_folds
from deltatl.errors import DeltatlError
from deltatl.run import open_splits

# Unbalanced classes (7, 5, 12, 9 images), interleaved, so that stratification is not an accident.
TARGETS = [c for i in range(12) for c, n in enumerate((7, 5, 12, 9)) if i < n]


def test_folds_are_disjoint_and_cover_every_index():
    folds = stratified_folds(TARGETS, 4, seed=0)
    flat = [i for f in folds for i in f]
    assert len(flat) == len(set(flat)) == len(TARGETS)
    assert sorted(flat) == list(range(len(TARGETS)))
    assert all(f == sorted(f) for f in folds)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_every_fold_holds_floor_or_ceil_of_each_class_and_sizes_differ_by_at_most_one(k):
    folds = stratified_folds(TARGETS, k, seed=3)
    totals = Counter(TARGETS)
    for label, n in totals.items():
        counts = [sum(TARGETS[i] == label for i in f) for f in folds]
        assert set(counts) <= {n // k, -(-n // k)}, (label, counts)
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1


def test_the_same_seed_gives_the_same_folds_and_another_seed_others():
    assert stratified_folds(TARGETS, 3, seed=7) == stratified_folds(TARGETS, 3, seed=7)
    assert stratified_folds(TARGETS, 3, seed=7) != stratified_folds(TARGETS, 3, seed=8)


def test_adding_a_class_does_not_move_the_images_of_the_others_between_fold_mates():
    """Each class has its own generator: its images are dealt in the same order (the start may shift)."""
    base = stratified_folds(TARGETS, 3, seed=1)
    more = stratified_folds(TARGETS + [4] * 6, 3, seed=1)

    def mates(folds, label):
        return {frozenset(i for i in f if i < len(TARGETS) and TARGETS[i] == label) for f in folds}

    assert all(mates(base, c) == mates(more, c) for c in range(4))


def test_more_folds_than_the_smallest_class_has_images_is_a_clear_error():
    with pytest.raises(DeltatlError, match="class 'b' has 5 training images, fewer than the 6 folds"):
        stratified_folds(TARGETS, 6, seed=0, class_names=["a", "b", "c", "d"])
    with pytest.raises(DeltatlError, match="class 'e' has 0 training images"):
        stratified_folds(TARGETS, 2, seed=0, class_names=["a", "b", "c", "d", "e"])
    with pytest.raises(DeltatlError, match="at least 2 folds"):
        stratified_folds(TARGETS, 1, seed=0)


def _splits() -> DataSplits:
    images = np.zeros((len(TARGETS) + 8, 4, 4), dtype=np.uint8)
    labels = TARGETS + [0, 1, 2, 3] * 2
    pool = ArrayImages(images, labels, ["a", "b", "c", "d"], "train")
    return DataSplits(pool.select(range(len(TARGETS))), pool.select([]), pool.select(range(len(TARGETS), len(labels))))


def test_a_fold_run_trains_on_the_other_folds_validates_on_its_fold_and_has_no_test_images():
    splits = _splits()
    folds = stratified_folds(splits.train.targets, 3, seed=2)
    for k in range(3):
        run = fold_splits(splits, 3, k, seed=2)
        assert run.val.ids == [splits.train.ids[i] for i in folds[k]]
        assert sorted(run.train.ids + run.val.ids) == sorted(splits.train.ids)
        assert not set(run.train.ids) & set(run.val.ids)
        assert len(run.test) == 0 and run.classes == splits.classes
    with pytest.raises(DeltatlError, match="fold 3 does not exist"):
        fold_splits(splits, 3, 3, seed=2)


def test_fold_lists_round_trip(tmp_path):
    splits = _splits()
    folds = stratified_folds(splits.train.targets, 3, seed=0)
    paths = write_folds(str(tmp_path / "folds"), splits.train, folds)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["fold0.txt", "fold1.txt", "fold2.txt"]
    for (ids, labels), fold in zip(read_folds(str(tmp_path / "folds"), 3), folds):
        assert ids == [splits.train.ids[i] for i in fold]
        assert labels == [splits.train.targets[i] for i in fold]


def test_a_config_with_cv_fields_opens_the_fold_of_the_training_split(image_folder):
    root = image_folder(train=6, test=2)
    base = TrainConfig(data=str(root), val_per_class=0, check_images=False)
    whole = open_splits(base, progress=False)
    run = open_splits(TrainConfig(data=str(root), val_per_class=0, check_images=False, cv_folds=3, cv_fold=1),
                      progress=False)
    folds = stratified_folds(whole.train.targets, 3, seed=0)
    assert run.val.ids == [whole.train.ids[i] for i in folds[1]]
    assert len(run.train) == len(whole.train) - len(run.val) and len(run.test) == 0
    for bad in ({"cv_folds": 3}, {"cv_fold": 0}, {"cv_folds": 3, "cv_fold": 3}):
        with pytest.raises(DeltatlError, match="cv_folds and cv_fold go together"):
            TrainConfig(**bad)
