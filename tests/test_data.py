"""Datasets: image-folder scanning, few-shot splits, list files, idx files, images and augmentation."""
from __future__ import annotations

import collections
import gzip
import io

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FASHION_TEST_PER_CLASS, FASHION_TRAIN_PER_CLASS, fashion_arrays, make_image, write_idx
from deltatl.data import ArrayImages, DataSplits, FileImages, TransformedImages, load_splits
from deltatl.data import fashion_mnist
from deltatl.data.folder import scan_split
from deltatl.data.images import check_readable
from deltatl.data.splits import read_list, write_list
from deltatl.data.transforms import eval_transform, train_transform
from deltatl.errors import DeltatlError
from deltatl.models import IMAGENET


def per_class(collection) -> dict[int, int]:
    return dict(collections.Counter(collection.targets))


# --- image-folder scanning ---------------------------------------------------------------------------

def test_scanning_lists_classes_in_sorted_order_with_matching_labels(image_folder):
    root = image_folder(classes=("zebra", "apple", "mango"), train=2, test=1)
    train = scan_split(str(root), "train")
    assert train.classes == ["apple", "mango", "zebra"]
    for id_, target in zip(train.ids, train.targets):
        assert id_.split("/")[1] == train.classes[target]
    assert len(train) == 6


def test_scanning_ignores_non_image_files_and_hidden_files_and_folders(image_folder):
    root = image_folder(train=2, test=1)
    red = root / "train" / "red"
    (red / "notes.txt").write_text("not an image")
    (red / "Thumbs.db").write_bytes(b"\0\1\2")
    (red / "labels.csv").write_text("a,b\n")
    (red / ".hidden.png").write_bytes((red / "red_0.png").read_bytes())
    (red / ".DS_Store").write_bytes(b"\0")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "train" / "README.md").write_text("a file next to the class folders")
    train = scan_split(str(root), "train")
    assert train.classes == ["blue", "green", "red"]
    assert sorted(i for i in train.ids if "/red/" in i) == ["train/red/red_0.png", "train/red/red_1.png"]


def test_upper_case_image_extensions_are_found(image_folder):
    root = image_folder(train=2, test=1)
    (root / "train" / "red" / "red_0.png").rename(root / "train" / "red" / "SHOUTING.PNG")
    train = scan_split(str(root), "train")
    assert "train/red/SHOUTING.PNG" in train.ids


# --- few-shot sampling ------------------------------------------------------------------------------

def test_few_shot_sampling_draws_exactly_k_training_images_per_class(image_folder):
    root = image_folder(train=8, test=3)
    splits = load_splits(str(root), train_per_class=3, val_per_class=2, seed=0)
    assert per_class(splits.train) == {0: 3, 1: 3, 2: 3}
    assert per_class(splits.val) == {0: 2, 1: 2, 2: 2}
    assert per_class(splits.test) == {0: 3, 1: 3, 2: 3}


def test_default_validation_is_a_fraction_of_the_k_training_images(image_folder):
    root = image_folder(train=8, test=3)
    splits = load_splits(str(root), train_per_class=5, val_fraction=0.2, seed=0)
    assert per_class(splits.train) == {0: 5, 1: 5, 2: 5}
    assert per_class(splits.val) == {0: 1, 1: 1, 2: 1}


def test_few_shot_sampling_is_the_same_for_the_same_seed(image_folder):
    root = image_folder(train=8, test=3)
    a = load_splits(str(root), train_per_class=3, val_per_class=2, seed=7)
    b = load_splits(str(root), train_per_class=3, val_per_class=2, seed=7)
    assert a.train.ids == b.train.ids
    assert a.val.ids == b.val.ids


def test_different_seeds_draw_different_training_images(image_folder):
    root = image_folder(train=8, test=3)
    draws = {tuple(load_splits(str(root), train_per_class=3, val_per_class=2, seed=s).train.ids) for s in range(4)}
    assert len(draws) > 1


def test_train_and_validation_are_disjoint_and_come_only_from_the_training_folder(image_folder):
    root = image_folder(train=8, test=3)
    for kwargs in ({"train_per_class": 3, "val_per_class": 2}, {}):
        splits = load_splits(str(root), seed=1, **kwargs)
        train, val, test = set(splits.train.ids), set(splits.val.ids), set(splits.test.ids)
        assert train and val and test
        assert not train & val
        assert not (train | val) & test
        assert all(i.startswith("train/") for i in train | val)
        assert all(i.startswith("test/") for i in test)


def test_without_k_all_training_images_are_split_between_train_and_validation(image_folder):
    root = image_folder(train=8, test=3)
    splits = load_splits(str(root), val_fraction=0.25, seed=0)
    assert per_class(splits.val) == {0: 2, 1: 2, 2: 2}
    assert per_class(splits.train) == {0: 6, 1: 6, 2: 6}


def test_own_val_folder_is_used_as_validation_when_present(image_folder):
    root = image_folder(train=6, test=2, val=2)
    splits = load_splits(str(root), seed=0)
    assert all(i.startswith("val/") for i in splits.val.ids)
    assert per_class(splits.val) == {0: 2, 1: 2, 2: 2}
    assert per_class(splits.train) == {0: 6, 1: 6, 2: 6}  # nothing held out of train
    few = load_splits(str(root), train_per_class=4, seed=0)
    assert per_class(few.train) == {0: 4, 1: 4, 2: 4}
    assert few.val.ids == splits.val.ids


def test_test_per_class_takes_a_seeded_subset_of_the_test_set(image_folder):
    root = image_folder(train=6, test=3)
    splits = load_splits(str(root), test_per_class=2, seed=0)
    assert per_class(splits.test) == {0: 2, 1: 2, 2: 2}
    assert splits.test.ids == load_splits(str(root), test_per_class=2, seed=0).test.ids


def test_asking_for_more_images_than_a_class_has_is_an_error(image_folder):
    root = image_folder(train=4, test=1)
    with pytest.raises(DeltatlError, match="has 4 images"):
        load_splits(str(root), train_per_class=4, val_per_class=1)


# --- list files -------------------------------------------------------------------------------------

def test_split_lists_are_written_and_read_back_exactly(image_folder, tmp_path):
    root = image_folder(train=8, test=3)
    splits = load_splits(str(root), train_per_class=3, val_per_class=2, seed=3)
    folder = tmp_path / "lists"
    splits.write_lists(str(folder))
    for name in ("train", "val", "test"):
        ids, targets = read_list(str(folder / f"{name}.txt"))
        assert ids == getattr(splits, name).ids
        assert targets == getattr(splits, name).targets


def test_list_files_keep_ids_that_contain_spaces(tmp_path):
    path = tmp_path / "x.txt"
    write_list(str(path), ["train/my class/img 1.png", "train/b/2.png"], [0, 11])
    assert read_list(str(path)) == (["train/my class/img 1.png", "train/b/2.png"], [0, 11])


def test_a_malformed_list_file_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("train/a/1.png 0\ntrain/a/2.png zero\n")
    with pytest.raises(DeltatlError, match=r"bad.txt:2"):
        read_list(str(path))


def test_recorded_lists_detect_that_the_data_changed(image_folder, tmp_path):
    root = image_folder(train=8, test=3)
    folder = str(tmp_path / "lists")
    load_splits(str(root), train_per_class=3, val_per_class=2, seed=0).write_lists(folder)
    load_splits(str(root), train_per_class=3, val_per_class=2, seed=0).check_lists(folder)  # same: fine
    other = load_splits(str(root), train_per_class=3, val_per_class=2, seed=1)
    with pytest.raises(DeltatlError, match="differ"):
        other.check_lists(folder)


# --- idx files and Fashion-MNIST --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["images-idx3-ubyte.gz", "images-idx3-ubyte"])
def test_idx_files_round_trip(tmp_path, name):
    array = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    path = write_idx(tmp_path / name, array)
    np.testing.assert_array_equal(fashion_mnist.read_idx(str(path)), array)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    np.testing.assert_array_equal(fashion_mnist.read_idx(str(write_idx(tmp_path / f"l{name}", labels))), labels)


def test_a_truncated_idx_file_is_an_error(tmp_path):
    array = np.zeros((5, 28, 28), dtype=np.uint8)
    path = write_idx(tmp_path / "train-images-idx3-ubyte.gz", array)
    with gzip.open(path) as f:
        data = f.read()
    with gzip.open(path, "wb") as f:
        f.write(data[:-100])
    with pytest.raises(DeltatlError, match="truncated"):
        fashion_mnist.read_idx(str(path))


def test_a_file_that_is_not_idx_is_an_error(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(b"PK\3\4 this is a zip file")
    with pytest.raises(DeltatlError, match="not a uint8 idx file"):
        fashion_mnist.read_idx(str(path))


def test_fashion_mnist_is_read_from_data_root(fashion_mnist_root):
    data = fashion_mnist.load(str(fashion_mnist_root))
    images, labels = fashion_arrays(FASHION_TRAIN_PER_CLASS, 0)
    assert len(data["train"]) == 10 * FASHION_TRAIN_PER_CLASS
    assert len(data["test"]) == 10 * FASHION_TEST_PER_CLASS
    assert data["train"].classes[0] == "T-shirt/top" and data["train"].classes[9] == "Ankle boot"
    assert data["train"].targets == labels.tolist()
    np.testing.assert_array_equal(np.asarray(data["train"].load(7))[..., 0], images[7])


def test_fashion_mnist_files_missing_from_data_root_is_an_error(tmp_path):
    with pytest.raises(DeltatlError, match="not found"):
        fashion_mnist.load(str(tmp_path))


def test_few_shot_fashion_mnist_keeps_train_validation_and_test_apart(fashion_mnist_root):
    splits = load_splits("fashion-mnist", str(fashion_mnist_root), train_per_class=2, val_per_class=1, seed=0)
    assert per_class(splits.train) == {k: 2 for k in range(10)}
    assert per_class(splits.val) == {k: 1 for k in range(10)}
    assert not set(splits.train.ids) & set(splits.val.ids)
    assert all(i.startswith("train/") for i in splits.train.ids + splits.val.ids)
    assert all(i.startswith("test/") for i in splits.test.ids)


def test_grayscale_arrays_become_three_channel_rgb():
    gray = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    images = ArrayImages(gray, [0, 1], ["a", "b"], "train")
    img = images.load(1)
    assert img.mode == "RGB" and img.size == (28, 28)
    rgb = np.asarray(img)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], gray[1])


def test_grayscale_image_files_become_three_channel_rgb(tmp_path):
    Image.fromarray(np.full((10, 10), 77, dtype=np.uint8), mode="L").save(tmp_path / "g.png")
    img = FileImages(str(tmp_path), ["g.png"], [0], ["a"]).load(0)
    assert img.mode == "RGB"
    assert np.asarray(img).shape == (10, 10, 3)


def test_array_selection_keeps_ids_and_targets_aligned():
    gray = np.zeros((6, 4, 4), dtype=np.uint8)
    images = ArrayImages(gray, [0, 1, 2, 0, 1, 2], ["a", "b", "c"], "train").select([5, 1])
    assert images.ids == ["train/5", "train/1"]
    assert images.targets == [2, 1]


# --- image files ------------------------------------------------------------------------------------

def test_a_png_named_jpg_still_loads(tmp_path):
    array = make_image(0, 0, (200, 20, 20))
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    (tmp_path / "photo.jpg").write_bytes(buffer.getvalue())
    files = FileImages(str(tmp_path), ["photo.jpg"], [0], ["a"])
    np.testing.assert_array_equal(np.asarray(files.load(0)), array)
    readable, bad = check_readable(files, progress=False)
    assert bad == [] and readable.ids == ["photo.jpg"]


def test_unreadable_files_are_separated_from_readable_ones(tmp_path):
    Image.fromarray(make_image(0, 0, (1, 2, 3))).save(tmp_path / "good.jpg", quality=90)
    data = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.png").write_bytes(b"this is not an image")
    files = FileImages(str(tmp_path), ["good.jpg", "cut.jpg", "junk.png"], [0, 0, 0], ["a"])
    readable, bad = check_readable(files, progress=False)
    assert readable.ids == ["good.jpg"]
    assert bad == ["cut.jpg", "junk.png"]


def test_loading_an_unreadable_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"this is not an image")
    with pytest.raises(DeltatlError, match="junk.png"):
        FileImages(str(tmp_path), ["junk.png"], [0], ["a"]).load(0)


def test_unreadable_files_are_skipped_with_a_warning_that_counts_them(image_folder):
    root = image_folder(train=8, test=3)
    (root / "train" / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable"):
        splits = load_splits(str(root), seed=0)
    assert not any("broken" in i for i in splits.train.ids + splits.val.ids)
    assert len(splits.train) + len(splits.val) == 24


# --- augmentation -----------------------------------------------------------------------------------

@pytest.fixture
def augmented(image_folder):
    root = image_folder(train=4, test=1, size=40)
    images = scan_split(str(root), "train")
    return lambda seed: TransformedImages(images, train_transform(24, IMAGENET, resize=32), seed=seed)


def test_augmentation_is_reproducible_for_seed_epoch_and_index(augmented):
    a, b = augmented(5), augmented(5)
    a.set_epoch(2)
    b.set_epoch(2)
    torch.manual_seed(123)  # the global RNG state must not matter, nor the access order
    first = [a[i][0] for i in (0, 3, 7)]
    torch.manual_seed(999)
    second = [b[i][0] for i in (7, 3, 0)][::-1]
    for x, y in zip(first, second):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_augmentation_differs_across_epochs_and_seeds(augmented):
    data = augmented(5)
    data.set_epoch(0)
    epoch0 = torch.stack([data[i][0] for i in range(len(data))])
    data.set_epoch(1)
    epoch1 = torch.stack([data[i][0] for i in range(len(data))])
    other_seed = augmented(6)
    other_seed.set_epoch(0)
    seed6 = torch.stack([other_seed[i][0] for i in range(len(data))])
    assert not torch.equal(epoch0, epoch1)
    assert not torch.equal(epoch0, seed6)
    assert epoch0.shape == (12, 3, 24, 24)


def test_evaluation_transform_is_deterministic_and_centre_cropped(image_folder):
    root = image_folder(train=1, test=1, size=40)
    images = scan_split(str(root), "train")
    data = TransformedImages(images, eval_transform(24, IMAGENET, resize=32))
    x, label = data[0]
    assert x.shape == (3, 24, 24)
    assert label == images.targets[0]
    torch.testing.assert_close(x, data[0][0], rtol=0, atol=0)


def test_the_class_list_of_the_splits_is_that_of_the_training_folder(image_folder):
    root = image_folder(train=4, test=1)
    splits = load_splits(str(root), seed=0)
    assert isinstance(splits, DataSplits)
    assert splits.classes == ["blue", "green", "red"] == splits.test.classes
