"""DELTA's supervised channel attention for a run: the official procedure, resumable and cached.

1. Train an L2-FE model (the pretrained backbone frozen, a new head) on the training split
   (official ``channel_eval.py``: 10 epochs, SGD lr 0.01, momentum 0.9, weight decay 1e-4, and
   ``ExponentialLR`` stepped once per epoch with gamma = 0.1^(1/6), i.e. lr / 10 every 6 epochs:
   0.01, 0.00681, 0.00464, ...; the official code left BatchNorm in train mode, so its statistics
   adapted: ``bn_train=True``).
2. Score every channel of the tapped layers on the first K training batches with train augmentation
   (official: 4 batches of 32) with :func:`deltatl.attention.channel_attention_scores`.
3. Turn the raw scores into weights (:func:`deltatl.attention.normalize_scores`) in the run.

The raw scores depend only on the pretrained weights, the training images, the layers and these
settings, so they are cached under a key of exactly those, and reused by every run that shares them
(for instance all the alphas of a search).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..data import ImageCollection, TransformedImages
from ..engine.fit import EpochSampler, epoch_steps, fit
from ..engine.objective import Objective
from ..modes import evaluating
from ..outputs import cache_dir as deltatl_cache_dir
from .scores import channel_attention_scores, read_scores, write_scores

OFFICIAL_EPOCHS_PER_TENTH = 6  # channel_eval.py: ExponentialLR(gamma=0.1 ** (1 / 6)), stepped per epoch


@dataclass(frozen=True)
class AttentionSettings:
    """How the official procedure estimates the scores (defaults: ``channel_eval.py``'s): the L2-FE fit's
    epochs, learning rate and batch size, whether its BatchNorm statistics adapt, how many training
    batches are scored and by which method. With the weights, the images and the layers, they are what
    the raw scores depend on, so they are the cache key (:meth:`key_fields`)."""

    epochs: int = 10
    lr: float = 0.01
    batches: int = 4
    batch_size: int = 32
    bn_train: bool = True
    method: str = "exact"

    #: the procedure's own version, raised when its numbers change (2: the L2-FE fit's ExponentialLR;
    #: scores of version 1, a step schedule, are not reused)
    VERSION: ClassVar[int] = 2

    def key_fields(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "version": self.VERSION}


def cache_key(fields: dict[str, Any], images: ImageCollection) -> str:
    """A digest of everything the raw scores depend on."""
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode())
    for image_id, label in zip(images.ids, images.targets):
        digest.update(f"{image_id}\t{label}\n".encode())
    return digest.hexdigest()[:24]


def estimate_channel_attention(model: nn.Module, layers: Sequence[str], train: TransformedImages, *,
                               work_dir: str, device: torch.device, seed: int = 0,
                               settings: AttentionSettings = AttentionSettings(), num_workers: int = 0,
                               progress: bool = True) -> dict[str, Tensor]:
    """Raw channel scores ``{layer: (C,)}`` of ``model`` (pretrained backbone + new head; not modified).

    Args:
        train: the training split with the training augmentation.
        work_dir: where the L2-FE run keeps its checkpoint, so an interrupted estimate resumes.
    """
    fe_model = fit_linear_probe(model, train, work_dir=work_dir, device=device, seed=seed, epochs=settings.epochs,
                                lr=settings.lr, batch_size=settings.batch_size, bn_train=settings.bn_train,
                                num_workers=num_workers, progress=progress, purpose="attention")
    batches = scoring_batches(train, settings.batch_size, settings.batches, seed, device, num_workers)
    return channel_attention_scores(fe_model, list(layers), batches, method=settings.method, progress=progress)


def scoring_batches(train: TransformedImages, batch_size: int, count: int, seed: int, device: torch.device,
                    num_workers: int = 0) -> list[tuple[Tensor, Tensor]]:
    """The first ``count`` batches of a fixed epoch (0) of the training order, with train augmentation:
    what the official procedure scores the channels on (fewer if the split is short)."""
    loader = DataLoader(train, batch_size=batch_size, sampler=EpochSampler(len(train), seed, epoch=0),
                        num_workers=num_workers)
    train.set_epoch(0)
    batches = []
    for images, labels in loader:
        batches.append((images.to(device), labels.to(device)))
        if len(batches) == count:
            break
    return batches


def fit_linear_probe(model: nn.Module, train: TransformedImages, *, work_dir: str, device: torch.device,
                     seed: int = 0, epochs: int = 10, lr: float = 0.01, batch_size: int = 32, bn_train: bool = True,
                     num_workers: int = 0, progress: bool = True, purpose: str = "linear probe") -> nn.Module:
    """The official L2-FE fit on a copy of ``model`` (``model`` is not modified); returns the fitted copy.

    The backbone is frozen and a new head trains (``channel_eval.py``: SGD momentum 0.9, weight decay
    1e-4, ExponentialLR / 10 every 6 epochs stepped per epoch; BatchNorm statistics adapt with
    ``bn_train``, as the official code let them). Resumable in ``work_dir``: a finished fit is reused.
    Channel attention scores this model; LP-FT starts its fine-tuning from its head.
    """
    fe_model = copy.deepcopy(model)
    objective = Objective(fe_model, "l2-fe", freeze_bn=not bn_train)
    steps = epochs * epoch_steps(len(train), batch_size)
    # schedule "exp" multiplies the lr once per epoch so that it reaches / 10 after decay_fraction *
    # epochs epochs: the official ExponentialLR's / 10 every 6 epochs, whatever the number of epochs.
    fit(objective, train, None, None, run_dir=work_dir, total_steps=steps, batch_size=batch_size, lr=lr,
        weight_decay=1e-4, schedule="exp", decay_fraction=OFFICIAL_EPOCHS_PER_TENTH / epochs, device=device, seed=seed,
        num_workers=num_workers, resume=True, progress=progress, run_info={"method": f"l2-fe ({purpose})"})
    return fe_model


def cached_channel_attention(cache_dir: str | None, key: str, layers: Sequence[str],
                             channels: dict[str, int], compute: Any, meta: dict[str, Any]) -> dict[str, Tensor]:
    """Read the raw scores for ``key`` from the cache, or ``compute()`` and store them."""
    folder = cache_dir or deltatl_cache_dir("attention")
    path = os.path.join(folder, f"{key}.json")
    if os.path.isfile(path):
        return read_scores(path, layers, channels)
    raw = compute()
    os.makedirs(folder, exist_ok=True)
    write_scores(path, raw, {**meta, "key": key})
    return raw


def layer_channels(model: nn.Module, layers: Sequence[str], image_size: int) -> dict[str, int]:
    """Output channels of each tapped layer, from one small forward pass."""
    from ..features import FeatureHooks

    with evaluating(model), FeatureHooks(model, layers) as hooks, torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device))
        return {name: feat.shape[1] for name, feat in hooks.pop().items()}
