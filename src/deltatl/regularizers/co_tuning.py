r"""Co-Tuning (You et al., NeurIPS 2020): the source classifier is trained too, on soft source labels
translated from the target labels.

Before fine-tuning, the relationship :math:`p(y_s \mid y_t)` is estimated once: the average, over the
target training images of class :math:`y_t`, of the pretrained network's softmax over its own classes
(the paper's "direct" approach). Fine-tuning then adds, to the target cross-entropy,

.. math:: \lambda\, \frac{1}{B} \sum_b -\sum_{s} p(s \mid y_{t,b}) \log \mathrm{softmax}(h_s(f(x_b)))_s

with :math:`h_s` a trained copy of the source classifier on the shared backbone's features
(tllib's default :math:`\lambda` = 2.3).
"""
from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DeltatlError
from .base import Regularizer, Setup, StepInputs, register


@torch.no_grad()
def source_relationship(source_model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                        num_classes: int) -> Tensor:
    r""":math:`p(y_s \mid y_t)`, a ``(num_classes, source classes)`` float32 matrix whose row ``t`` is the
    mean of ``softmax(source_model(x))`` over the images ``x`` of class ``t`` in ``batches``.

    ``source_model`` runs in eval mode (its mode is restored). Every class needs at least one image.
    """
    previous = source_model.training
    source_model.eval()
    sums: Tensor | None = None
    counts = torch.zeros(num_classes, dtype=torch.float64)
    try:
        for images, labels in batches:
            probabilities = F.softmax(source_model(images).double(), dim=1).cpu()
            if sums is None:
                sums = torch.zeros(num_classes, probabilities.shape[1], dtype=torch.float64)
            sums.index_add_(0, labels.cpu(), probabilities)
            counts += torch.bincount(labels.cpu(), minlength=num_classes).double()
    finally:
        source_model.train(previous)
    if sums is None or (counts == 0).any():
        missing = [] if sums is None else (counts == 0).nonzero().flatten().tolist()
        raise DeltatlError(f"Co-Tuning's relationship needs images of every class (none for {missing or 'any'})")
    return (sums / counts[:, None]).float()


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    r""":math:`\frac{1}{B}\sum_b -\sum_s q_{b,s} \log \mathrm{softmax}(z_b)_s`, in float32."""
    return -(targets.float() * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


@register
class CoTuning(Regularizer):
    """``weight * soft_cross_entropy(h_s(F), relationship[y_t])``: ``h_s`` a trained copy of the source
    classifier (optimizer group ``regularizers``), ``relationship`` a buffer (checkpointed)."""

    key = "co-tuning"
    reads_head_input = True
    uses_source_head = True

    def __init__(self, source_head: nn.Linear, relationship: Tensor):
        super().__init__()
        if relationship.dim() != 2 or relationship.shape[1] != source_head.out_features:
            raise DeltatlError(f"Co-Tuning's relationship has shape {tuple(relationship.shape)}; expected "
                               f"(target classes, {source_head.out_features})")
        self.source_head = copy.deepcopy(source_head).requires_grad_(True)
        self.register_buffer("relationship", relationship.detach().float().clone())

    @classmethod
    def build(cls, setup: Setup) -> "CoTuning":
        relationship = setup.options.get("relationship")
        if setup.source_head is None or relationship is None:
            raise DeltatlError("co-tuning needs the pretrained network's own classifier and the relationship "
                               "p(y_source | y_target) (deltatl.regularizers.source_relationship)")
        return cls(setup.source_head, relationship)

    def forward(self, inputs: StepInputs, weight: float) -> Tensor:
        if inputs.head_features is None:
            raise RuntimeError("Co-Tuning needs the classifier's input; the objective did not record it")
        logits = self.source_head(inputs.head_features.flatten(1))
        return weight * soft_cross_entropy(logits, self.relationship[inputs.labels])
