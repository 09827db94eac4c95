"""Loaders of the official dataset layouts, on tiny synthetic trees that mimic each archive exactly.

Caltech-256, Stanford Dogs (MATLAB split files), MIT Indoor 67, CUB-200-2011 (with part locations),
Food-101 and the generic list-file dataset: classes, counts, labels, missing files, seeds.
"""
from __future__ import annotations

import collections
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from conftest import TINY_TRAIN_ARGS, make_image
from deltatl.data import DATASETS, load_splits
from deltatl.data import caltech256, cub, food101, list_file, mit_indoor, stanford_dogs
from deltatl.data.images import FileImages
from deltatl.data.splits import read_list
from deltatl.errors import DeltatlError


def save(path: Path, label: int, index: int, fmt: str = "JPEG", size: int = 16) -> Path:
    """A small deterministic image of class ``label`` in the given file format (whatever the name says)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_image(label, index, (60 * label % 256, 120, 200), size)).save(path, format=fmt)
    return path


def write_lines(path: Path, lines: list[str], newline: str = "\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(line + newline for line in lines).encode())


def per_class(images) -> dict[int, int]:
    return dict(sorted(collections.Counter(images.targets).items()))


def assert_all_load(images: FileImages) -> None:
    for i in range(len(images)):
        assert images.load(i).mode == "RGB"


# --- tree builders (each mimics the official archive's names, formats and 1-based ids) ----------------

CALTECH = {"001.ak47": 82, "002.american-flag": 95, "257.clutter": 80}  # every real class has >= 80


def caltech_tree(base: Path) -> Path:
    """``base/256_ObjectCategories/NNN.name/NNN_XXXX.jpg`` plus the archive's stray entries."""
    root = base / "256_ObjectCategories"
    for label, (name, count) in enumerate(CALTECH.items()):
        for i in range(1, count + 1):
            save(root / name / f"{name[:3]}_{i:04d}.jpg", label, i)
    save(root / "001.ak47" / "greg" / "vision309.jpg", 0, 999)  # like 056.dog/greg/: not part of the class
    (root / "002.american-flag" / "RENAME2").write_text("")  # like 198.spider/RENAME2
    return base


DOGS = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02105855-Shetland_sheepdog"]


def mat_cell(strings: list[str]) -> np.ndarray:
    """An N x 1 MATLAB cell array of strings, as in the official .mat files."""
    cell = np.empty((len(strings), 1), dtype=object)
    for i, s in enumerate(strings):
        cell[i, 0] = np.array([s])
    return cell


def dogs_tree(base: Path, train: int = 3, test: int = 2, lists_folder: str = "lists") -> Path:
    """``Images/<synset>-<breed>/<synset>_<n>.jpg``, ``Annotation/``, ``lists/{train,test,file}_list.mat``."""
    rows: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for label, folder in enumerate(DOGS):
        synset = folder.split("-")[0]
        for n in range(train + test):
            number = 2933 if folder.endswith("Shetland_sheepdog") and n == 0 else 100 + n
            name = f"{folder}/{synset}_{number}.jpg"
            # n02105855_2933.jpg is really a PNG in the official archive
            save(base / "Images" / name, label, n, fmt="PNG" if number == 2933 else "JPEG")
            (base / "Annotation" / folder).mkdir(parents=True, exist_ok=True)
            (base / "Annotation" / folder / f"{synset}_{number}").write_text("<annotation/>")
            rows["train" if n < train else "test"].append((name, label + 1))
    for split, items in (*rows.items(), ("file", rows["train"] + rows["test"])):
        (base / lists_folder).mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(base / lists_folder / f"{split}_list.mat", {
            "file_list": mat_cell([f for f, _ in items]),
            "annotation_list": mat_cell([f.removesuffix(".jpg") for f, _ in items]),
            "labels": np.array([[float(label)] for _, label in items]),
        })
    return base


MIT = ["bakery", "casino", "winecellar"]


def mit_tree(base: Path) -> Path:
    """``Images/<category>/<file>`` with ``TrainImages.txt`` / ``TestImages.txt`` (Windows line ends)."""
    lines: dict[str, list[str]] = {"Train": [], "Test": []}
    for label, category in enumerate(MIT):
        for n in range(5):
            name = f"{category}/{category}_{n:04d}.jpg"
            save(base / "Images" / name, label, n)
            lines["Train" if n < 3 else "Test"].append(name)
    # Files that are not JPEG: a GIF under a .jpg name (like casino/casino_0338.jpg) and a real .bmp.
    save(base / "Images" / "casino" / "casino_0338.jpg", 1, 50, fmt="GIF")
    save(base / "Images" / "winecellar" / "Laundry_Room.bmp", 2, 51, fmt="BMP")
    lines["Train"] += ["casino/casino_0338.jpg", "winecellar/Laundry_Room.bmp"]
    save(base / "Images" / "bakery" / "not_listed.jpg", 0, 52)  # in the folder, in neither split file
    for split, names in lines.items():
        write_lines(base / f"{split}Images.txt", names, newline="\r\n")
    return base


CUB = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
CUB_PARTS = ["back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg", "left wing",
             "nape", "right eye", "right leg", "right wing", "tail", "throat"]


def cub_part_xy(image_id: int, part_id: int) -> tuple[float, float, int]:
    visible = (image_id + part_id) % 3 != 0
    return (10.0 * part_id + image_id, 5.0 * part_id, 1) if visible else (0.0, 0.0, 0)


def cub_tree(base: Path) -> Path:
    """``CUB_200_2011/`` with images/, the id files (1-based ids, 1 = training image) and parts/."""
    root = base / "CUB_200_2011"
    images, labels, split, locs = [], [], [], []
    image_id = 0
    for label, folder in enumerate(CUB, 1):
        species = folder.split(".")[1]
        for n in range(4):
            image_id += 1
            name = f"{folder}/{species}_{n + 1:04d}_{796000 + image_id}.jpg"
            save(root / "images" / name, label - 1, n)
            images.append(f"{image_id} {name}")
            labels.append(f"{image_id} {label}")
            split.append(f"{image_id} {1 if n % 2 == 0 else 0}")
            locs += [f"{image_id} {p} {x:.1f} {y:.1f} {v}"
                     for p in range(1, 16) for x, y, v in [cub_part_xy(image_id, p)]]
    write_lines(root / "images.txt", images)
    write_lines(root / "image_class_labels.txt", labels)
    write_lines(root / "train_test_split.txt", split)
    write_lines(root / "classes.txt", [f"{k} {c}" for k, c in enumerate(CUB, 1)])
    write_lines(root / "parts" / "parts.txt", [f"{k} {p}" for k, p in enumerate(CUB_PARTS, 1)])
    write_lines(root / "parts" / "part_locs.txt", locs)
    return base


FOOD = ["apple_pie", "baby_back_ribs", "beef_carpaccio"]


def food_tree(base: Path) -> Path:
    """``food-101/images/<class>/<id>.jpg`` and meta/ (txt lines ``<class>/<id>`` without extension)."""
    root = base / "food-101"
    split: dict[str, list[str]] = {"train": [], "test": []}
    for label, name in enumerate(FOOD):
        for n in range(5):
            image = f"{name}/{1000000 + 37 * n + label}"
            save(root / "images" / f"{image}.jpg", label, n)
            split["train" if n < 3 else "test"].append(image)
    write_lines(root / "meta" / "classes.txt", FOOD)
    write_lines(root / "meta" / "labels.txt", [n.replace("_", " ").capitalize() for n in FOOD])
    for name, lines in split.items():
        write_lines(root / "meta" / f"{name}.txt", lines)
        grouped = {c: [line for line in lines if line.startswith(c + "/")] for c in FOOD}
        (root / "meta" / f"{name}.json").write_text(json.dumps(grouped))
    return base


def list_tree(base: Path) -> Path:
    """``train.txt`` / ``test.txt`` with ``relative/path label`` lines (paths with spaces)."""
    lines: dict[str, list[str]] = {"train": [], "test": []}
    for label in range(3):
        for n in range(4):
            rel = f"my photos/class {label}/img {n}.png"
            save(base / rel, label, n, fmt="PNG")
            lines["train" if n < 3 else "test"].append(f"{rel} {label}")
    for name, rows in lines.items():
        write_lines(base / f"{name}.txt", rows)
    return base


BUILDERS = {"caltech256-30": caltech_tree, "stanford-dogs": dogs_tree, "mit-indoor67": mit_tree,
            "cub200": cub_tree, "food101": food_tree, "list": list_tree}


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    """One read-only tree per dataset name, shared by the tests that only read."""
    return {name: build(tmp_path_factory.mktemp(name.replace("-", "_"))) for name, build in BUILDERS.items()}


def test_every_loader_is_registered_under_its_documented_name():
    assert {"caltech256", "caltech256-30", "caltech256-60", "stanford-dogs", "mit-indoor67", "cub200", "food101",
            "list"} <= set(DATASETS)


# --- Caltech-256 ------------------------------------------------------------------------------------

def test_caltech_splits_each_sorted_class_folder_by_position(trees):
    data = caltech256.load(str(trees["caltech256-30"]))
    assert data["train"].classes == list(CALTECH)  # 257.clutter included, as in L2-SP
    assert per_class(data["train"]) == {0: 60, 1: 60, 2: 60}
    assert per_class(data["test"]) == {0: 20, 1: 20, 2: 20}
    assert per_class(data["val"]) == {0: 2, 1: 15}  # beyond image 80; 257.clutter has exactly 80
    numbers = {split: {int(i[-8:-4]) for i in data[split].ids} for split in data}
    assert numbers == {"train": set(range(1, 61)), "test": set(range(61, 81)), "val": set(range(81, 96))}
    for split in data.values():
        assert all(i.split("/")[0] == split.classes[t] for i, t in zip(split.ids, split.targets))
    assert not any("greg" in i or "RENAME2" in i for split in data.values() for i in split.ids)


def test_caltech_30_draws_30_seeded_training_images_per_class_and_keeps_the_test_set_fixed(trees):
    root = str(trees["caltech256-30"])
    a, b, c = (load_splits("caltech256-30", root, seed=s, progress=False) for s in (3, 3, 4))
    assert per_class(a.train) == {0: 30, 1: 30, 2: 30}
    assert a.train.ids == b.train.ids and a.val.ids == b.val.ids
    assert a.train.ids != c.train.ids
    assert a.test.ids == c.test.ids == caltech256.load(root)["test"].ids
    pool = set(caltech256.load(root)["train"].ids)
    assert set(a.train.ids) <= pool and set(c.train.ids) <= pool
    assert not set(a.train.ids) & set(a.val.ids)


def test_the_same_seed_writes_the_same_caltech_lists_whatever_the_listing_order(trees, tmp_path, monkeypatch):
    """The split depends on the seed and the file names only: not on os.listdir's order, nor on
    whether --data-root names the archive's parent folder or 256_ObjectCategories itself."""
    root = trees["caltech256-30"]
    load_splits("caltech256-30", str(root), seed=5, progress=False).write_lists(str(tmp_path / "a"))
    listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda path: list(reversed(sorted(listdir(path)))))
    load_splits("caltech256-30", str(root / "256_ObjectCategories"), seed=5, progress=False) \
        .write_lists(str(tmp_path / "b"))
    for name in ("train.txt", "val.txt", "test.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_caltech_seed_0_draw_is_pinned(trees):
    """A change of these numbers changes every published split: it must be deliberate."""
    splits = load_splits("caltech256-30", str(trees["caltech256-30"]), seed=0, progress=False)
    first_class = sorted(int(i[-8:-4]) for i, t in zip(splits.train.ids, splits.train.targets) if t == 0)
    assert first_class[:10] == PINNED_SEED0_CLASS0


PINNED_SEED0_CLASS0 = [1, 2, 3, 4, 5, 7, 9, 11, 12, 17]  # numpy PCG64 permutation, seed [0, class 0]


def test_caltech_60_trains_on_the_whole_pool_and_a_contradicting_count_is_refused(trees):
    root = str(trees["caltech256-30"])
    sixty = load_splits("caltech256-60", root, seed=1, progress=False)
    assert sorted(sixty.train.ids) == sorted(caltech256.load(root)["train"].ids)
    with pytest.raises(DeltatlError, match="caltech256 `train_per_class` 10"):
        load_splits("caltech256-60", root, train_per_class=10, progress=False)
    assert per_class(load_splits("caltech256", root, train_per_class=10, progress=False).train) == {0: 10, 1: 10, 2: 10}


def test_a_caltech_class_with_fewer_than_80_images_is_an_error(tmp_path):
    root = caltech_tree(tmp_path)
    (root / "256_ObjectCategories" / "257.clutter" / "257_0080.jpg").unlink()
    with pytest.raises(DeltatlError, match="257.clutter has 79 images"):
        caltech256.load(str(root))


# --- Stanford Dogs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("lists_folder", ["lists", "."])
def test_stanford_dogs_follows_the_official_mat_lists(tmp_path, lists_folder):
    root = dogs_tree(tmp_path, lists_folder=lists_folder)  # lists.tar extracts without a folder
    data = stanford_dogs.load(str(root))
    assert data["train"].classes == DOGS
    assert per_class(data["train"]) == {0: 3, 1: 3, 2: 3} and per_class(data["test"]) == {0: 2, 1: 2, 2: 2}
    assert data["train"].ids[0] == "Images/n02085620-Chihuahua/n02085620_100.jpg"
    for split in data.values():
        assert all(i.split("/")[1] == split.classes[t] for i, t in zip(split.ids, split.targets))
        assert_all_load(split)  # including the PNG named .jpg
    assert "Images/n02105855-Shetland_sheepdog/n02105855_2933.jpg" in data["train"].ids


def test_stanford_dogs_labels_that_disagree_with_the_folders_are_an_error(tmp_path):
    root = dogs_tree(tmp_path)
    mat = scipy.io.loadmat(root / "lists" / "train_list.mat")
    mat["labels"][0, 0] = 2.0  # a Chihuahua labelled as the second breed
    scipy.io.savemat(root / "lists" / "train_list.mat", {k: v for k, v in mat.items() if not k.startswith("__")})
    with pytest.raises(DeltatlError, match="two folders"):
        stanford_dogs.load(str(root))


# --- MIT Indoor 67 ----------------------------------------------------------------------------------

def test_mit_indoor_follows_the_split_files_and_reads_gif_and_bmp_files(trees):
    root = trees["mit-indoor67"]
    data = mit_indoor.load(str(root))
    assert data["train"].classes == MIT
    assert per_class(data["train"]) == {0: 3, 1: 4, 2: 4} and per_class(data["test"]) == {0: 2, 1: 2, 2: 2}
    assert not any("not_listed" in i for split in data.values() for i in split.ids)
    with Image.open(root / "Images" / "casino" / "casino_0338.jpg") as raw:
        assert raw.format == "GIF"
    gif = data["train"].ids.index("Images/casino/casino_0338.jpg")
    img = data["train"].load(gif)
    assert img.mode == "RGB" and img.size == (16, 16)
    assert_all_load(data["train"])
    assert_all_load(data["test"])


def test_unreadable_files_of_an_official_layout_are_skipped_with_a_warning(tmp_path):
    root = mit_tree(tmp_path)
    (root / "Images" / "bakery" / "bakery_0000.jpg").write_bytes(b"\xff\xd8\xff truncated")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image file\(s\) in mit-indoor67/train"):
        splits = load_splits("mit-indoor67", str(root), val_per_class=1, seed=0, progress=False)
    assert "Images/bakery/bakery_0000.jpg" not in splits.train.ids + splits.val.ids


# --- CUB-200-2011 -----------------------------------------------------------------------------------

@pytest.mark.parametrize("inside", [False, True])
def test_cub_follows_train_test_split_with_1_based_ids(trees, inside):
    base = trees["cub200"]
    data = cub.load(str(base / "CUB_200_2011" if inside else base))
    assert data["train"].classes == CUB
    assert per_class(data["train"]) == {0: 2, 1: 2, 2: 2} and per_class(data["test"]) == {0: 2, 1: 2, 2: 2}
    assert data["train"].ids[0] == "images/001.Black_footed_Albatross/Black_footed_Albatross_0001_796001.jpg"
    assert data["test"].ids[0].endswith("_0002_796002.jpg")  # image id 2: is_training_image 0
    assert data["train"].targets[-1] == 2  # class id 3
    assert_all_load(data["train"])


def test_cub_part_locations_give_x_y_visible_per_image(trees):
    parts = cub.part_locations(str(trees["cub200"]))
    assert parts.parts == CUB_PARTS  # names with spaces kept ("left eye")
    data = cub.load(str(trees["cub200"]))
    assert set(parts.keypoints) == set(data["train"].ids) | set(data["test"].ids)
    first = parts.keypoints[data["train"].ids[0]]  # image id 1
    assert first.shape == (15, 3) and first.dtype == np.float32
    for part_id in range(1, 16):
        np.testing.assert_array_equal(first[part_id - 1], cub_part_xy(1, part_id))


def test_cub_part_files_missing_is_an_error_naming_them(tmp_path):
    root = cub_tree(tmp_path)
    (root / "CUB_200_2011" / "parts" / "part_locs.txt").unlink()
    with pytest.raises(DeltatlError, match="missing .*part_locs.txt"):
        cub.part_locations(str(root))


# --- Food-101 ---------------------------------------------------------------------------------------

def test_food101_follows_meta_train_and_test(trees):
    data = food101.load(str(trees["food101"]))
    assert data["train"].classes == FOOD
    assert per_class(data["train"]) == {0: 3, 1: 3, 2: 3} and per_class(data["test"]) == {0: 2, 1: 2, 2: 2}
    assert data["test"].ids[0] == "images/apple_pie/1000111.jpg"
    assert_all_load(data["test"])


# --- generic list files -----------------------------------------------------------------------------

def test_list_files_give_paths_with_spaces_and_0_based_labels(trees):
    data = list_file.load(str(trees["list"]))
    assert data["train"].classes == ["0", "1", "2"] and "val" not in data
    assert data["train"].ids[:2] == ["my photos/class 0/img 0.png", "my photos/class 0/img 1.png"]
    assert per_class(data["train"]) == {0: 3, 1: 3, 2: 3} and per_class(data["test"]) == {0: 1, 1: 1, 2: 1}
    assert_all_load(data["train"])


def test_list_files_use_classes_txt_and_val_txt_when_present(tmp_path):
    root = list_tree(tmp_path)
    write_lines(root / "classes.txt", ["cat", "dog", "owl"])
    write_lines(root / "val.txt", ["my photos/class 2/img 0.png 2"])
    splits = load_splits("list", str(root), progress=False)
    assert splits.classes == ["cat", "dog", "owl"]
    assert splits.val.ids == ["my photos/class 2/img 0.png"]


def test_a_list_label_outside_the_classes_is_an_error(tmp_path):
    root = list_tree(tmp_path)
    write_lines(root / "test.txt", ["my photos/class 0/img 3.png 7"])
    with pytest.raises(DeltatlError, match=r"test.txt: label 7 outside 0..2"):
        list_file.load(str(root))


# --- missing files: one line naming the file, from the library and the CLI --------------------------

MISSING = [  # (dataset, file removed from its tree, relative to the tree's base)
    ("caltech256-30", "256_ObjectCategories"),
    ("stanford-dogs", "lists/test_list.mat"),
    ("mit-indoor67", "TestImages.txt"),
    ("cub200", "CUB_200_2011/train_test_split.txt"),
    ("cub200", "CUB_200_2011/images.txt"),
    ("food101", "food-101/meta/test.txt"),
    ("list", "test.txt"),
]


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


@pytest.mark.parametrize("name, missing", MISSING)
def test_a_missing_expected_file_is_an_error_naming_it(tmp_path, name, missing):
    base = tmp_path / "data"
    base.mkdir()
    if name != "caltech256-30":  # an empty folder is Caltech's missing case (no 256_ObjectCategories)
        BUILDERS[name](base)
        remove(base / missing)
    with pytest.raises(DeltatlError) as err:
        DATASETS[name](str(base))
    message = str(err.value)
    assert message.startswith(f"missing {base / missing} (expected ") and "\n" not in message


@pytest.mark.parametrize("name, missing", MISSING[:1] + MISSING[2:4])
def test_the_cli_reports_a_missing_file_as_one_line_and_exit_status_2(cli, tmp_path, name, missing):
    base = tmp_path / "data"
    base.mkdir()
    if name != "caltech256-30":
        BUILDERS[name](base)
        remove(base / missing)
    result = cli("train", "--data", name, "--data-root", base, *TINY_TRAIN_ARGS, "--out", tmp_path / "run")
    assert result.code == 2
    assert len(result.err_lines) == 1
    assert result.err_lines[0].startswith(f"deltatl: error: missing {base / missing} (expected ")
    assert "Traceback" not in result.err


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_a_named_dataset_without_data_root_says_what_to_pass(name):
    with pytest.raises(DeltatlError, match="needs `data_root` DIR, the folder holding "):
        DATASETS[name](None)


# --- end to end -------------------------------------------------------------------------------------

def test_train_on_caltech256_30_records_the_sampled_lists(cli, trees, tmp_path):
    root = trees["caltech256-30"]
    out = tmp_path / "run"
    result = cli("train", "--data", "caltech256-30", "--data-root", root, *TINY_TRAIN_ARGS, "--seed", "2",
                 "--out", out)
    assert result.code == 0, result.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["classes"] == list(CALTECH) and 0 <= summary["test_top1"] <= 100
    expected = load_splits("caltech256-30", str(root), seed=2, progress=False)
    for split in ("train", "val", "test"):
        assert read_list(str(out / "splits" / f"{split}.txt")) == (getattr(expected, split).ids,
                                                                   getattr(expected, split).targets)
    assert per_class(expected.train) == {0: 30, 1: 30, 2: 30}
