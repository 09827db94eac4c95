"""Top-1 accuracy and mean cross-entropy of a model on a dataset, exact under DDP."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from ..distributed import SINGLE, DistEnv
from ..modes import evaluating, unwrap


def crop_logits(model: nn.Module, crops: torch.Tensor, autocast: Any = None,
                memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Mean float32 logits over the crops of ``crops`` ``(B, n_crops, 3, H, W)`` (10-crop testing).

    One forward per crop position, on the B images of the batch: the memory of a plain evaluation
    batch, and (the model being in eval mode) exactly the mean of the crops' separate logits.
    """
    total = None
    for c in range(crops.shape[1]):
        with autocast if autocast is not None else nullcontext():
            logits = model(crops[:, c].contiguous(memory_format=memory_format)).float()
        total = logits if total is None else total + logits
    return total / crops.shape[1]


def eval_loader(dataset: Dataset, *, batch_size: int, device: torch.device, num_workers: int = 0,
                dist: DistEnv = SINGLE, persistent: bool = False) -> DataLoader:
    """The batches :func:`evaluate` scores: this process's shard of ``dataset`` (under DDP, images
    ``r, r + W, ...``) in order. ``persistent`` (with workers) keeps the worker processes between passes,
    for a caller that evaluates the same dataset every epoch."""
    shard = dataset if not dist.enabled else Subset(dataset, range(dist.rank, len(dataset), dist.world_size))
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=device.type == "cuda", persistent_workers=persistent and num_workers > 0)


@torch.inference_mode()
def evaluate(model: nn.Module, dataset: Dataset, *, batch_size: int, device: torch.device,
             num_workers: int = 0, desc: str = "eval", progress: bool = True, dist: DistEnv = SINGLE,
             amp_dtype: torch.dtype | None = None, channels_last: bool = False,
             loader: DataLoader | None = None) -> dict[str, float]:
    """``{"top1": percent, "loss": mean CE, "n": images}``; sums stay on the device until the end.

    Under DDP (``dist``, every process calls this) process ``r`` scores images ``r, r + W, r + 2W...``
    of the dataset, without padding, and the correct counts, loss sums and image counts are summed
    over the processes: each image is counted exactly once, whatever the dataset size. ``model`` must
    be the bare network, not its ``DistributedDataParallel`` wrapper (whose forward would expect every
    process to run the same number of batches). A dataset of crop stacks ``(n_crops, 3, H, W)`` (10-crop
    testing) is scored on the mean logits of each image's crops (:func:`crop_logits`); the sharding is
    by image, so each image's crops stay on one process and the result stays exact.

    Args:
        amp_dtype: autocast dtype (bfloat16 / float16) or None; the loss is computed in float32.
        channels_last: feed the images in channels-last memory format.
        loader: ``eval_loader(dataset, ...)`` made once by the caller and reused (its workers kept);
            by default a new one.
    """
    model = unwrap(model)  # never the DDP wrapper
    if loader is None:
        loader = eval_loader(dataset, batch_size=batch_size, device=device, num_workers=num_workers, dist=dist)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    autocast = (torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None
                else nullcontext())
    # correct, loss sum, images: one tensor so that DDP needs a single all-reduce.
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    hidden = not progress or not dist.is_primary
    with evaluating(model):
        for images, labels in tqdm(loader, desc=desc, leave=False, disable=True if hidden else None, unit="batch"):
            labels = labels.to(device, non_blocking=True)
            if images.dim() == 5:  # (B, crops, 3, H, W): 10-crop testing, logits averaged over the crops
                logits = crop_logits(model, images.to(device, non_blocking=True), autocast, fmt)
            else:
                images = images.to(device, non_blocking=True, memory_format=fmt)
                with autocast:
                    logits = model(images)
            sums[0] += (logits.argmax(dim=1) == labels).sum()
            sums[1] += F.cross_entropy(logits.float(), labels, reduction="sum").double()
            sums[2] += labels.numel()
    dist.all_reduce_sum_(sums)
    correct, loss_sum, n = sums.tolist()  # the only host sync
    n = int(n)
    return {"top1": 100.0 * correct / max(n, 1), "loss": loss_sum / max(n, 1), "n": n}
