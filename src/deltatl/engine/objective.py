"""The training objective of each method: ``(images, labels) -> {"loss", "logits", "ce", ...}``.

The objective owns the target network and, for the methods that need it, the frozen source network
and the regularizer state; the training loop only ever calls it. Every term of the loss is returned
separately so it can be logged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DeltatlError
from ..models import split_parameters


@dataclass(frozen=True)
class Method:
    """How a method trains: its default weight decay and whether the backbone is frozen."""

    name: str
    weight_decay: float
    freeze_backbone: bool = False
    description: str = ""


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("l2", 1e-4, description="cross-entropy, weight decay 1e-4 on every parameter"),
    Method("l2-fe", 1e-4, freeze_backbone=True,
           description="frozen feature extractor (BatchNorm statistics too), only the new head trains"),
)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise DeltatlError(f"unknown method '{name}' (choose from {', '.join(METHODS)})")
    return METHODS[name]


class Objective(nn.Module):
    """Wraps the target model with the loss of one method.

    ``forward`` returns the same keys in train and eval mode: ``loss`` (what is minimised), ``logits``,
    ``ce`` (mean cross-entropy over the batch) and one entry per regularization term.
    """

    def __init__(self, model: nn.Module, method: str):
        super().__init__()
        self.model = model
        self.method = get_method(method)
        if self.method.freeze_backbone:
            for _, param in split_parameters(model)[0]:
                param.requires_grad_(False)

    def train(self, mode: bool = True) -> "Objective":
        super().train(mode)
        if mode and self.method.freeze_backbone:
            # A frozen feature extractor keeps its BatchNorm statistics frozen as well; dropout stays on.
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def forward(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        logits = self.model(images)
        ce = F.cross_entropy(logits, labels)
        return {"loss": ce, "logits": logits, "ce": ce.detach()}

