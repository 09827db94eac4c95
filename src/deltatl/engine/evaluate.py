"""Top-1 accuracy and mean cross-entropy of a model on a dataset, exact under DDP."""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from ..distributed import SINGLE, DistEnv


@torch.inference_mode()
def evaluate(model: nn.Module, dataset: Dataset, *, batch_size: int, device: torch.device,
             num_workers: int = 0, desc: str = "eval", progress: bool = True, dist: DistEnv = SINGLE,
             amp_dtype: torch.dtype | None = None, channels_last: bool = False) -> dict[str, float]:
    """``{"top1": percent, "loss": mean CE, "n": images}``; sums stay on the device until the end.

    Under DDP (``dist``, every process calls this) process ``r`` scores images ``r, r + W, r + 2W...``
    of the dataset, without padding, and the correct counts, loss sums and image counts are summed
    over the processes: each image is counted exactly once, whatever the dataset size. ``model`` must
    be the bare network, not its ``DistributedDataParallel`` wrapper (whose forward would expect every
    process to run the same number of batches).

    Args:
        amp_dtype: autocast dtype (bfloat16 / float16) or None; the loss is computed in float32.
        channels_last: feed the images in channels-last memory format.
    """
    model = getattr(model, "module", model)  # never the DDP wrapper
    was_training = model.training
    model.eval()
    shard = dataset if not dist.enabled else Subset(dataset, range(dist.rank, len(dataset), dist.world_size))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    autocast = (torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None
                else nullcontext())
    # correct, loss sum, images: one tensor so that DDP needs a single all-reduce.
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    hidden = not progress or not dist.is_primary
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=True if hidden else None, unit="batch"):
        images = images.to(device, non_blocking=True, memory_format=fmt)
        labels = labels.to(device, non_blocking=True)
        with autocast:
            logits = model(images)
        sums[0] += (logits.argmax(dim=1) == labels).sum()
        sums[1] += F.cross_entropy(logits.float(), labels, reduction="sum").double()
        sums[2] += labels.numel()
    model.train(was_training)
    dist.all_reduce_sum_(sums)
    correct, loss_sum, n = sums.tolist()  # the only host sync
    n = int(n)
    return {"top1": 100.0 * correct / max(n, 1), "loss": loss_sum / max(n, 1), "n": n}
