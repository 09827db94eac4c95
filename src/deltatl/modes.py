"""Small helpers every part of deltatl uses on networks: the bare module, and evaluation mode for a while."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a ``DistributedDataParallel`` (or ``DataParallel``) wrapper; else ``model``."""
    return getattr(model, "module", model)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; its previous mode (``model.train(previous)``) after it,
    also when the block raises."""
    previous = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(previous)
