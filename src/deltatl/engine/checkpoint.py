"""Atomic checkpoint files and the random-number state that makes a resumed run exact."""
from __future__ import annotations

import pickle
import random
from typing import Any

import numpy as np
import torch

from ..errors import DeltatlError
from ..outputs import atomic_open


def save_atomic(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves a half-written file."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def load(path: str) -> dict[str, Any]:
    """A run's checkpoint. It holds only tensors and plain Python values, so PyTorch's safe loader
    (``weights_only=True``) reads it, and so does ``--checkpoint`` when a run starts from another
    run's weights. Checkpoints written before the numpy state was stored as a tensor need the full
    unpickler; they are the user's own run files."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise DeltatlError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from None


def rng_state() -> dict[str, Any]:
    """Every generator's state; numpy's key array as a tensor (safe to load with ``weights_only``)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
