"""The papers' transforms: resize, random crop and horizontal flip for training; centre crop for test.

The official code resized to a fixed 256x256 square and cropped 224 (ResNet) or 320 -> 299
(Inception-V3). ``resize`` defaults to the same 256/224 ratio of ``image_size``.
"""
from __future__ import annotations

from torchvision import transforms as T

from ..models import Preprocessing

_INTERPOLATION = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
                  "nearest": T.InterpolationMode.NEAREST}


def default_resize(image_size: int) -> int:
    return round(image_size * 256 / 224)


def train_transform(image_size: int, pre: Preprocessing, resize: int | None = None) -> T.Compose:
    size = resize or default_resize(image_size)
    return T.Compose([
        T.Resize((size, size), interpolation=_INTERPOLATION.get(pre.interpolation, T.InterpolationMode.BILINEAR)),
        T.RandomCrop(image_size),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(pre.mean, pre.std),
    ])


def eval_transform(image_size: int, pre: Preprocessing, resize: int | None = None) -> T.Compose:
    size = resize or default_resize(image_size)
    return T.Compose([
        T.Resize((size, size), interpolation=_INTERPOLATION.get(pre.interpolation, T.InterpolationMode.BILINEAR)),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(pre.mean, pre.std),
    ])
