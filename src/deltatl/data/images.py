"""Labelled image collections: files on disk or arrays in memory, with stable string ids.

Every collection knows its ``classes``, integer ``targets`` and one string ``id`` per image (a path
relative to the dataset root, or ``split/index`` for array datasets). Ids are what split list files
record, so a run's exact images can be written down and read back.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DeltatlError
from ..seeds import derived_seed

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


# Where an image is transparent, it is shown on white (the page it was meant to be seen on); the
# colours stored under fully transparent pixels are arbitrary and often black.
TRANSPARENT_BACKGROUND = (255, 255, 255)


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of ``image`` whatever its mode, with its full range and its colours.

    ``Image.convert("RGB")`` alone gets three kinds of images wrong, which this fixes:
    - 16- and 32-bit integer greyscale (``I;16*``, ``I``: 16-bit PNG and TIFF): convert clips every
      value above 255 to white; here they are scaled from 0..65535 to 0..255 (``I``, which Pillow
      also uses for 8-bit data converted up, is read on the 0..255 scale when no value exceeds 255).
    - floating-point greyscale (``F``): scaled from 0..1 when every value lies there (the usual
      convention), else read on the 0..255 scale; clipped to it either way.
    - transparency (``RGBA``, ``LA``, ``PA``, or a palette/greyscale/RGB image with a ``transparency``
      entry): composited on :data:`TRANSPARENT_BACKGROUND` instead of dropping alpha.
    Everything else (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``...) is Pillow's convert.
    """
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if mode == "F":
            scale = 255.0 if values.size and 0.0 <= values.min() and values.max() <= 1.0 else 1.0
        elif mode == "I" and values.size and values.max() <= 255:
            scale = 1.0
        else:
            scale = 255.0 / 65535.0
        grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*TRANSPARENT_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class ImageCollection:
    """Base: a list of labelled images; ``load(i)`` returns an RGB PIL image."""

    classes: list[str]
    targets: list[int]
    ids: list[str]

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def select(self, indices: Sequence[int]) -> "ImageCollection":
        """A collection of the given images, same classes, same kind."""
        raise NotImplementedError


class FileImages(ImageCollection):
    """Images stored as files under ``root``; ``ids`` are paths relative to ``root``."""

    def __init__(self, root: str, ids: Sequence[str], targets: Sequence[int], classes: Sequence[str]):
        self.root, self.ids, self.targets, self.classes = root, list(ids), list(targets), list(classes)

    def load(self, index: int) -> Image.Image:
        path = os.path.join(self.root, self.ids[index])
        try:
            with Image.open(path) as img:
                return to_rgb(img)  # decodes fully, whatever the file's format and mode
        except (OSError, ValueError) as exc:
            raise DeltatlError(f"cannot read image {path}: {exc}") from None

    def select(self, indices: Sequence[int]) -> "FileImages":
        return FileImages(self.root, [self.ids[i] for i in indices], [self.targets[i] for i in indices],
                          self.classes)


class ArrayImages(ImageCollection):
    """Images held in a uint8 array of shape (N, H, W) or (N, H, W, 3); grayscale becomes 3 channels."""

    def __init__(self, array: np.ndarray, labels: Sequence[int], classes: Sequence[str], split: str,
                 rows: Sequence[int] | None = None):
        self.array, self.labels, self.classes, self.split = array, np.asarray(labels), list(classes), split
        self.rows = np.arange(len(array)) if rows is None else np.asarray(rows, dtype=np.int64)
        self.targets = self.labels[self.rows].tolist()
        self.ids = [f"{split}/{r}" for r in self.rows]

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.array[self.rows[index]]).convert("RGB")

    def select(self, indices: Sequence[int]) -> "ArrayImages":
        return ArrayImages(self.array, self.labels, self.classes, self.split, self.rows[list(indices)])


def check_readable(collection: FileImages, progress: bool = True) -> tuple[FileImages, list[str]]:
    """Decode every file once; return the readable ones and the ids of those that failed.

    JPEGs are decoded in draft (reduced-scale) mode, which still reads the whole stream, so a truncated
    file fails here rather than in the middle of training.
    """
    from tqdm import tqdm

    good, bad = [], []
    for i in tqdm(range(len(collection)), desc="checking images", unit="img", disable=None if progress else True,
                  leave=False):
        path = os.path.join(collection.root, collection.ids[i])
        try:
            with Image.open(path) as img:
                img.draft("RGB", (64, 64))
                img.load()
            good.append(i)
        except (OSError, ValueError, Image.DecompressionBombError):
            bad.append(collection.ids[i])
    return collection.select(good), bad


class TransformedImages(Dataset):
    """``(tensor, label)`` view of a collection, with reproducible random augmentation.

    The random draws of the transform for image ``i`` in epoch ``e`` depend only on ``(seed, e, i)``,
    not on worker count, batch order or how often the run was interrupted: that is what makes
    ``--resume`` reach exactly the result of an uninterrupted run.
    """

    def __init__(self, images: ImageCollection, transform: Callable[[Image.Image], torch.Tensor],
                 seed: int | None = None):
        self.images, self.transform, self.seed, self.epoch = images, transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = self.images.load(index)
        if self.seed is None:
            return self.transform(img), self.images.targets[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(self.seed, self.epoch) * 10_000_019 + index)  # 10_000_019: > any index
            return self.transform(img), self.images.targets[index]
