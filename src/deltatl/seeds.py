"""Seeds derived from a run's ``--seed``, one formula for every generator that must not share draws.

A run draws from several generators that must be reproducible on their own: the data order of each
epoch, each image's augmentation, RIFLE's re-initialisations, each DDP process's dropout. Each gets
``derived_seed(seed, part)``: distinct parts give distinct seeds, the same ones on every process and
after a resume.
"""
from __future__ import annotations

#: a prime larger than any epoch, step or event count, so ``seed * SEED_STRIDE + part`` never collides
SEED_STRIDE = 1_000_003


def derived_seed(seed: int, part: int) -> int:
    """``seed * SEED_STRIDE + part``."""
    return seed * SEED_STRIDE + part
