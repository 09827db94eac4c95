"""CUB-200-2011: ``CUB_200_2011/`` with ``images/``, ``images.txt``, ``image_class_labels.txt`` and
``train_test_split.txt`` (5,994 training / 5,794 test images of 200 species; all ids 1-based).

The part annotations (``parts/parts.txt``, ``parts/part_locs.txt``: 15 keypoints per image) are not
used for training; :func:`part_locations` returns them for the keypoint analysis (DELTA, Table 3).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import DeltatlError
from .images import FileImages
from .layout import classes_from_folders, find_folder, need_root, read_fields, require, to_int, zero_based

TOP = "CUB_200_2011"
LAYOUT = f"{TOP}/{{images.txt,image_class_labels.txt,train_test_split.txt,images/}}"


def dataset_folder(data_root: str | None) -> str:
    """``data_root/CUB_200_2011`` or ``data_root`` itself, whichever holds ``images.txt``."""
    return find_folder(need_root(data_root, "CUB-200-2011", TOP), TOP, "images.txt")


def _read_by_id(root: str, name: str) -> dict[int, str]:
    """``<image_id> <value>`` lines as {id: value}."""
    path = require(os.path.join(root, name), LAYOUT)
    return {to_int(image_id, path): value for image_id, value in read_fields(path, 2)}


def load(data_root: str | None) -> dict[str, FileImages]:
    """``{"train": ..., "test": ...}`` as ``train_test_split.txt`` says (1 = training image)."""
    root = dataset_folder(data_root)
    require(os.path.join(root, "images"), LAYOUT)
    paths = _read_by_id(root, "images.txt")
    if not paths:
        raise DeltatlError(f"{os.path.join(root, 'images.txt')} lists no images")
    labels = _read_by_id(root, "image_class_labels.txt")
    is_train = _read_by_id(root, "train_test_split.txt")
    for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", is_train)):
        missing = sorted(set(paths) - set(table))
        if missing:
            raise DeltatlError(f"{os.path.join(root, name)} has no line for image id {missing[0]}")
    order = sorted(paths)
    ids = [f"images/{paths[i]}" for i in order]
    source = os.path.join(root, "image_class_labels.txt")
    label_ids = [to_int(labels[i], source) for i in order]
    targets = zero_based(label_ids, max(label_ids, default=0), source)
    classes = classes_from_folders(ids, targets, max(label_ids, default=0), source)
    everything = FileImages(root, ids, targets, classes)
    flags = [is_train[i] for i in order]
    if set(flags) - {"0", "1"}:
        raise DeltatlError(f"{os.path.join(root, 'train_test_split.txt')}: is_training_image must be 0 or 1")
    return {"train": everything.select([k for k, f in enumerate(flags) if f == "1"]),
            "test": everything.select([k for k, f in enumerate(flags) if f == "0"])}


@dataclass
class PartLocations:
    """The annotated keypoints of every image.

    Attributes:
        parts: the part names (``parts.txt``), index ``p`` = part id ``p + 1``.
        keypoints: image id as in the collections (``images/<class>/<file>.jpg``) -> float32 array of
            shape ``(len(parts), 3)``: x, y in pixels of the original image as in ``part_locs.txt``,
            and visible (1.0 or 0.0; an invisible part has x = y = 0).
    """

    parts: list[str]
    keypoints: dict[str, np.ndarray]


def part_locations(data_root: str) -> PartLocations:
    """Read ``parts/parts.txt`` and ``parts/part_locs.txt`` (``<image_id> <part_id> <x> <y> <visible>``)."""
    root = dataset_folder(data_root)
    paths = _read_by_id(root, "images.txt")
    parts_file = require(os.path.join(root, "parts", "parts.txt"), f"{TOP}/parts/{{parts.txt,part_locs.txt}}")
    parts = [name for _, name in read_fields(parts_file, 2)]
    locs_file = require(os.path.join(root, "parts", "part_locs.txt"), f"{TOP}/parts/{{parts.txt,part_locs.txt}}")
    try:
        table = np.loadtxt(locs_file, dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise DeltatlError(f"{locs_file}: {exc}") from None
    if table.size and table.shape[1] != 5:
        raise DeltatlError(f"{locs_file}: expected 5 columns, got {table.shape[1]}")
    keypoints = {i: np.zeros((len(parts), 3), dtype=np.float32) for i in paths}
    for image_id, part_id, x, y, visible in table:
        image_id, part_id = int(image_id), int(part_id)
        if image_id not in keypoints or not 1 <= part_id <= len(parts):
            raise DeltatlError(f"{locs_file}: unknown image id {image_id} or part id {part_id}")
        keypoints[image_id][part_id - 1] = (x, y, visible)
    return PartLocations(parts, {f"images/{paths[i]}": keypoints[i] for i in sorted(paths)})
