"""Fashion-MNIST from its four gzipped idx files.

Looked for in ``data_root`` if given, else where Debian's ``dataset-fashion-mnist`` package installed
them (asked from ``dpkg -L``), else downloaded by torchvision into deltatl's cache (:func:`deltatl.outputs.cache_dir`) (needs internet).
"""
from __future__ import annotations

import gzip
import os
import subprocess

import numpy as np

from ..errors import DeltatlError
from ..outputs import cache_dir
from .images import ArrayImages

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot"]
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
DEBIAN_PACKAGE = "dataset-fashion-mnist"


def read_idx(path: str) -> np.ndarray:
    """Read an idx file (gzipped or not): big-endian magic, dims, then uint8 data."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DeltatlError(f"{path} is not a uint8 idx file")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">i4", count=ndim, offset=4)
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(data) != expected:
        raise DeltatlError(f"{path} is truncated ({len(data)} bytes, expected {expected})")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(tuple(dims))


def _has_files(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, f)) for pair in FILES.values() for f in pair)


def _debian_folder() -> str | None:
    try:
        listing = subprocess.run(["dpkg", "-L", DEBIAN_PACKAGE], capture_output=True, text=True,
                                 check=False).stdout
    except OSError:
        return None
    for line in listing.splitlines():
        if line.endswith(FILES["train"][0]):
            return os.path.dirname(line)
    return None


def find_folder(data_root: str | None) -> str:
    """The folder holding the four files, downloading them as a last resort."""
    if data_root:
        for folder in (data_root, os.path.join(data_root, "FashionMNIST", "raw")):
            if _has_files(folder):
                return folder
        raise DeltatlError(f"Fashion-MNIST idx files ({', '.join(FILES['train'] + FILES['test'])}) "
                           f"not found in {data_root}")
    folder = _debian_folder()
    if folder and _has_files(folder):
        return folder
    cache = cache_dir()
    raw = os.path.join(cache, "FashionMNIST", "raw")
    if not _has_files(raw):
        from torchvision.datasets import FashionMNIST

        try:
            FashionMNIST(cache, download=True)
        except Exception as exc:  # offline: say what to install instead of a urllib traceback
            raise DeltatlError(f"Fashion-MNIST not found: install the Debian package {DEBIAN_PACKAGE}, "
                               f"pass `data_root`, or go online ({type(exc).__name__})") from None
    return raw


def load(data_root: str | None) -> dict[str, ArrayImages]:
    """``{"train": ..., "test": ...}`` as in-memory 28x28 grayscale images."""
    folder = find_folder(data_root)
    out = {}
    for split, (images_file, labels_file) in FILES.items():
        images = read_idx(os.path.join(folder, images_file))
        labels = read_idx(os.path.join(folder, labels_file))
        if len(images) != len(labels):
            raise DeltatlError(f"{folder}: {split} has {len(images)} images but {len(labels)} labels")
        out[split] = ArrayImages(images, labels, CLASSES, split)
    return out
