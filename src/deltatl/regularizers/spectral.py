r"""BSS, Batch Spectral Shrinkage (Chen et al., NeurIPS 2019): shrink the smallest singular values of
the batch's features, the directions fine-tuning would otherwise learn from too few images
("negative transfer").

.. math:: \Omega = \sum_{i=1}^{k} \sigma_{-i}^2(F)

with :math:`F` the :math:`b \times d` matrix of the features that enter the classifier (one row per
image of the batch) and :math:`\sigma_{-i}` its i-th smallest singular value. The authors add
:math:`\eta\,\Omega` (:math:`\eta` = 0.001, :math:`k` = 1) to plain fine-tuning with weight decay.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import DeltatlError
from .base import Regularizer, Setup, StepInputs, register


def batch_spectral_shrinkage(features: Tensor, k: int = 1) -> Tensor:
    r"""The sum of the ``k`` smallest squared singular values of ``features`` (b x d), in float32.

    Only the singular values are computed (``torch.linalg.svdvals``; the authors' code took a full SVD
    of :math:`F^T` every step); a matrix of rank :math:`\min(b, d)` has that many. Features of more
    than two dimensions are flattened per image.

    Raises:
        ValueError: ``k`` is not between 1 and ``min(b, d)``.
    """
    matrix = features.float().flatten(1)
    rank = min(matrix.shape)
    if not 1 <= k <= rank:
        raise ValueError(f"k must be between 1 and min(batch, features) = {rank}, got {k}")
    singular_values = torch.linalg.svdvals(matrix)  # descending
    return singular_values[-k:].square().sum()


@register
class BatchSpectralShrinkage(Regularizer):
    """``weight * batch_spectral_shrinkage(F, k)`` on the classifier's input ``F``.

    Singular values do not add up over the slices of a batch, so under DDP the features of the global
    batch are gathered first (``gather``: :meth:`deltatl.distributed.DistEnv.gather_batch`,
    differentiable), and N processes take exactly the single-process step on the global batch.
    """

    key = "bss"
    reads_head_input = True

    def __init__(self, k: int = 1, gather: Callable[[Tensor], Tensor] | None = None):
        super().__init__()
        if k < 1:
            raise DeltatlError(f"BSS's k must be at least 1, got {k}")
        self.k, self.gather = k, gather

    @classmethod
    def build(cls, setup: Setup) -> "BatchSpectralShrinkage":
        return cls(int(setup.options.get("bss_k", 1)), setup.options.get("batch_gather"))

    def forward(self, inputs: StepInputs, weight: float) -> Tensor:
        if inputs.head_features is None:
            raise RuntimeError("BSS needs the classifier's input features; the objective did not record them")
        features = inputs.head_features if self.gather is None else self.gather(inputs.head_features)
        return weight * batch_spectral_shrinkage(features, min(self.k, min(features.flatten(1).shape)))
