"""Top-1 accuracy and mean cross-entropy of a model on a dataset."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm


@torch.inference_mode()
def evaluate(model: nn.Module, dataset: Dataset, *, batch_size: int, device: torch.device,
             num_workers: int = 0, desc: str = "eval", progress: bool = True) -> dict[str, float]:
    """``{"top1": percent, "loss": mean CE, "n": images}``; sums stay on the device until the end."""
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    correct = torch.zeros((), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=None if progress else True, unit="batch"):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        logits = model(images)
        correct += (logits.argmax(dim=1) == labels).sum()
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").double()
    model.train(was_training)
    n = len(dataset)
    return {"top1": 100.0 * correct.item() / max(n, 1), "loss": loss_sum.item() / max(n, 1), "n": n}
