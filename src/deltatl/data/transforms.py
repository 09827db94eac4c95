"""The papers' transforms: resize, random crop and horizontal flip for training; centre crop for test.

The official code resized to a fixed 256x256 square and cropped 224 (ResNet) or 320 -> 299
(Inception-V3). ``resize`` defaults to the same 256/224 ratio of ``image_size``.

The "data augmentation" variant of the DELTA paper's Table 2 (after Li et al. 2018) is two switches:
``keep_aspect`` resizes the shorter edge to ``resize`` keeping the aspect ratio (train and test) instead
of squashing the image to a square, and :func:`ten_crop_transform` gives each test image as a stack of
10 crops (the 4 corners and the centre, and their horizontal flips) whose logits
:func:`deltatl.engine.evaluate.evaluate` averages.
"""
from __future__ import annotations

import torch
from torchvision import transforms as T

from ..errors import DeltatlError
from ..models import Preprocessing

_INTERPOLATION = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
                  "nearest": T.InterpolationMode.NEAREST}


def default_resize(image_size: int) -> int:
    return round(image_size * 256 / 224)


def resize_transform(image_size: int, pre: Preprocessing, resize: int | None = None,
                     keep_aspect: bool = False) -> T.Resize:
    """To a ``resize`` square (default ``image_size * 256 / 224``), or (``keep_aspect``) shorter edge to
    ``resize`` with the ratio kept: the geometry before every crop of training and evaluation."""
    size = resize or default_resize(image_size)
    if size < image_size:
        raise DeltatlError(f"`resize` {size} is smaller than the `image_size` {image_size} crop")
    interpolation = _INTERPOLATION.get(pre.interpolation, T.InterpolationMode.BILINEAR)
    return T.Resize(size if keep_aspect else (size, size), interpolation=interpolation)


def train_transform(image_size: int, pre: Preprocessing, resize: int | None = None,
                    keep_aspect: bool = False) -> T.Compose:
    """The papers' augmentation: resize, random crop (anywhere in a long image with ``keep_aspect``), flip."""
    return T.Compose([resize_transform(image_size, pre, resize, keep_aspect), T.RandomCrop(image_size),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(pre.mean, pre.std)])


def eval_transform(image_size: int, pre: Preprocessing, resize: int | None = None,
                   keep_aspect: bool = False) -> T.Compose:
    """Resize and centre crop."""
    return T.Compose([resize_transform(image_size, pre, resize, keep_aspect), T.CenterCrop(image_size),
                      T.ToTensor(), T.Normalize(pre.mean, pre.std)])


class _StackCrops:
    """PIL crops -> one ``(n_crops, 3, H, W)`` tensor, each crop normalised."""

    def __init__(self, pre: Preprocessing) -> None:
        self.per_crop = T.Compose([T.ToTensor(), T.Normalize(pre.mean, pre.std)])

    def __call__(self, crops: tuple) -> torch.Tensor:
        return torch.stack([self.per_crop(crop) for crop in crops])


def ten_crop_transform(image_size: int, pre: Preprocessing, resize: int | None = None,
                       keep_aspect: bool = False) -> T.Compose:
    """10-crop testing: the image resized as by :func:`eval_transform`, then a ``(10, 3, s, s)`` stack
    of the 4 corner crops, the centre crop and their horizontal flips (``torchvision.transforms.TenCrop``
    order). :func:`deltatl.engine.evaluate.evaluate` averages the logits of the 10 crops."""
    return T.Compose([resize_transform(image_size, pre, resize, keep_aspect), T.TenCrop(image_size), _StackCrops(pre)])


def evaluation_transform(image_size: int, pre: Preprocessing, resize: int | None = None, keep_aspect: bool = False,
                   ten_crop: bool = False) -> T.Compose:
    """The evaluation transform of a run: single centre crop, or 10 crops (``ten_crop``)."""
    if ten_crop:
        return ten_crop_transform(image_size, pre, resize, keep_aspect)
    return eval_transform(image_size, pre, resize, keep_aspect)
