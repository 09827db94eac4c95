"""Atomic checkpoint files and the random-number state that makes a resumed run exact."""
from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from ..errors import DeltatlError


def save_atomic(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves a half-written file."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load(path: str) -> dict[str, Any]:
    try:
        # Our own files hold numpy RNG state and plain python objects besides tensors.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise DeltatlError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
