"""Shared fixtures: tiny image folders, a tiny Fashion-MNIST in idx format, fast CLI flags."""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pytest
import torch
from PIL import Image

from deltatl.cli import main

# A tiny timm CNN (0.5 M parameters, BatchNorm, 'fc' head): a CPU train step on 4 images of 32 px
# takes a few milliseconds.
TINY_MODEL = "test_resnet"
TINY_TRAIN_ARGS = ["--model", TINY_MODEL, "--pretrained", "none", "--image-size", "32", "--batch-size", "4",
                   "--epochs", "1", "--device", "cpu", "--quiet"]
CLASS_COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 50, 230), "yellow": (230, 220, 40)}


@pytest.fixture(autouse=True, scope="session")
def _own_cache(tmp_path_factory):
    """The suite's attention cache (and any download) in a temporary folder, not the user's ~/.cache."""
    previous = os.environ.get("DELTATL_CACHE")
    os.environ["DELTATL_CACHE"] = str(tmp_path_factory.mktemp("deltatl-cache"))
    yield
    if previous is None:
        del os.environ["DELTATL_CACHE"]
    else:
        os.environ["DELTATL_CACHE"] = previous


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_image(label: int, index: int, colour: Sequence[int], size: int = 24) -> np.ndarray:
    """An RGB uint8 image: the class colour with stripes whose direction is the class, plus seeded noise."""
    rng = np.random.default_rng([label, index])
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = colour
    stripes = (np.arange(size) // 3) % 2 == 0
    if label % 2 == 0:
        img[stripes, :, :] *= 0.6
    else:
        img[:, stripes, :] *= 0.6
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``image_folder(name="data", classes=(...), train=8, test=3, val=0)`` -> dataset root.

    Writes ``root/{train,test[,val]}/<class>/<class>_<i>.png`` (24x24 RGB, deterministic).
    """

    def make(name: str = "data", classes: Sequence[str] = ("red", "green", "blue"), train: int = 8,
             test: int = 3, val: int = 0, size: int = 24) -> Path:
        root = tmp_path / name
        for split, count in (("train", train), ("test", test), ("val", val)):
            if not count:
                continue
            for label, cls in enumerate(classes):
                colour = CLASS_COLOURS.get(cls, (40 * label % 256, 120, 200))
                for i in range(count):
                    offset = {"train": 0, "test": 1000, "val": 2000}[split]
                    write_png(root / split / cls / f"{cls}_{i}.png", make_image(label, offset + i, colour, size))
        return root

    return make


def _idx_bytes(array: np.ndarray) -> bytes:
    """The idx format: 0, 0, type 0x08 (uint8), ndim; big-endian int32 dims; raw data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape) \
        + array.tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    data = _idx_bytes(array)
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


FASHION_TRAIN_PER_CLASS = 5
FASHION_TEST_PER_CLASS = 2


def fashion_arrays(per_class: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """28x28 grayscale images, ``per_class`` of each of the 10 classes; class k is a bright bar at row 2k."""
    labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)
    images = np.zeros((len(labels), 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        rng = np.random.default_rng([offset, i])
        images[i] = rng.integers(0, 40, (28, 28))
        images[i, 2 * label + 2: 2 * label + 6, 4:24] = 200 + label
    return images, labels


@pytest.fixture
def fashion_mnist_root(tmp_path: Path) -> Path:
    """A folder with the four gzipped Fashion-MNIST idx files (5 train, 2 test images per class)."""
    root = tmp_path / "fashion"
    root.mkdir()
    for prefix, per_class, offset in (("train", FASHION_TRAIN_PER_CLASS, 0), ("t10k", FASHION_TEST_PER_CLASS, 1)):
        images, labels = fashion_arrays(per_class, offset)
        assert struct.unpack(">I", _idx_bytes(images)[:4])[0] == 0x00000803
        assert struct.unpack(">I", _idx_bytes(labels)[:4])[0] == 0x00000801
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture
def tiny_train_args() -> list[str]:
    """CLI flags for a fast training run (add ``--data`` and ``--out``)."""
    return list(TINY_TRAIN_ARGS)


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        """Non-empty stderr lines other than warnings (and progress-bar residue, if any)."""
        lines = [line.strip() for line in self.err.replace("\r", "\n").splitlines()]
        return [line for line in lines if line and not line.startswith("deltatl: warning:")]

    @property
    def warning_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("deltatl: warning:")]


@pytest.fixture
def cli(capsys) -> Callable[..., CliResult]:
    """Run ``deltatl ARGS`` in-process; returns exit code, stdout and stderr."""

    def run(*argv: object) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run
