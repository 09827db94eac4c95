r"""LwF, Learning without Forgetting (Li & Hoiem, ECCV 2016): the network keeps answering the source
task as the pretrained network did.

The source classifier (ImageNet's 1000 classes for the embedded model) stays on the shared backbone as
a second, trained head :math:`h_o`; the frozen pretrained network gives the targets :math:`y_o` on each
training image (with its augmentation), and

.. math:: \lambda_o\, T^2\, \mathrm{KL}\bigl(\mathrm{softmax}(y_o / T)\,\|\,
          \mathrm{softmax}(h_o(f(x)) / T)\bigr)

averaged over the batch is added to the target task's cross-entropy (the authors: :math:`T = 2`,
:math:`\lambda_o = 1`).
"""
from __future__ import annotations

import copy

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DeltatlError
from .base import Regularizer, Setup, StepInputs, register


def knowledge_distillation(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    r""":math:`T^2\, \mathrm{KL}(\mathrm{softmax}(t / T) \| \mathrm{softmax}(s / T))`, averaged over the
    batch, in float32 (the teacher is a constant). :math:`T^2` keeps the gradient's scale independent of
    :math:`T` (Hinton et al. 2015).

    Raises:
        ValueError: shapes differ or the temperature is not positive.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    student = F.log_softmax(student_logits.float() / temperature, dim=1)
    teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    return temperature ** 2 * F.kl_div(student, teacher, reduction="batchmean", log_target=True)


@register
class LearningWithoutForgetting(Regularizer):
    """``weight * knowledge_distillation(h_o(F), y_o, T)`` with ``h_o`` a trained copy of the source
    classifier (a parameter of this term, in the optimizer's ``regularizers`` group) applied to the
    features that enter the target's classifier, and ``y_o`` the frozen source network's logits."""

    key = "lwf"
    reads_head_input = True
    reads_source_logits = True
    uses_source_head = True

    def __init__(self, source_head: nn.Linear, temperature: float = 2.0):
        super().__init__()
        self.old_head = copy.deepcopy(source_head).requires_grad_(True)
        self.temperature = temperature

    @classmethod
    def build(cls, setup: Setup) -> "LearningWithoutForgetting":
        if setup.source_head is None:
            raise DeltatlError("lwf needs the pretrained network's own classifier (a model with one)")
        return cls(setup.source_head, float(setup.options.get("lwf_temperature", 2.0)))

    def forward(self, inputs: StepInputs, weight: float) -> Tensor:
        if inputs.head_features is None or inputs.source_logits is None:
            raise RuntimeError("LwF needs the classifier's input and the source's logits; the objective did not "
                               "record them")
        student = self.old_head(inputs.head_features.flatten(1))
        return weight * knowledge_distillation(student, inputs.source_logits, self.temperature)
