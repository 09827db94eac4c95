"""Seeded, stratified selections of image indices, and the list files that record them.

A list file has one ``<id> <label>`` line per image (the generic list-file format), so a run's exact
train / validation / test images can be read back and reproduced.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

from ..errors import DeltatlError
from ..outputs import atomic_open


def indices_by_class(targets: Sequence[int]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for i, t in enumerate(targets):
        groups[int(t)].append(i)
    return dict(sorted(groups.items()))


def sample_per_class(targets: Sequence[int], counts: Sequence[int | None], seed: int,
                     class_names: Sequence[str] | None = None) -> list[list[int]]:
    """Disjoint random draws per class: ``counts[k]`` images for draw k (None = all that remain).

    Every class is shuffled with its own generator seeded by ``(seed, class)``, so adding a class does
    not change the images drawn for the others. Returns one sorted index list per draw.
    """
    draws: list[list[int]] = [[] for _ in counts]
    for label, idx in indices_by_class(targets).items():
        need = sum(c for c in counts if c is not None)
        if need > len(idx):
            name = class_names[label] if class_names else str(label)
            raise DeltatlError(f"class '{name}' has {len(idx)} images, fewer than the {need} requested "
                               f"(see `train_per_class`, `val_per_class`, `test_per_class`)")
        order = np.random.default_rng([seed, label]).permutation(len(idx))
        start = 0
        for k, count in enumerate(counts):
            stop = len(idx) if count is None else start + count
            draws[k] += [idx[j] for j in order[start:stop]]
            start = stop
    return [sorted(d) for d in draws]


def validation_count(n_class: int, val_per_class: int | None, val_fraction: float) -> int:
    """Validation images to hold out of a class with ``n_class`` (candidate) training images."""
    if val_per_class is not None:
        return val_per_class
    return max(1, round(val_fraction * n_class)) if val_fraction > 0 else 0


def write_list(path: str, ids: Sequence[str], targets: Sequence[int]) -> None:
    """Write ``<id> <label>`` lines atomically."""
    with atomic_open(path) as f:
        f.writelines(f"{i} {t}\n" for i, t in zip(ids, targets))


def read_list(path: str) -> tuple[list[str], list[int]]:
    """Read a list file; ids may contain spaces, the label is the last field."""
    ids, targets = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            head, _, label = line.rstrip("\n").rpartition(" ")
            if not head or not label.lstrip("-").isdigit():
                raise DeltatlError(f"{path}:{n}: expected '<path> <integer label>', got {line.strip()!r}")
            ids.append(head)
            targets.append(int(label))
    return ids, targets

